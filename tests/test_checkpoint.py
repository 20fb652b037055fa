"""Checkpoint formats: detection, bit-exact round trips, key-set validation, loading into diffusers."""

import json

import pytest
import torch

from moe.config.presets import get_preset
from moe.errors import MoeError
from moe.wan.checkpoint import (
    load_transformer,
    read_checkpoint,
    resolve_checkpoint,
    transformer_state_dict,
    write_checkpoint,
)
from moe.wan.keys import COMFY_PREFIX, KeyFormat

FORMATS = [
    KeyFormat(style="original"),
    KeyFormat(style="original", prefix=COMFY_PREFIX),
    KeyFormat(style="diffusers"),
]
DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _write(tmp_path, state, fmt, sharded, dtype):
    state = {k: v.to(dtype) for k, v in state.items()}
    name = f"{fmt.style}-{bool(fmt.prefix)}-{sharded}-{str(dtype)[6:]}"
    out = tmp_path / (name if sharded else name + ".safetensors")
    write_checkpoint(state, out, fmt, max_shard_bytes=30_000 if sharded else None)
    return out, state


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.describe())
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(tmp_path, tiny_state, tiny_preset, fmt, sharded, dtype):
    out, state = _write(tmp_path, tiny_state, fmt, sharded, dtype)
    layout = resolve_checkpoint(out)
    assert layout.key_format == fmt and layout.sharded == sharded
    back, _ = read_checkpoint(out, tiny_preset)
    assert back.keys() == state.keys()
    assert all(back[k].dtype == dtype and torch.equal(back[k], state[k]) for k in state)
    model = load_transformer(out, tiny_preset)
    loaded = transformer_state_dict(model)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_sharded_checkpoint_found_from_folder_index_or_any_shard(tmp_path, tiny_state):
    out, _ = _write(tmp_path, tiny_state, FORMATS[0], True, torch.float32)
    index = next(out.glob("*.index.json"))
    shards = sorted(out.glob("*-of-*.safetensors"))
    assert len(shards) > 2
    for p in (out, index, shards[-1]):
        layout = resolve_checkpoint(p)
        assert layout.files == shards and layout.index == index
    weight_map = json.loads(index.read_text())["weight_map"]
    assert set(weight_map) == {FORMATS[0].to_file_key(k) for k in tiny_state}


def test_loaded_model_matches_source_model_output(tmp_path, tiny_state, tiny_preset):
    out, _ = _write(tmp_path, tiny_state, FORMATS[2], False, torch.float32)
    model = load_transformer(out, tiny_preset)
    from moe.wan.checkpoint import build_random_transformer

    ref = build_random_transformer(tiny_preset, seed=0)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 16, 3, 8, 8, generator=g), torch.randn(1, 5, 32, generator=g)
    t = torch.tensor([700.0])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, text).sample, ref(x, t, text).sample, rtol=1e-5, atol=1e-6)


def test_bf16_load_keeps_fp32_modules(tmp_path, tiny_state, tiny_preset):
    out, _ = _write(tmp_path, tiny_state, FORMATS[0], False, torch.float32)
    model = load_transformer(out, tiny_preset, dtype=torch.bfloat16)
    assert model.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.dtype == torch.float32


def test_wrong_preset_is_a_clear_error_that_guesses_the_right_one(tmp_path, tiny_state):
    out, _ = _write(tmp_path, tiny_state, FORMATS[0], False, torch.float32)
    with pytest.raises(MoeError) as e:
        read_checkpoint(out, get_preset("tiny-i2v"))
    msg = str(e.value)
    assert "does not match task tiny-i2v" in msg
    dim = get_preset("tiny-t2v").dit.dim
    assert f"patch_embedding.weight ({dim}, 16, 1, 2, 2) != ({dim}, 36, 1, 2, 2)" in msg
    assert "preset tiny-t2v" in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_state, tiny_preset):
    broken = {k: v for k, v in tiny_state.items() if k != "blocks.3.ffn.2.weight"}
    broken["blocks.3.extra.weight"] = torch.zeros(2)
    out = write_checkpoint(broken, tmp_path / "broken.safetensors")
    with pytest.raises(MoeError, match=r"missing keys: blocks\.3\.ffn\.2\.weight.*unexpected keys: blocks\.3\.extra\.weight"):
        load_transformer(out, tiny_preset)


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(MoeError, match="not a safetensors file"):
        resolve_checkpoint(junk)
    with pytest.raises(MoeError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MoeError, match="holds 0 .safetensors files"):
        resolve_checkpoint(empty)
