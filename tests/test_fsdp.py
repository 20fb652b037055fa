"""`--fsdp` (`moe.train.fsdp`): the frozen DiTs sharded over two gloo processes on the CPU.

The reference is the same two-process run without `--fsdp` (each process holds both whole
experts): it sees the same batches, sigmas and noise, so only the sharding differs. Per-step
losses and the final weights must agree within rtol 1e-5 (atol 1e-7 on weights): FSDP all-gathers
each weight bit for bit and the forward and backward run the same kernels in the same order, so
the runs are in fact identical on this CPU; the tolerance only leaves room for a BLAS that picks
another code path for a differently aligned (gathered) weight. A single process draws other
noise and other batches per step, so it cannot be the per-step reference; the model check below
compares the sharded forward and backward against the unsharded model in one process instead.
`--resume` across a restart must be bit for bit, as without `--fsdp`.

The probe (`ddp_probe.py`) records each process's loss and its share of the active expert's
frozen weights before every training forward; `fsdp_check` runs under the same launcher.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_distributed import _records, _torchrun

from moe.errors import MoeError
from moe.train.fsdp import check_fsdp

# Small held-out grid: every process evaluates with --fsdp, the grid is not what is tested here.
COMMON = ["--save_every_n_epochs", "1", "--learning_rate", "0.01", "--val_sigmas", "0.3,0.9"]


def _steps(out: Path) -> list[float]:
    return [e["train/loss"] for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if e["event"] == "step"]


def _file_format(path: Path) -> tuple[dict, dict]:
    """(key -> (dtype, shape), metadata) of a safetensors file."""
    with safe_open(path, "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}, f.metadata()


def _assert_same_run(sharded: dict, whole: dict, weights: str) -> None:
    """Same per-step losses (both processes), same final weights, same file format."""
    for a, b in zip(sharded["records"], whole["records"], strict=True):
        assert len(a) == len(b)
        assert [r["ids"] for r in a] == [r["ids"] for r in b] and [r["noise"] for r in a] == [r["noise"] for r in b]
        torch.testing.assert_close(torch.tensor([r["loss"] for r in a]), torch.tensor([r["loss"] for r in b]), rtol=1e-5, atol=0)
    torch.testing.assert_close(torch.tensor(_steps(sharded["out"])), torch.tensor(_steps(whole["out"])), rtol=1e-5, atol=0)
    a, b = load_file(sharded["out"] / weights), load_file(whole["out"] / weights)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert _file_format(sharded["out"] / weights) == _file_format(whole["out"] / weights)
    assert {p.name for p in sharded["out"].iterdir()} == {p.name for p in whole["out"].iterdir()}


def _assert_sharded(run: dict) -> None:
    """Before every training forward each process held about half of the active expert's
    frozen weights, and the two halves make the whole."""
    assert "FSDP: each of 2 processes holds about 1/2" in run["stdout"]
    for r0, r1 in zip(*run["records"], strict=True):
        assert 0.45 < r0["shard"] < 0.55 and 0.45 < r1["shard"] < 0.55
        assert r0["shard"] + r1["shard"] == pytest.approx(1.0, abs=1e-12)


def _run(args: list[str], root: Path, name: str) -> dict:
    done = _torchrun([*args, "--output_dir", str(root / name)], root / f"probe-{name}")
    return {"out": root / name, "stdout": done.stdout, "records": _records(root / f"probe-{name}")}


@pytest.fixture(scope="module")
def stage1_runs(tiny_workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp1")
    models = tiny_workspace["models"]
    args = [
        "stage1",
        "--dit",
        str(models.low_noise),
        "--dit_high_noise",
        str(models.high_noise),
        "--dataset",
        str(tiny_workspace["cache"]),
        "--max_train_epochs",
        "2",
        "--network_dim",
        "8",
        "--lr_warmup_steps",
        "2",
        *COMMON,
    ]
    # The sharded launch runs `fsdp_check` first (the model-level check below).
    return {"root": root, "args": args, "sharded": _run(["fsdp_check", *args, "--fsdp"], root, "sharded"), "whole": _run(args, root, "whole")}


def test_stage1_sharded_run_matches_the_unsharded_one(stage1_runs):
    _assert_same_run(stage1_runs["sharded"], stage1_runs["whole"], "vanilla_lora.safetensors")
    for epoch in (1, 2):
        name = f"checkpoint-epoch-{epoch}.safetensors"
        assert _file_format(stage1_runs["sharded"]["out"] / name) == _file_format(stage1_runs["whole"]["out"] / name)
    assert {p.name for p in (stage1_runs["sharded"]["out"] / "state-epoch-2").iterdir()} == {
        p.name for p in (stage1_runs["whole"]["out"] / "state-epoch-2").iterdir()
    }
    metrics = json.loads((stage1_runs["sharded"]["out"] / "metrics.json").read_text())
    assert metrics["val_loss_final"] == pytest.approx(
        json.loads((stage1_runs["whole"]["out"] / "metrics.json").read_text())["val_loss_final"], rel=1e-5
    )
    assert stage1_runs["sharded"]["stdout"].count("stage 1 done") == 1  # every process evaluates, the main one reports


def test_each_process_holds_half_of_each_expert(stage1_runs):
    _assert_sharded(stage1_runs["sharded"])
    assert {r["expert"] for r in stage1_runs["sharded"]["records"][0]} == {"high", "low"}
    assert all(r["shard"] == 1.0 for rank in stage1_runs["whole"]["records"] for r in rank)


def test_resume_is_exact(stage1_runs):
    root, straight = stage1_runs["root"], stage1_runs["sharded"]
    resumed = root / "resumed"
    resumed.mkdir()
    shutil.copytree(straight["out"] / "state-epoch-1", resumed / "state-epoch-1")  # as if stopped after epoch 1
    _torchrun([*stage1_runs["args"], "--fsdp", "--output_dir", str(resumed), "--resume"], root / "probe-resumed")
    a, b = load_file(straight["out"] / "vanilla_lora.safetensors"), load_file(resumed / "vanilla_lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = _records(root / "probe-resumed")
    for rank in (0, 1):
        assert [r["loss"] for r in again[rank]] == [r["loss"] for r in straight["records"][rank][-len(again[rank]) :]]


@pytest.fixture(scope="module")
def merged_pair(tiny_workspace, tiny_state, tmp_path_factory):
    """Both experts with a random stage-1 LoRA merged in (stage 2's input; no stage-1 training)."""
    from conftest import random_lora

    from moe.config.presets import get_preset
    from moe.config.targets import TargetSpec
    from moe.lora.file import write_lora_file
    from moe.tiny.workflow import merge_both_experts

    root = tmp_path_factory.mktemp("fsdp-merged")
    spec = TargetSpec()
    weights = random_lora(tiny_state, spec.resolve(get_preset("tiny-t2v").dit.num_layers), std=0.02)
    lora = write_lora_file(root / "vanilla_lora.safetensors", weights, spec, "tiny-t2v")
    low, high = root / "merged_low.safetensors", root / "merged_high.safetensors"
    merge_both_experts(tiny_workspace["models"].low_noise, tiny_workspace["models"].high_noise, lora, low, high)
    return low, high


def test_stage2_sharded_run_matches_the_unsharded_one(tiny_workspace, merged_pair, tmp_path):
    """Stage 2 (experts, router, gates) with gradient checkpointing: the checkpointed blocks
    gather their shards again for the recompute."""
    low, high = merged_pair
    args = [
        "stage2",
        "--dit",
        str(low),
        "--dit_high_noise",
        str(high),
        "--dataset",
        str(tiny_workspace["cache"]),
        "--max_train_epochs",
        "1",
        "--gradient_checkpointing",
        *COMMON,
    ]
    sharded, whole = _run([*args, "--fsdp"], tmp_path, "sharded"), _run(args, tmp_path, "whole")
    _assert_same_run(sharded, whole, "lora_moe_stage2.safetensors")
    _assert_sharded(sharded)
    for a, b in zip(*sharded["records"], strict=True):  # the load-balance statistics still cover both processes
        assert a["f"] == b["f"] and a["P"] == b["P"]


def fsdp_check() -> None:
    """Run by each of two processes (`ddp_probe.py fsdp_check COMMAND`): a tiny expert pair, plain fp32
    and fp8 with per-row scales, both with gradient checkpointing and one shared set of adapters,
    sharded; forward and backward through low, high, low must give the unsharded copy's outputs
    and adapter gradients in this process. Writes `check-{rank}.json`. Leaves the process group
    to the command that follows."""
    from accelerate import Accelerator
    from torch import nn

    from moe.config.presets import get_preset
    from moe.config.targets import TargetSpec
    from moe.dit.dual_dit import DualDiT
    from moe.dit.validation import run_dit
    from moe.lora.inject import build_adapters, inject_lora
    from moe.train.fsdp import shard_fraction, shard_frozen_dits
    from moe.wan.checkpoint import build_random_transformer
    from moe.wan.fp8 import convert_to_fp8

    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    preset = get_preset("tiny-t2v")
    spec = TargetSpec(lora_cross_attn=True, lora_ffn2=True)
    report = {}
    for fp8 in (False, True):
        experts = [build_random_transformer(preset, seed=s) for s in (0, 1)]
        if fp8:
            for m in experts:
                convert_to_fp8(m, scaled=True)
        reference = copy.deepcopy(experts)
        dits = DualDiT(experts[0], experts[1], boundary=0.875)
        torch.manual_seed(0)
        trainable = nn.Module()
        trainable.adapters = build_adapters(experts[0], spec.resolve(preset.dit.num_layers), spec.alpha)
        with torch.no_grad():
            for p in trainable.adapters.parameters():
                p.normal_(0, 0.05)  # lora_up starts at zero: give every gradient signal
        ref_adapters = copy.deepcopy(trainable.adapters)
        for m in dits:
            inject_lora(m, trainable.adapters)
            m.enable_gradient_checkpointing()
        for m in reference:
            inject_lora(m, ref_adapters)
            m.enable_gradient_checkpointing()
        shard_frozen_dits(dits, trainable, accelerator)
        g = torch.Generator().manual_seed(rank)  # each process its own inputs
        x, text = torch.randn(1, 16, 2, 8, 8, generator=g), torch.randn(1, 8, 32, generator=g)
        outs, ref_outs = [], []
        for expert, sigma in (("low", 0.3), ("high", 0.95), ("low", 0.5)):
            s = torch.full((1,), sigma)
            out = run_dit(dits.get(expert), x, s, text)
            out.square().mean().backward()
            ref = run_dit(reference[0 if expert == "low" else 1], x, s, text)
            ref.square().mean().backward()
            outs.append(out.detach())
            ref_outs.append(ref.detach())
        grads = [p.grad for p in trainable.adapters.parameters()]
        ref_grads = [p.grad for p in ref_adapters.parameters()]
        report["fp8" if fp8 else "fp32"] = {
            "outputs_equal": all(torch.equal(a, b) for a, b in zip(outs, ref_outs)),
            "outputs_max_diff": max(float((a - b).abs().max()) for a, b in zip(outs, ref_outs)),
            "grads_equal": all(torch.equal(a, b) for a, b in zip(grads, ref_grads)),
            "grads_max_rel": max(float((a - b).norm() / b.norm()) for a, b in zip(grads, ref_grads)),
            "grads_nonzero": all(float(b.norm()) > 0 for b in ref_grads),
            "share": {k: shard_fraction(m) for k, m in dits.models.items()},
        }
    (Path(os.environ["PROBE_DIR"]) / f"check-{rank}.json").write_text(json.dumps(report))
    accelerator.wait_for_everyone()


def test_sharded_forward_and_backward_match_one_process(stage1_runs):
    """fp32 and fp8 (float8_e4m3fn weights, gathered as bytes over gloo) with gradient
    checkpointing and adapters shared by both experts: outputs and gradients equal the unsharded
    model's, bit for bit on this CPU; each process keeps about half of each expert's weights."""
    for rank in (0, 1):
        report = json.loads((stage1_runs["root"] / "probe-sharded" / f"check-{rank}.json").read_text())
        for form, r in report.items():
            assert r["grads_nonzero"], form
            assert r["outputs_max_diff"] <= 1e-6 and r["grads_max_rel"] <= 1e-5, (form, r)
            assert all(0.45 < share < 0.55 for share in r["share"].values()), (form, r["share"])


def test_refusals(tiny_workspace, tmp_path, monkeypatch, capsys):
    from conftest import run_cli

    from moe.config.train import Stage1Config

    models = tiny_workspace["models"]
    base = dict(dit=models.low_noise, dit_high_noise=models.high_noise, dataset=tiny_workspace["cache"], output_dir=tmp_path / "out", fsdp=True)
    check_fsdp(Stage1Config(**base), num_processes=2)  # accepted
    check_fsdp(Stage1Config(**base | {"fsdp": False}), num_processes=1)  # off: nothing to check
    cases = {
        "one process": (Stage1Config(**base), 1),
        "--blocks_to_swap 2": (Stage1Config(**base, blocks_to_swap=2), 2),
        "--offload_inactive_dit always": (Stage1Config(**base, offload_inactive_dit="always"), 2),
    }
    for what, (cfg, n) in cases.items():
        with pytest.raises(MoeError, match="--fsdp") as e:
            check_fsdp(cfg, num_processes=n)
        assert "\n" not in str(e.value), what
    # The command line, one process: one line, before any model is loaded or the run folder claimed.
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code, _, err = run_cli(
        capsys,
        [
            "stage1",
            "--dit",
            models.low_noise,
            "--dit_high_noise",
            models.high_noise,
            "--dataset",
            tiny_workspace["cache"],
            "--output_dir",
            tmp_path / "cli",
            "--fsdp",
            "--cpu",
        ],
    )
    assert code != 0 and "this run has one process" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "cli").exists()
