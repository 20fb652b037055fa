"""Key mapping between original and diffusers styles, and the LoRA target spec."""

import pytest
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

from moe.config.presets import PRESETS
from moe.config.targets import TargetSpec, check_same_targets
from moe.errors import MoeError
from moe.wan.checkpoint import expected_shapes
from moe.wan.keys import (
    KeyFormat,
    detect_key_format,
    diffusers_to_original,
    module_to_diffusers,
    original_to_diffusers,
)


def test_original_to_diffusers_agrees_with_diffusers_converter(tiny_state):
    ours = {original_to_diffusers(k) for k in tiny_state}
    theirs = set(convert_wan_transformer_to_diffusers({k: v.clone() for k, v in tiny_state.items()}))
    assert ours == theirs


@pytest.mark.parametrize("task", list(PRESETS))
def test_mapping_round_trips_every_key_of_every_preset(task):
    keys = expected_shapes(PRESETS[task].dit)
    assert None not in keys
    for k in keys:
        assert diffusers_to_original(original_to_diffusers(k)) == k


def test_specific_names():
    assert original_to_diffusers("blocks.3.norm3.weight") == "blocks.3.norm2.weight"
    assert original_to_diffusers("blocks.3.modulation") == "blocks.3.scale_shift_table"
    assert original_to_diffusers("head.modulation") == "scale_shift_table"
    assert original_to_diffusers("blocks.0.self_attn.o.bias") == "blocks.0.attn1.to_out.0.bias"
    assert module_to_diffusers("blocks.37.ffn.0") == "blocks.37.ffn.net.0.proj"
    assert original_to_diffusers("img_emb.proj.0.weight") is None


def test_detect_key_format():
    assert detect_key_format(["blocks.0.self_attn.q.weight"]) == KeyFormat(style="original")
    assert detect_key_format(["model.diffusion_model.blocks.0.self_attn.q.weight"]) == KeyFormat(style="original", prefix="model.diffusion_model.")
    assert detect_key_format(["blocks.0.attn1.to_q.weight"]) == KeyFormat(style="diffusers")
    assert detect_key_format(["encoder.layer.0.weight"]) is None


def test_default_target_spec_is_the_reference_on_40_blocks():
    modules = TargetSpec().resolve(40)
    attn = {m: r for m, r in modules.items() if "self_attn" in m}
    ffn = {m: r for m, r in modules.items() if "ffn" in m}
    assert sorted({int(m.split(".")[1]) for m in attn}) == list(range(32, 40))
    assert sorted({int(m.split(".")[1]) for m in ffn}) == [37, 38, 39]
    assert all(r == 8 for m, r in attn.items() if m.endswith(".q"))
    assert all(r == 4 for m, r in attn.items() if not m.endswith(".q"))
    assert set(ffn.values()) == {4} and all(m.endswith("ffn.0") for m in ffn)
    assert len(modules) == 8 * 4 + 3


def test_target_spec_scales_with_depth():
    assert sorted({int(m.split(".")[1]) for m in TargetSpec().resolve(30) if "attn" in m}) == list(range(24, 30))
    tiny = TargetSpec().resolve(8)
    assert sorted({int(m.split(".")[1]) for m in tiny if "attn" in m}) == [6, 7]
    assert [m for m in tiny if "ffn" in m] == ["blocks.7.ffn.0"]


def test_from_flags_matches_reference_and_json_round_trip():
    spec = TargetSpec.from_flags(network_dim=4, network_alpha=1.0, rank_q=8, rank_kvo=4)
    assert spec.resolve(40) == TargetSpec().resolve(40)
    assert TargetSpec.from_json(spec.to_json()) == spec
    wide = TargetSpec.from_flags(rank_q=16, rank_k=2, rank_ffn=8, cross_attn=True)
    r = wide.resolve(40)
    assert r["blocks.39.self_attn.q"] == 16 and r["blocks.39.self_attn.k"] == 2
    assert r["blocks.39.cross_attn.q"] == 16 and r["blocks.39.ffn.0"] == 8


def test_target_mismatch_names_both_specs():
    a = TargetSpec().resolve(8)
    b = TargetSpec.from_flags(rank_q=4).resolve(8)
    with pytest.raises(MoeError, match=r"stage 1 has .*self_attn.q r8.* but stage 2 has .*self_attn.q r4"):
        check_same_targets(a, b, "stage 1", "stage 2")
