"""Shared fixtures. Everything is built from configs in tmp folders: no downloads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on CI's two cores: one torch thread each (and in
    # the commands they start), not two workers fighting over four threads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import (  # noqa: F401
    aws_env,
    bucket,
    mlflow_uri,
    moto_server,
    plugins,
    prefect_api,
    s3_endpoint,
    s3_pipeline,
)
from xdist_groups import pytest_collection_modifyitems  # noqa: F401

from moe.config.presets import get_preset
from moe.config.targets import TargetSpec
from moe.lora.file import LoRAModuleWeights, write_lora_file
from moe.wan.checkpoint import build_random_transformer, transformer_state_dict


def run_cli(capsys, argv) -> tuple[int, str, str]:
    """`lora-moe ARGV` in this process: (exit code, stdout, stderr); a traceback fails the test."""
    from moe.cli import main

    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return e.value.code, captured.out, captured.err


@pytest.fixture(scope="session")
def tiny_preset():
    return get_preset("tiny-t2v")


@pytest.fixture(scope="session")
def tiny_state(tiny_preset) -> dict[str, torch.Tensor]:
    """Canonical-key fp32 weights of a random tiny-t2v DiT."""
    return transformer_state_dict(build_random_transformer(tiny_preset, seed=0))


def random_lora(state: dict[str, torch.Tensor], modules: dict[str, int], alpha: float = 1.0, seed: int = 0, std=0.1):
    """LoRA weights with non-zero up and down for the given modules (name -> rank)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, r in modules.items():
        o, i = state[m + ".weight"].shape
        out[m] = LoRAModuleWeights(down=torch.randn(r, i, generator=g) * std, up=torch.randn(o, r, generator=g) * std, alpha=alpha)
    return out


@pytest.fixture
def tiny_lora_file(tmp_path, tiny_state, tiny_preset):
    spec = TargetSpec()
    modules = random_lora(tiny_state, spec.resolve(tiny_preset.dit.num_layers))
    path = write_lora_file(tmp_path / "vanilla_lora.safetensors", modules, spec, tiny_preset.task)
    return path, modules


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory):
    """A tiny-t2v model set, a synthetic data set (24 clips, 17 frames, 64x64) and its latent
    cache, built once per test session."""
    from moe.data.cache import build_cache
    from moe.tiny.model_set import write_tiny_model_set
    from moe.tiny.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("workspace")
    models = write_tiny_model_set(root / "models", "tiny-t2v", seed=0)
    manifest = synthesize_dataset(root / "data", clips=24, frames=17, size=(64, 64), seed=0)
    build_cache(manifest, root / "cache", "tiny-t2v", model_set=root / "models", size=(64, 64), frames=17, progress=False)
    return {"root": root, "models": models, "manifest": manifest, "cache": root / "cache"}


@pytest.fixture(scope="session")
def merged_workspace(tiny_workspace):
    """`tiny_workspace` plus a short stage-1 LoRA merged into both experts."""
    from moe.config.train import Stage1Config
    from moe.tiny.workflow import merge_both_experts
    from moe.train.stage1 import train_stage1

    root, models = tiny_workspace["root"], tiny_workspace["models"]
    train_stage1(
        Stage1Config(
            dit=models.low_noise,
            dit_high_noise=models.high_noise,
            dataset=tiny_workspace["cache"],
            output_dir=root / "stage1",
            network_dim=8,
            learning_rate=2e-3,
            max_train_epochs=3,
            progress=False,
        )
    )
    lora = root / "stage1" / "vanilla_lora.safetensors"
    low, high = root / "merged_low_noise.safetensors", root / "merged_high_noise.safetensors"
    merge_both_experts(models.low_noise, models.high_noise, lora, low, high)
    return tiny_workspace | {"vanilla_lora": lora, "merged_low": low, "merged_high": high}


@pytest.fixture(scope="session")
def stage2_run(merged_workspace):
    """A short stage-2 run on the merged workspace (for file, inference and export tests)."""
    from moe.config.train import Stage2Config
    from moe.train.stage2 import train_stage2

    out = merged_workspace["root"] / "stage2"
    metrics = train_stage2(
        Stage2Config(
            dit=merged_workspace["merged_low"],
            dit_high_noise=merged_workspace["merged_high"],
            dataset=merged_workspace["cache"],
            output_dir=out,
            network_dim=8,
            learning_rate=2e-3,
            max_train_epochs=3,
            progress=False,
        )
    )
    return merged_workspace | {"stage2_dir": out, "lora_moe": out / "lora_moe_stage2.safetensors", "metrics": metrics}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`lora-moe workflow run --preset tiny` (seed 0), end to end with its eval report, once per
    session: the README's demo, shared by the workflow and evaluation tests, on random tiny DiTs
    (`--pretrain_steps 0`: the pre-training's 5 minutes are tested in tests/test_tiny_pretrain.py)."""
    from moe.cli import main

    out = tmp_path_factory.mktemp("demo")
    with pytest.raises(SystemExit) as e:
        main(["workflow", "run", "--preset", "tiny", "--output_dir", str(out), "--pretrain_steps", "0", "--quiet"])
    assert e.value.code == 0
    return out


# Another process holding `moe.files.output_lock` on a target: a live run, for the lock tests.
_HOLD_LOCK = """
import sys, time
from moe.files.output_lock import output_lock
with output_lock(sys.argv[1], "--out"):
    print("held", flush=True)
    time.sleep(120)
"""


class LockHolder:
    """Another process holding the lock on `target` (a live run), until stopped."""

    def __init__(self, target: Path):
        self.process = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(target)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "held"

    def stop(self):
        self.process.kill()
        self.process.wait()
