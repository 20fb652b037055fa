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
