"""LoRA files diffusers saved itself (PEFT header): our reader and merge against diffusers' own
`fuse_lora`, and the header's refusals."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors.torch import load_file, save_file

from moe.errors import MoeError
from moe.inspect import inspect_report
from moe.lora.file import read_lora_file
from moe.lora.peft_header import HEADER_KEY, pattern_key
from moe.merge import merge_lora_into_checkpoint
from moe.wan.checkpoint import build_random_transformer, transformer_state_dict, write_checkpoint
from moe.wan.keys import diffusers_to_original

TARGETS = [
    "blocks.6.attn1.to_q",
    "blocks.6.attn1.to_k",
    "blocks.6.ffn.net.0.proj",
    "blocks.7.attn1.to_q",
    "blocks.7.attn1.to_v",
    "blocks.7.attn2.to_k",
    "blocks.7.ffn.net.0.proj",
]
# Each case: LoraConfig options, how diffusers saves it, and (rank, scale) per module worked out
# by hand from peft's rules. alpha_pattern is saved sorted (json sort_keys), so for
# blocks.6.ffn.net.0.proj `blocks\.6\..*` comes before `ffn.net.0.proj` and wins.
CASES = {
    "alpha-half-of-rank": (
        dict(r=4, lora_alpha=2),
        "save_lora_weights",
        {m: (4, 0.5) for m in TARGETS},
    ),
    "rank-and-alpha-patterns": (
        dict(r=4, lora_alpha=2, rank_pattern={"attn1.to_q": 8}, alpha_pattern={"ffn.net.0.proj": 0.5, r"blocks\.6\..*": 3.0}),
        "save_lora_weights",
        {
            "blocks.6.attn1.to_q": (8, 3 / 8),
            "blocks.6.attn1.to_k": (4, 3 / 4),
            "blocks.6.ffn.net.0.proj": (4, 3 / 4),
            "blocks.7.attn1.to_q": (8, 2 / 8),
            "blocks.7.attn1.to_v": (4, 2 / 4),
            "blocks.7.attn2.to_k": (4, 2 / 4),
            "blocks.7.ffn.net.0.proj": (4, 0.5 / 4),
        },
    ),
    "rslora": (
        dict(r=4, lora_alpha=3, use_rslora=True),
        "save_lora_adapter",
        {m: (4, 3 / math.sqrt(4)) for m in TARGETS},
    ),
    "rslora-rank-pattern": (
        dict(r=4, lora_alpha=3, use_rslora=True, rank_pattern={"attn1.to_q": 8}),
        "save_lora_adapter",
        {m: (8, 3 / math.sqrt(8)) if m.endswith("to_q") else (4, 3 / 2) for m in TARGETS},
    ),
}


def _diffusers_saved_lora(tmp_path, preset, options: dict, save: str):
    """A LoRA trained nowhere but saved by diffusers itself: random (seeded) A and B."""
    model = build_random_transformer(preset, seed=0)
    model.add_adapter(LoraConfig(target_modules=TARGETS, init_lora_weights=False, **options))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    folder = tmp_path / "saved"
    if save == "save_lora_weights":  # what diffusers' training scripts do
        WanPipeline.save_lora_weights(
            folder,
            transformer_lora_layers=get_peft_model_state_dict(model),
            transformer_lora_adapter_metadata=model.peft_config["default"].to_dict(),
        )
    else:
        model.save_lora_adapter(folder)
    return folder / "pytorch_lora_weights.safetensors"


def _diffusers_fused(path, preset, save: str) -> dict[str, torch.Tensor]:
    """diffusers' own load + fuse_lora + unload, on the base weights; original keys."""
    model = build_random_transformer(preset, seed=0)
    if save == "save_lora_weights":
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=FlowMatchEulerDiscreteScheduler())
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora(components=["transformer"])
        pipe.unload_lora_weights()
    else:
        # save_lora_adapter writes bare keys, which only load_lora_adapter(prefix=None) reads. Given
        # a bare file path without weight_name/use_safetensors, diffusers 0.42 loads it through its
        # pickle-or-safetensors fallback and skips the header (lora_base.py _fetch_state_dict);
        # the documented folder + weight_name call reads it.
        model.load_lora_adapter(str(path.parent), weight_name=path.name, prefix=None)
        model.fuse_lora()
        model.unload_lora()
    return transformer_state_dict(model)


@pytest.mark.parametrize("case", CASES)
def test_merge_matches_diffusers_fuse_lora_on_files_diffusers_saved(tmp_path, tiny_preset, case):
    options, save, expected = CASES[case]
    lora_path = _diffusers_saved_lora(tmp_path, tiny_preset, options, save)
    lora = read_lora_file(lora_path)
    assert HEADER_KEY in lora.metadata and lora.form == ("peft" if save == "save_lora_weights" else "peft-bare")

    base = transformer_state_dict(build_random_transformer(tiny_preset, seed=0))
    dit = write_checkpoint(base, tmp_path / "dit.safetensors")
    merged = load_file(merge_lora_into_checkpoint(dit, lora_path, tmp_path / "merged.safetensors", progress=False).output)
    fused = _diffusers_fused(lora_path, tiny_preset, save)

    lora_state = load_file(lora_path)
    prefix = "transformer." if save == "save_lora_weights" else ""
    for module, (rank, scale) in expected.items():
        key = diffusers_to_original(module + ".weight")
        down, up = lora_state[f"{prefix}{module}.lora_A.weight"].double(), lora_state[f"{prefix}{module}.lora_B.weight"].double()
        assert down.shape[0] == rank
        reference = base[key].double() + scale * up @ down  # float64, scale from peft's rules by hand
        # Tolerances: one fp32 rounding of W + s*BA (|W'| < 2) on both sides.
        torch.testing.assert_close(merged[key].double(), reference, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged[key], fused[key], rtol=0, atol=2e-6)
        assert (merged[key] - base[key]).abs().max() > 1e-2  # the LoRA does something
    untouched = set(base) - {diffusers_to_original(m + ".weight") for m in expected}
    assert all(torch.equal(merged[k], base[k]) and torch.equal(fused[k], base[k]) for k in untouched)


def test_reader_scale_and_inspect_follow_the_header(tmp_path, tiny_preset):
    """Generation and stage-2 checks read through read_lora_file: same alphas, ranks from tensors."""
    options, save, expected = CASES["rank-and-alpha-patterns"]
    lora = read_lora_file(_diffusers_saved_lora(tmp_path, tiny_preset, options, save))
    assert lora.form == "peft"
    for module, (rank, scale) in expected.items():
        w = lora.modules[diffusers_to_original(module + ".weight")[: -len(".weight")]]
        assert (w.rank, w.scale) == (rank, pytest.approx(scale, rel=1e-12))
    report = inspect_report(tmp_path / "saved" / "pytorch_lora_weights.safetensors")
    assert "alpha 0.5, 2, 3" in report and "form: peft" in report and HEADER_KEY in report


def test_pattern_matching_is_peft_s_own():
    patterns = ["attn1.to_q", r"blocks\.6\..*", "^blocks.7.ffn.net.0.proj", "to_out.0", "ffn"]
    modules = [
        "blocks.6.attn1.to_q",
        "blocks.16.attn1.to_q",
        "blocks.6.ffn.net.2",
        "blocks.7.ffn.net.0.proj",
        "blocks.17.ffn.net.0.proj",
        "blocks.3.attn1.to_out.0",
        "blocks.3.attn2.to_k",
        "blocks.3.ffn.net.2",
    ]
    for module in modules:
        theirs = get_pattern_key(patterns, module)
        assert pattern_key(patterns, module) == (theirs if theirs != module else None), module


def _with_header(tmp_path, state, header: dict, name="l.safetensors"):
    path = tmp_path / name
    save_file(state, path, metadata={HEADER_KEY: json.dumps(header)})
    return path


@pytest.mark.parametrize(
    "header, extra, message",
    [
        ({"r": 4, "lora_alpha": 4, "use_dora": True}, {}, "use_dora=True"),
        ({"r": 4, "lora_alpha": 4, "layers_to_transform": 0}, {}, "layers_to_transform=0"),
        ({"r": 8, "lora_alpha": 4}, {}, "gives blocks.7.attn1.to_q rank 8 but the tensors have rank 4"),
        ({"r": 4, "lora_alpha": 4, "target_modules": ["to_k"]}, {}, "does not target blocks.7.attn1.to_q"),
        (
            {"r": 4, "lora_alpha": 4},
            {"transformer.blocks.7.attn1.to_q.alpha": torch.tensor(4.0)},
            "both .alpha tensors and a lora_adapter_metadata header",
        ),
    ],
)
def test_header_refusals(tmp_path, header, extra, message):
    state = {
        "transformer.blocks.7.attn1.to_q.lora_A.weight": torch.randn(4, 32),
        "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.randn(32, 4),
    } | extra
    with pytest.raises(MoeError, match=re.escape(message)):
        read_lora_file(_with_header(tmp_path, state, {"transformer." + k: v for k, v in header.items()}))


def test_merge_cli_refuses_a_header_it_cannot_merge_in_one_line(tmp_path, tiny_state):
    import subprocess
    import sys

    state = {"transformer.blocks.7.attn1.to_q.lora_A.weight": torch.randn(4, 32), "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.randn(32, 4)}
    lora = _with_header(tmp_path, state, {"transformer.r": 4, "transformer.use_dora": True})
    dit = write_checkpoint(tiny_state, tmp_path / "dit.safetensors")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe",
            "merge",
            "--dit",
            str(dit),
            "--lora_weight",
            str(lora),
            "--save_merged_model",
            str(tmp_path / "out.safetensors"),
            "--quiet",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert "use_dora=True" in done.stderr and not (tmp_path / "out.safetensors").exists()
