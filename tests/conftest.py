"""Shared fixtures. Everything is built from configs in tmp folders: no downloads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

from moe.lora.file import LoRAModuleWeights, write_lora_file
from moe.lora.targets import TargetSpec
from moe.wan.checkpoint import build_random_transformer, transformer_state_dict
from moe.wan.presets import get_preset


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
        out[m] = LoRAModuleWeights(
            down=torch.randn(r, i, generator=g) * std, up=torch.randn(o, r, generator=g) * std, alpha=alpha
        )
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
    from moe.data.synth import synthesize_dataset
    from moe.wan.model_set import write_tiny_model_set

    root = tmp_path_factory.mktemp("workspace")
    models = write_tiny_model_set(root / "models", "tiny-t2v", seed=0)
    manifest = synthesize_dataset(root / "data", clips=24, frames=17, size=(64, 64), seed=0)
    build_cache(manifest, root / "cache", "tiny-t2v", model_set=root / "models", size=(64, 64), frames=17, progress=False)
    return {"root": root, "models": models, "manifest": manifest, "cache": root / "cache"}


@pytest.fixture(scope="session")
def merged_workspace(tiny_workspace):
    """`tiny_workspace` plus a short stage-1 LoRA merged into both experts."""
    from moe.train.config import Stage1Config
    from moe.train.stage1 import train_stage1
    from moe.workflow import merge_both_experts

    root, models = tiny_workspace["root"], tiny_workspace["models"]
    train_stage1(
        Stage1Config(
            dit=models.low_noise, dit_high_noise=models.high_noise, dataset=tiny_workspace["cache"],
            output_dir=root / "stage1", network_dim=8, learning_rate=2e-3, max_train_epochs=3, progress=False,
        )
    )
    lora = root / "stage1" / "vanilla_lora.safetensors"
    low, high = root / "merged_low_noise.safetensors", root / "merged_high_noise.safetensors"
    merge_both_experts(models.low_noise, models.high_noise, lora, low, high)
    return tiny_workspace | {"vanilla_lora": lora, "merged_low": low, "merged_high": high}


@pytest.fixture(scope="session")
def stage2_run(merged_workspace):
    """A short stage-2 run on the merged workspace (for file, inference and export tests)."""
    from moe.train.config import Stage2Config
    from moe.train.stage2 import train_stage2

    out = merged_workspace["root"] / "stage2"
    metrics = train_stage2(
        Stage2Config(
            dit=merged_workspace["merged_low"], dit_high_noise=merged_workspace["merged_high"],
            dataset=merged_workspace["cache"], output_dir=out, network_dim=8, learning_rate=2e-3,
            max_train_epochs=3, progress=False,
        )
    )
    return merged_workspace | {"stage2_dir": out, "lora_moe": out / "lora_moe_stage2.safetensors", "metrics": metrics}
