"""Vanilla LoRA: layer maths, injection, and the file format in every accepted form."""

import pytest
import torch
from conftest import random_lora
from safetensors.torch import load_file, save_file

from moe.config.targets import TargetSpec
from moe.errors import MoeError
from moe.lora.file import parse_lora_state, read_lora_file, write_lora_file
from moe.lora.inject import (
    adapters_from_weights,
    build_adapters,
    inject_lora,
    set_adapters_enabled,
)
from moe.wan.checkpoint import build_random_transformer
from moe.wan.keys import module_to_diffusers


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 3, 8, 8, generator=g), torch.tensor([900.0, 300.0]), torch.randn(2, 7, 32, generator=g)


def test_fresh_lora_is_identity_and_lora_equals_merged_weights(tiny_preset, tiny_state):
    torch.manual_seed(0)
    model = build_random_transformer(tiny_preset, seed=0)
    x, t, text = _inputs()
    with torch.no_grad():
        base_out = model(x, t, text).sample
    modules = TargetSpec().resolve(tiny_preset.dit.num_layers)
    adapters = build_adapters(model, modules, alpha=1.0)
    inject_lora(model, adapters, multiplier=1.0)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text).sample, base_out, rtol=0, atol=0)  # up is zero

    lora = random_lora(tiny_state, modules)
    model = build_random_transformer(tiny_preset, seed=0)
    inject_lora(model, adapters_from_weights(model, lora), multiplier=0.8)
    with torch.no_grad():
        lora_out = model(x, t, text).sample

    merged = build_random_transformer(tiny_preset, seed=0)
    with torch.no_grad():
        for m, w in lora.items():
            lin = merged.get_submodule(module_to_diffusers(m))
            lin.weight += 0.8 * w.scale * (w.up @ w.down)
        merged_out = merged(x, t, text).sample
    assert (lora_out - base_out).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(lora_out, merged_out, rtol=1e-5, atol=1e-5)

    set_adapters_enabled(model, False)
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text).sample, base_out, rtol=0, atol=0)


def test_one_adapter_set_shared_by_two_models(tiny_preset):
    high = build_random_transformer(tiny_preset, seed=0)
    low = build_random_transformer(tiny_preset, seed=1)
    adapters = build_adapters(high, {"blocks.7.self_attn.q": 4}, alpha=1.0)
    inject_lora(high, adapters)
    inject_lora(low, adapters)
    assert high.blocks[7].attn1.to_q.adapter is low.blocks[7].attn1.to_q.adapter
    trainable = {id(p) for m in (high, low) for p in m.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapters.parameters()}


def test_layer_handles_bf16_base_with_fp32_adapter(tiny_preset):
    model = build_random_transformer(tiny_preset, seed=0, dtype=torch.bfloat16)
    adapters = build_adapters(model, {"blocks.7.ffn.0": 4}, alpha=1.0)
    inject_lora(model, adapters)
    x, t, text = _inputs()
    with torch.no_grad():
        out = model(x.bfloat16(), t, text.bfloat16()).sample
    assert out.dtype == torch.bfloat16 and adapters["blocks/7/ffn/0"].lora_down.dtype == torch.float32


@pytest.mark.parametrize("save_format", ["diffusers", "musubi"])
def test_file_round_trip_with_metadata(tmp_path, tiny_state, save_format):
    spec = TargetSpec()
    modules = random_lora(tiny_state, spec.resolve(8), alpha=2.0)
    path = write_lora_file(tmp_path / "l.safetensors", modules, spec, "tiny-t2v", save_format=save_format)
    keys = load_file(path).keys()
    prefix = "diffusion_model.blocks.6.self_attn.q" if save_format == "diffusers" else "lora_unet_blocks_6_self_attn_q"
    assert {f"{prefix}.lora_down.weight", f"{prefix}.lora_up.weight", f"{prefix}.alpha"} <= set(keys)
    lora = read_lora_file(path)
    assert lora.ranks() == spec.resolve(8)
    assert lora.targets() == spec
    assert lora.metadata["lora_moe.format"] == "vanilla-lora/1" and lora.metadata["lora_moe.task"] == "tiny-t2v"
    assert lora.metadata["ss_network_module"] == "networks.lora_wan" and lora.metadata["ss_network_alpha"] == "2.0"
    for m, w in modules.items():
        assert torch.equal(lora.modules[m].down, w.down) and torch.equal(lora.modules[m].up, w.up)
        assert lora.modules[m].alpha == 2.0


def test_reader_accepts_every_common_form(tiny_state):
    modules = random_lora(tiny_state, {"blocks.7.self_attn.q": 8, "blocks.6.self_attn.o": 4, "blocks.7.ffn.0": 2})
    q, o, f = modules["blocks.7.self_attn.q"], modules["blocks.6.self_attn.o"], modules["blocks.7.ffn.0"]
    forms = {
        "comfy": {
            "model.diffusion_model.blocks.7.self_attn.q.lora_down.weight": q.down,
            "model.diffusion_model.blocks.7.self_attn.q.lora_up.weight": q.up,
            "model.diffusion_model.blocks.7.self_attn.q.alpha": torch.tensor(1.0),
        },
        "peft": {  # diffusers module names, no alpha -> scale 1
            "transformer.blocks.6.attn1.to_out.0.lora_A.weight": o.down,
            "transformer.blocks.6.attn1.to_out.0.lora_B.weight": o.up,
            "transformer.blocks.7.ffn.net.0.proj.lora_A.weight": f.down,
            "transformer.blocks.7.ffn.net.0.proj.lora_B.weight": f.up,
        },
        "musubi": {
            "lora_unet_blocks_7_ffn_0.lora_down.weight": f.down,
            "lora_unet_blocks_7_ffn_0.lora_up.weight": f.up,
            "lora_unet_blocks_7_ffn_0.alpha": torch.tensor(1.0),
        },
        "kohya-ab": {
            "diffusion_model.blocks.7.self_attn.q.lora_A.weight": q.down,
            "diffusion_model.blocks.7.self_attn.q.lora_B.weight": q.up,
        },
    }
    parsed = {name: parse_lora_state(state, name) for name, state in forms.items()}
    assert set(parsed["comfy"]) == {"blocks.7.self_attn.q"} and parsed["comfy"]["blocks.7.self_attn.q"].scale == 1 / 8
    assert set(parsed["peft"]) == {"blocks.6.self_attn.o", "blocks.7.ffn.0"}
    assert parsed["peft"]["blocks.7.ffn.0"].scale == 1.0 and parsed["peft"]["blocks.7.ffn.0"].rank == 2
    assert torch.equal(parsed["musubi"]["blocks.7.ffn.0"].up, f.up)
    assert parsed["kohya-ab"]["blocks.7.self_attn.q"].scale == 1.0


def test_reader_errors_are_clear(tmp_path, tiny_state):
    w = random_lora(tiny_state, {"blocks.7.self_attn.q": 4})["blocks.7.self_attn.q"]
    with pytest.raises(MoeError, match="not Wan DiT LoRA weights: text_encoder.foo.lora_down.weight"):
        parse_lora_state({"text_encoder.foo.lora_down.weight": w.down}, "x")
    with pytest.raises(MoeError, match="blocks.7.self_attn.q has no lora_up"):
        parse_lora_state({"diffusion_model.blocks.7.self_attn.q.lora_down.weight": w.down}, "x")
    with pytest.raises(MoeError, match="inconsistent LoRA shapes"):
        parse_lora_state(
            {
                "diffusion_model.blocks.7.self_attn.q.lora_down.weight": w.down,
                "diffusion_model.blocks.7.self_attn.q.lora_up.weight": w.up.T,
            },
            "x",
        )
    dit = tmp_path / "dit.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.zeros(4, 4)}, dit)
    with pytest.raises(MoeError, match="is a Wan DiT checkpoint, but --lora_weight expects a vanilla LoRA"):
        read_lora_file(dit)


def test_fused_low_rank_linear_gradients_match_float64_finite_differences():
    from moe.lora.layer import FusedLowRankLinear

    torch.manual_seed(0)
    b, t, i, o, r = 3, 5, 6, 7, 8
    x = torch.randn(b, t, i, dtype=torch.float64, requires_grad=True)
    w, bias = torch.randn(o, i, dtype=torch.float64), torch.randn(o, dtype=torch.float64)
    down = torch.randn(r, i, dtype=torch.float64, requires_grad=True)
    up = torch.randn(o, r, dtype=torch.float64, requires_grad=True)
    for s in (torch.rand(b, r, dtype=torch.float64), torch.rand(1, r, dtype=torch.float64)):
        s.requires_grad_(True)
        assert torch.autograd.gradcheck(FusedLowRankLinear.apply, (x, w, None, bias, down, up, s))
        assert torch.autograd.gradcheck(FusedLowRankLinear.apply, (x, w, None, None, down, up, s))
        ref = x @ w.T + bias + ((x @ down.T) * s[:, None, :]) @ up.T
        torch.testing.assert_close(FusedLowRankLinear.apply(x, w, None, bias, down, up, s), ref, rtol=1e-12, atol=1e-12)


def test_lora_linear_matches_a_float64_reference():
    """W x + b + m (alpha / r) up(down(x)), outputs and gradients, against float64 by hand."""
    from moe.lora.layer import LoRAAdapter, LoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(32, 48)
    adapter = LoRAAdapter(32, 48, 4, alpha=2.0)
    torch.nn.init.normal_(adapter.lora_up)
    layer = LoRALinear(base, adapter, multiplier=0.7)
    x = torch.randn(2, 5, 32, requires_grad=True)
    layer(x).square().sum().backward()
    ref_inputs = [t.detach().double().requires_grad_(True) for t in (x, adapter.lora_down, adapter.lora_up)]
    x64, down64, up64 = ref_inputs
    ref = x64 @ base.weight.double().T + base.bias.double() + 0.7 * (2.0 / 4) * (x64 @ down64.T) @ up64.T
    ref.square().sum().backward()
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip((x, adapter.lora_down, adapter.lora_up), ref_inputs):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4)
