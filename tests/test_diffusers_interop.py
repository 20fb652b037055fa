"""Our LoRA file in diffusers' own Wan2.2 pipeline: `load_lora_weights` into both experts."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

from moe.lora.file import read_lora_file
from moe.lora.inject import adapters_from_weights, inject_lora
from moe.tiny.components import build_tiny_text_encoder, build_tiny_vae
from moe.wan.checkpoint import build_random_transformer


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
def test_our_lora_file_loads_in_diffusers_into_both_experts(tiny_preset, tiny_lora_file, multiplier):
    lora_path, modules = tiny_lora_file
    text_encoder, tokenizer = build_tiny_text_encoder(tiny_preset, seed=0)
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=build_tiny_vae(tiny_preset, seed=0),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=tiny_preset.sample_shift),
        transformer=build_random_transformer(tiny_preset, seed=0),  # high-noise expert
        transformer_2=build_random_transformer(tiny_preset, seed=1),  # low-noise expert
        boundary_ratio=tiny_preset.boundary,
    )
    pipe.load_lora_weights(str(lora_path), adapter_name="stage1")
    pipe.load_lora_weights(str(lora_path), adapter_name="stage1", load_into_transformer_2=True)
    pipe.set_adapters(["stage1"], adapter_weights=[multiplier])

    lora = read_lora_file(lora_path)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 6, 32, generator=g)
    t = torch.tensor([950.0])
    for name, seed in (("transformer", 0), ("transformer_2", 1)):
        ours = build_random_transformer(tiny_preset, seed=seed)
        plain = build_random_transformer(tiny_preset, seed=seed)
        inject_lora(ours, adapters_from_weights(ours, lora.modules), multiplier=multiplier)
        with torch.no_grad():
            theirs_out = getattr(pipe, name)(x, t, text).sample
            ours_out = ours(x, t, text).sample
            plain_out = plain(x, t, text).sample
        assert (theirs_out - plain_out).abs().max() > 1e-3, f"diffusers did not apply the LoRA to {name}"
        torch.testing.assert_close(theirs_out, ours_out, rtol=1e-5, atol=1e-5)
