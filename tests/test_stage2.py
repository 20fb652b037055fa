"""Stage 2: outputs, logged components, and the refusals of the merge workflow."""

import json
import subprocess
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from moe.config.presets import get_preset
from moe.config.targets import TargetSpec
from moe.config.train import Stage2Config
from moe.errors import MoeError
from moe.files.hashing import sha256_file
from moe.lora_moe.file import read_lora_moe_file
from moe.train.loop import check_dits
from moe.train.stage2 import check_stage2_inputs, train_stage2
from moe.wan.checkpoint import (
    build_random_transformer,
    transformer_state_dict,
    write_checkpoint,
)


def _cfg(ws, out, **kw):
    base = dict(
        dit=ws["merged_low"],
        dit_high_noise=ws["merged_high"],
        dataset=ws["cache"],
        output_dir=out,
        network_dim=8,
        max_train_epochs=1,
        progress=False,
    )
    return Stage2Config(**(base | kw))


def test_stage2_file_metrics_and_logs(stage2_run):
    f = read_lora_moe_file(stage2_run["lora_moe"])
    assert f.experts == ("scissors", "hook", "suction", "other")
    assert f.metadata["use_base_lora"] == "false" and f.metadata["lora_moe.format"] == "lora-moe/1"
    assert f.targets == TargetSpec.from_flags(network_dim=8)
    assert f.merged_dits == {
        "low": sha256_file(stage2_run["merged_low"]),
        "high": sha256_file(stage2_run["merged_high"]),
    }
    assert not any(k.startswith("base_lora") for k in f.metadata)
    metrics = json.loads((stage2_run["stage2_dir"] / "metrics.json").read_text())
    for key in ("routing_accuracy", "roi_loss_correct_hint", "roi_loss_wrong_hint", "val_loss_stage1", "val_loss_stage2"):
        assert isinstance(metrics[key], float)
    assert 0 <= metrics["routing_accuracy"] <= 1
    assert (stage2_run["stage2_dir"] / "checkpoint-epoch-3.safetensors").is_file()
    events = next((stage2_run["stage2_dir"] / "logs").rglob("events.out.tfevents.*"))
    tags = set(EventAccumulator(str(events)).Reload().Tags()["scalars"])
    expected = {
        "train/loss",
        "train/loss_fm",
        "train/loss_teach",
        "train/loss_entropy",
        "train/loss_load_balance",
        "train/routing_accuracy",
        "train/rho",
        "train/lr",
        "val/routing_accuracy",
    }
    expected |= {f"train/load_{e}" for e in f.experts} | {f"train/gate_w_{e}" for e in f.experts}
    assert expected <= tags, expected - tags


def test_use_base_lora_is_refused_with_the_workflow_explained(merged_workspace, tmp_path):
    with pytest.raises(MoeError, match=r"--use_base_lora is not supported.*lora-moe merge"):
        check_stage2_inputs(_cfg(merged_workspace, tmp_path, use_base_lora=True))


def test_base_dit_is_refused_with_the_merge_command(merged_workspace, tmp_path):
    base = merged_workspace["models"].low_noise
    with pytest.raises(MoeError, match=rf"{base} is a base Wan DiT.*lora-moe merge --dit {base}"):
        check_stage2_inputs(_cfg(merged_workspace, tmp_path, dit=base))


def test_lora_given_as_dit_is_refused(merged_workspace, tmp_path):
    with pytest.raises(MoeError, match="is a vanilla LoRA, but --dit_high_noise expects a Wan DiT checkpoint with a LoRA merged in"):
        check_stage2_inputs(_cfg(merged_workspace, tmp_path, dit_high_noise=merged_workspace["vanilla_lora"]))


def test_ranks_differing_from_stage1_are_refused(merged_workspace, tmp_path):
    with pytest.raises(MoeError, match=r"target spec mismatch: the stage-1 LoRA merged into .* self_attn.q r8 .* stage 2 .*self_attn.q r4"):
        check_stage2_inputs(_cfg(merged_workspace, tmp_path, rank_q=4))


def test_alpha_base_is_ignored_with_a_warning(merged_workspace, tmp_path):
    with pytest.warns(UserWarning, match="--alpha_base is ignored"):
        check_stage2_inputs(_cfg(merged_workspace, tmp_path, alpha_base=0.5))


def test_task_and_weights_mismatch_is_a_clear_error(merged_workspace, tmp_path):
    with pytest.raises(MoeError, match=r"does not match task tiny-i2v.*preset tiny-t2v\); pass the matching --task"):
        train_stage2(_cfg(merged_workspace, tmp_path, task="tiny-i2v"))
    i2v = write_checkpoint(transformer_state_dict(build_random_transformer(get_preset("tiny-i2v"), 0)), tmp_path / "i2v.safetensors")
    with pytest.raises(MoeError, match=r"i2v.safetensors does not match task tiny-t2v.*preset tiny-i2v"):
        check_dits(_cfg(merged_workspace, tmp_path, dit_high_noise=i2v))


def test_reference_command_line_is_accepted(merged_workspace, tmp_path):
    """The reference workflow's stage-2 command, verbatim flags, through the real entry point."""
    out = tmp_path / "ref"
    cmd = [
        sys.executable,
        "-m",
        "moe",
        "stage2",
        "--task",
        "tiny-t2v",
        "--training_stage",
        "stage_b",
        "--dit",
        str(merged_workspace["merged_low"]),
        "--dit_high_noise",
        str(merged_workspace["merged_high"]),
        "--no_use_base_lora",
        "--lora_dim",
        "8",
        "--lora_alpha",
        "1.0",
        "--num_experts",
        "4",
        "--routing_mode",
        "learned",
        "--train_router",
        "--use_teacher_guidance",
        "--rank_q",
        "8",
        "--rank_k",
        "8",
        "--rank_v",
        "8",
        "--rank_o",
        "8",
        "--rank_ffn",
        "8",
        "--dataset",
        str(merged_workspace["cache"]),
        "--output_dir",
        str(out),
        "--max_train_epochs",
        "1",
        "--roi_weight",
        "4",
        "--no_progress",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "stage 2 done" in done.stdout and (out / "lora_moe_stage2.safetensors").is_file()
    refused = subprocess.run(cmd + ["--use_base_lora"], capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: --use_base_lora is not supported")


def test_stage2_resume_is_exact(merged_workspace, tmp_path):
    """Router, gates, experts and the load-balance EMAs all come back from the saved state."""
    import shutil

    import torch
    from safetensors.torch import load_file

    straight = tmp_path / "straight"
    train_stage2(_cfg(merged_workspace, straight, max_train_epochs=2, save_every_n_epochs=1, learning_rate=1e-2))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "state-epoch-1", resumed / "state-epoch-1")
    train_stage2(_cfg(merged_workspace, resumed, max_train_epochs=2, save_every_n_epochs=1, learning_rate=1e-2, resume=True))
    a = load_file(straight / "lora_moe_stage2.safetensors")
    b = load_file(resumed / "lora_moe_stage2.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((straight / "metrics.json").read_text())["routing_accuracy"]
        == json.loads((resumed / "metrics.json").read_text())["routing_accuracy"]
    )


def test_experts_are_matched_to_labels_by_name(merged_workspace, tmp_path):
    """With --expert_names hook,scissors,... the expert named scissors learns the scissors clips
    (before, labels were taken by position: the expert named hook got them)."""
    import torch

    from moe.data.cache_index import CacheIndex
    from moe.data.dataset import CachedClipDataset, collate_clips
    from moe.train.loop import load_dits, make_accelerator
    from moe.train.stage2 import Stage2Module

    names = ("hook", "scissors", "suction", "other")
    cfg = _cfg(merged_workspace, tmp_path, expert_names=names)
    index = CacheIndex.load(merged_workspace["cache"])
    module = Stage2Module(cfg, load_dits(cfg, make_accelerator(cfg)), {}, index.label_classes)
    data = CachedClipDataset(index, split=None)
    for i in range(len(data)):
        item = data[i]
        q = module.teacher(collate_clips([item]))[0]
        labelled = {c for c, v in zip(index.label_classes, item["labels"]) if v > 0}
        specific = labelled - {"other"}
        expected = {n for n in names if n in specific} or {"other"}
        assert {names[e] for e in torch.nonzero(q).flatten().tolist()} == expected, (item["id"], labelled, q)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            dict(num_experts=5, expert_names=("scissors", "hook", "suction", "other", "clip")),
            r"--expert_names scissors,hook,suction,other,clip must name the cache's label classes \(scissors, hook, suction, other\).*not a label class: clip",
        ),
        (dict(num_experts=5), r"--num_experts 5 but --expert_names scissors,hook,suction,other names 4; the cache's label classes"),
        (dict(expert_names=("scissor", "hook", "suction", "other")), r"missing: scissors; not a label class: scissor"),
    ],
)
def test_expert_options_are_checked_against_the_cache_first(merged_workspace, tmp_path, monkeypatch, flags, message):
    import moe.train.recipe as recipe

    monkeypatch.setattr(recipe, "load_dits", lambda *a, **k: pytest.fail("a DiT was loaded"))
    with pytest.raises(MoeError, match=message):
        train_stage2(_cfg(merged_workspace, tmp_path, **flags))
