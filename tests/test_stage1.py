"""Stage-1 training: learning, exact resume, dual-DiT routing by sigma, outputs, bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe.cli import main
from moe.config.targets import TargetSpec
from moe.config.train import Stage1Config
from moe.errors import MoeError
from moe.lora.file import read_lora_file
from moe.train.loop import load_dits, make_accelerator, open_dataset, run_training
from moe.train.stage1 import Stage1Module, train_stage1


def _cfg(ws, out, **kw):
    base = dict(
        task="tiny-t2v",
        dit=ws["models"].low_noise,
        dit_high_noise=ws["models"].high_noise,
        dataset=ws["cache"],
        output_dir=out,
        network_dim=8,
        learning_rate=2e-3,
        max_train_epochs=2,
        progress=False,
        seed=3,
    )
    return Stage1Config(**(base | kw))


def test_stage1_learns_and_writes_outputs(tiny_workspace, tmp_path):
    out = tmp_path / "s1"
    metrics = train_stage1(_cfg(tiny_workspace, out, max_train_epochs=20, save_every_n_epochs=10, learning_rate=1e-2))
    # Seen on this machine: base 2.84 -> final 2.48 after 20 epochs (-13%); assert a safe 8%.
    assert metrics["val_loss_final"] < 0.92 * metrics["val_loss_base"], metrics
    assert json.loads((out / "metrics.json").read_text())["val_loss_final"] == metrics["val_loss_final"]
    lora = read_lora_file(out / "vanilla_lora.safetensors")
    assert lora.metadata["lora_moe.format"] == "vanilla-lora/1" and lora.metadata["lora_moe.task"] == "tiny-t2v"
    spec = TargetSpec.from_flags(network_dim=8)
    assert lora.ranks() == spec.resolve(8) and lora.targets() == spec
    assert all(w.up.abs().sum() > 0 for w in lora.modules.values())  # every module trained
    assert (out / "checkpoint-epoch-10.safetensors").is_file() and (out / "checkpoint-epoch-20.safetensors").is_file()
    assert (out / "state-epoch-20").is_dir()
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_resume_is_exact(tiny_workspace, tmp_path):
    """2 epochs straight == 1 epoch, stop, --resume, 1 more epoch (same LoRA weights)."""
    straight = tmp_path / "straight"
    train_stage1(_cfg(tiny_workspace, straight, save_every_n_epochs=1))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    import shutil

    shutil.copytree(straight / "state-epoch-1", resumed / "state-epoch-1")  # as if stopped after epoch 1
    train_stage1(_cfg(tiny_workspace, resumed, save_every_n_epochs=1, resume=True))
    a = load_file(straight / "vanilla_lora.safetensors")
    b = load_file(resumed / "vanilla_lora.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    one_epoch = load_file(straight / "checkpoint-epoch-1.safetensors")
    assert any(not torch.equal(a[k], one_epoch[k]) for k in a)  # the second epoch did train


def test_resume_without_checkpoint_is_a_clear_error(tiny_workspace, tmp_path):
    with pytest.raises(MoeError, match="--resume: no state-epoch-N checkpoint"):
        train_stage1(_cfg(tiny_workspace, tmp_path / "empty", resume=True))


@pytest.mark.parametrize("train_dit", ["both", "high", "low"])
def test_sigma_picks_the_expert(tiny_workspace, tmp_path, train_dit):
    cfg = _cfg(tiny_workspace, tmp_path / train_dit, max_train_epochs=2, train_dit=train_dit)
    accelerator = make_accelerator(cfg)
    module = Stage1Module(cfg, load_dits(cfg, accelerator))
    seen = {"high": [], "low": []}
    for name, dit in module.dits.models.items():
        dit.register_forward_pre_hook(lambda m, args, kw, name=name: seen[name].extend(kw["timestep"].tolist()), with_kwargs=True)
    module.evaluate = lambda items, cfg: {}  # only the training steps matter here
    run_training(cfg, module, accelerator, open_dataset(cfg), "stage1")
    boundary_t = cfg.preset.boundary * 1000
    assert all(t >= boundary_t for t in seen["high"]) and all(t < boundary_t for t in seen["low"])
    if train_dit == "both":
        assert seen["high"] and seen["low"]
    else:
        other = "low" if train_dit == "high" else "high"
        assert seen[train_dit] and not seen[other]


def test_nonfinite_loss_stops_with_saved_state(tiny_workspace, tmp_path):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(tiny_workspace["cache"], cache)
    index = json.loads((cache / "index.json").read_text())
    victim = next(c for c in index["clips"] if c["split"] == "train")
    path = cache / victim["file"]
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors["latents"][0, 0, 0, 0] = float("inf")
    save_file(tensors, path, metadata=meta)
    with pytest.raises(MoeError, match=rf"loss became (inf|nan).*clips {victim['id']}.*last good state is saved to"):
        train_stage1(_cfg(tiny_workspace, tmp_path / "out", dataset=cache, max_train_epochs=3))
    assert list((tmp_path / "out").glob("state-nonfinite-step-*"))


def test_cli_reads_config_file_and_flags_override(tiny_workspace, tmp_path, capsys):
    cfg_file = tmp_path / "stage1.yaml"
    cfg_file.write_text(
        f"dit: {tiny_workspace['models'].low_noise}\n"
        f"dit_high_noise: {tiny_workspace['models'].high_noise}\n"
        f"dataset: {tiny_workspace['cache']}\n"
        "max_train_epochs: 5\nlearning_rate: 0.001\nprogress: false\n"
    )
    out = tmp_path / "cli"
    with pytest.raises(SystemExit) as e:
        main(
            [
                "stage1",
                "--config",
                str(cfg_file),
                "--output_dir",
                str(out),
                "--max_train_epochs",
                "1",
                "--network_dim",
                "4",
                "--rank_q",
                "8",
                "--rank_kvo",
                "4",
            ]
        )
    assert e.value.code == 0, capsys.readouterr().err
    saved = json.loads((out / "stage1_config.json").read_text())
    assert saved["max_train_epochs"] == 1 and saved["learning_rate"] == 0.001
    assert read_lora_file(out / "vanilla_lora.safetensors").ranks() == TargetSpec().resolve(8)
    assert "stage 1 done" in capsys.readouterr().out


def test_cli_bad_options_are_one_line(tiny_workspace, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["stage1", "--dataset", str(tiny_workspace["cache"]), "--output_dir", str(tmp_path), "--learning_rate", "-1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err == "error: --dit is required; --learning_rate must be a finite number > 0, got -1.0\n"


def test_cache_for_another_task_is_refused(tiny_workspace, tmp_path):
    with pytest.raises(MoeError, match=r"built for task .tiny-t2v. \(first clip"):
        open_dataset(_cfg(tiny_workspace, tmp_path / "x", task="tiny-i2v"))


def test_gradient_checkpointing_gives_the_same_weights(tiny_workspace, tmp_path):
    plain = tmp_path / "plain"
    train_stage1(_cfg(tiny_workspace, plain, max_train_epochs=1))
    ckpt = tmp_path / "ckpt"
    train_stage1(_cfg(tiny_workspace, ckpt, max_train_epochs=1, gradient_checkpointing=True))
    a, b = load_file(plain / "vanilla_lora.safetensors"), load_file(ckpt / "vanilla_lora.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_bf16_mixed_precision_runs_on_cpu(tiny_workspace, tmp_path):
    """The GPU recipe (bf16 autocast, DiT weights in bf16, fp32 adapters) also runs on the CPU."""
    out = tmp_path / "bf16"
    metrics = train_stage1(_cfg(tiny_workspace, out, max_train_epochs=1, mixed_precision="bf16"))
    assert all(torch.isfinite(torch.tensor(v)) for v in (metrics["val_loss_base"], metrics["val_loss_final"]))
    lora = load_file(out / "vanilla_lora.safetensors")
    assert all(v.dtype == torch.float32 for v in lora.values())
    assert any(k.endswith("lora_up.weight") and v.abs().sum() > 0 for k, v in lora.items())


def test_gradient_accumulation_counts_optimizer_steps(tiny_workspace, tmp_path):
    index = json.loads((tiny_workspace["cache"] / "index.json").read_text())
    train_clips = sum(c["split"] == "train" for c in index["clips"])
    metrics = train_stage1(_cfg(tiny_workspace, tmp_path / "acc", max_train_epochs=2, gradient_accumulation_steps=3, batch_size=2))
    batches = -(-train_clips // 2)
    assert metrics["train_steps"] == 2 * -(-batches // 3)


def test_roi_weighting_is_on_by_default(tiny_workspace, tmp_path):
    """SPEC section 6: lambda_roi 4 in both stages (stage 1 used to default to 1, i.e. off)."""
    from moe.config.train import Stage2Config
    from moe.data.cache_index import CacheIndex
    from moe.data.dataset import CachedClipDataset, collate_clips
    from moe.dit.flow_matching import per_sample_loss, roi_weights

    cfg = _cfg(tiny_workspace, tmp_path)
    assert cfg.roi_weight == 4.0 == Stage2Config.model_fields["roi_weight"].default
    module = Stage1Module(cfg, load_dits(cfg, make_accelerator(cfg)))
    data = CachedClipDataset(CacheIndex.load(tiny_workspace["cache"]), split=None)
    batch = collate_clips([next(data[i] for i in range(len(data)) if data[i]["roi"].sum() > 0)])
    sigma, noise = torch.tensor([0.4]), torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = module(batch, sigma, noise, "low")["loss"]
        pred, target = module.predict(batch, sigma, noise, "low")
    torch.testing.assert_close(loss, per_sample_loss(pred, target, roi_weights(batch["roi"], 4.0)).mean())
    assert abs(loss - per_sample_loss(pred, target).mean()) > 1e-4
