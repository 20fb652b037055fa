"""Which form each tool reads (the README table, `moe.lora.convert.tool_support`): diffusers by
loading our files with its own `load_lora_weights`, ComfyUI and musubi-tuner by their key rules
(`lora_tool_rules.py`)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_lora
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from lora_tool_rules import comfyui_patches, musubi_merge_patches, musubi_network_modules
from safetensors.torch import load_file

from moe.config.targets import LINEAR_SUBMODULES, TargetSpec
from moe.lora.convert import tool_support
from moe.lora.file import LoRAModuleWeights, read_lora_file, write_lora_file
from moe.lora.inject import adapters_from_weights, inject_lora
from moe.wan.checkpoint import build_random_transformer

FORMS = ("default", "musubi", "peft")


def _modules(tiny_state, coverage: str) -> dict[str, LoRAModuleWeights]:
    """Partial: the default targets plus a cross-attention module, mixed ranks and alphas.
    Full: every Linear module of every block (what diffusers' musubi loader needs)."""
    if coverage == "partial":
        ranks = TargetSpec().resolve(8) | {"blocks.5.cross_attn.k": 2}
    else:
        ranks = {f"blocks.{b}.{sub}": 2 + b % 2 for b in range(8) for sub in LINEAR_SUBMODULES}
    weights = random_lora(tiny_state, ranks, std=0.2)
    return {m: LoRAModuleWeights(down=w.down, up=w.up, alpha=[1.0, 3.0, 0.5][i % 3]) for i, (m, w) in enumerate(weights.items())}


def _inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([700.0]), torch.randn(1, 6, 32, generator=g)


@pytest.fixture(scope="module")
def plain_output(tiny_preset):
    with torch.no_grad():
        return build_random_transformer(tiny_preset, seed=0)(*_inputs()).sample


@pytest.mark.parametrize("coverage", ["partial", "full"])
@pytest.mark.parametrize("form", FORMS)
def test_diffusers_load_lora_weights_agrees_with_the_table_and_with_us(tmp_path, tiny_preset, tiny_state, plain_output, form, coverage):
    modules = _modules(tiny_state, coverage)
    path = write_lora_file(tmp_path / f"{form}.safetensors", modules, save_format=form)
    lora = read_lora_file(path)
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        transformer=build_random_transformer(tiny_preset, seed=0),
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    expected = tool_support(lora.form, lora.modules)["diffusers"]
    if expected is not None:
        with pytest.raises(KeyError):  # diffusers' musubi converter pops every module of every block
            pipe.load_lora_weights(str(path))
        assert form == "musubi" and coverage == "partial"
        return
    pipe.load_lora_weights(str(path))
    ours = build_random_transformer(tiny_preset, seed=0)
    inject_lora(ours, adapters_from_weights(ours, lora.modules))
    with torch.no_grad():
        theirs_out, ours_out = pipe.transformer(*_inputs()).sample, ours(*_inputs()).sample
    assert (theirs_out - plain_output).abs().max() > 1e-2, "diffusers applied nothing"
    torch.testing.assert_close(theirs_out, ours_out, rtol=1e-5, atol=1e-5)


def _deltas(modules):
    return {m + ".weight": w.scale * (w.up.double() @ w.down.double()) for m, w in modules.items()}


@pytest.mark.parametrize("coverage", ["partial", "full"])
@pytest.mark.parametrize("form", FORMS)
def test_comfyui_and_musubi_key_rules_agree_with_the_table(tmp_path, tiny_state, form, coverage):
    modules = _modules(tiny_state, coverage)
    path = write_lora_file(tmp_path / f"{form}.safetensors", modules, save_format=form)
    state, support = load_file(path), tool_support(form, modules)
    for tool, rule in (("ComfyUI", comfyui_patches), ("musubi-tuner", musubi_merge_patches)):
        patches, unused = rule(state, tiny_state.keys())
        if support[tool] is None:  # loads: every module, at our scale, every key used
            assert not unused and patches.keys() == _deltas(modules).keys(), tool
            for key, delta in _deltas(modules).items():
                torch.testing.assert_close(patches[key], delta, rtol=1e-12, atol=0)
        else:  # applies nothing (ComfyUI: "lora key not loaded", musubi: "not all LoRA keys are used")
            assert not patches and unused == set(state), tool
    if form == "musubi":  # --network_weights: one module per lora_unet_ name; KeyError without .alpha
        net = musubi_network_modules(state)
        assert net == {"lora_unet_" + m.replace(".", "_"): (w.rank, w.alpha) for m, w in modules.items()}
