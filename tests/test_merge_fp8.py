"""`lora-moe merge` into fp8 checkpoints, in their own format: plain float8_e4m3fn weights and
ComfyUI scaled fp8 (per-tensor and per-row scale_weight), single file and sharded.

Tolerance. The merged weight is requantised once: W8' = RNE_e4m3(W' / s') with W' computed in
fp32. Against the float64 reference W_ref = deq(W8, s) + m (alpha/r) up @ down and y = W_ref / s',
every element satisfies

    |W8' - y| <= step(y) / 2 + fp32 slack,    step(y) = 2^(max(floor(log2 |y|), -6) - 3)

i.e. half an E4M3 quantisation step of the new scale (relative 2^-4 for normal values, absolute
2^-10 * s' for subnormal ones); the fp32 slack (2^-21 of |W| + |m (alpha/r)| |up| |down|, over s')
covers the fp32 merge. The new scale itself matches max|W_ref| / 448 (per tensor or per row) to
2^-20 relative, and at least 99% of the elements equal the float64 reference rounded once.
"""

import json

import pytest
import torch
from conftest import random_lora
from fp8_files import fp8_state, is_block_linear_weight, write_fp8_checkpoint
from safetensors.torch import load_file, save_file

import moe.merge as merge_mod
from moe.cli import main
from moe.config.presets import get_preset
from moe.config.targets import TargetSpec
from moe.errors import MoeError
from moe.files.hashing import sha256_file
from moe.lora.file import write_lora_file
from moe.merge import merge_lora_into_checkpoint
from moe.wan.checkpoint import read_checkpoint, resolve_checkpoint, write_checkpoint
from moe.wan.file_kind import classify
from moe.wan.fp8 import FP8_DTYPE, FP8_MAX, SCALED_FP8_MARKER, scale_key_for
from moe.wan.keys import COMFY_PREFIX, KeyFormat

M = 0.75
FORMS = [("plain", "tensor"), ("comfy_scaled", "tensor"), ("comfy_scaled", "row")]
FORM_IDS = ["plain", "scaled-tensor", "scaled-row"]


@pytest.fixture
def lora(tmp_path, tiny_state, tiny_preset):
    spec = TargetSpec()
    modules = random_lora(tiny_state, spec.resolve(tiny_preset.dit.num_layers) | {"blocks.5.ffn.2": 4})
    return write_lora_file(tmp_path / "vanilla_lora.safetensors", modules, spec, tiny_preset.task), modules


def _bf16_rest(state):
    """fp8 releases keep the non-Linear tensors in bf16."""
    return {k: v if is_block_linear_weight(k) else v.to(torch.bfloat16) for k, v in state.items()}


def _deq(state, key):
    """The stored weight of `key` in float64 (times its scale_weight when it has one)."""
    w = state[key].double()
    s = state.get(scale_key_for(key))
    return w * s.double() if s is not None else w


def _e4m3_half_step(y: torch.Tensor) -> torch.Tensor:
    exponent = torch.floor(torch.log2(y.abs().clamp_min(2.0**-30))).clamp_min(-6)
    return 2.0 ** (exponent - 3) / 2


def _check_merged_weight(key, base, merged, pair, scaled):
    w_old = _deq(base, key)
    delta = M * pair.scale * (pair.up.double() @ pair.down.double())
    ref = w_old + delta
    w8 = merged[key]
    assert w8.dtype == FP8_DTYPE and w8.shape == base[key].shape
    if scaled:
        s_new = merged[scale_key_for(key)]
        s_old = base[scale_key_for(key)]
        assert s_new.dtype == torch.float32 and s_new.shape == s_old.shape
        # The new scale: max|W'| / 448 at the file's granularity, so W8' spans the full range.
        amax = ref.abs().amax(dim=1, keepdim=True) if s_new.ndim == 2 else ref.abs().max()
        assert torch.allclose(s_new.double(), amax / FP8_MAX, rtol=2**-20, atol=0), key
        assert not torch.equal(s_new, s_old), key
        top = w8.float().abs().amax(dim=1) if s_new.ndim == 2 else w8.float().abs().max()
        assert (top == FP8_MAX).all(), key
        s = s_new.double()
    else:
        s = torch.ones((), dtype=torch.float64)
    y = ref / s
    slack = 2.0**-21 * (w_old.abs() + M * pair.scale * (pair.up.double().abs() @ pair.down.double().abs())) / s
    err = (w8.double() - y).abs()
    assert (err <= _e4m3_half_step(y.abs() + slack) + slack).all(), (key, float((err - _e4m3_half_step(y)).max()))
    once = y.clamp(-FP8_MAX, FP8_MAX).float().to(FP8_DTYPE)
    assert (w8.view(torch.uint8) == once.view(torch.uint8)).float().mean() >= 0.99, key
    assert not torch.equal(w8.view(torch.uint8), base[key].view(torch.uint8)), key


def _check_bytes(base_path, out, targets: set[str], rewritten: set[str]):
    """Same header layout; every tensor but the target weights and their scales byte-identical."""
    src_layout, dst_layout = resolve_checkpoint(base_path), resolve_checkpoint(out)
    changed = set()
    for src_h, dst_h in zip(src_layout.headers, dst_layout.headers, strict=True):
        assert src_h.tensors == dst_h.tensors  # same keys, order, offsets, dtypes, shapes
        src = src_h.path.read_bytes()[src_h.data_start :]
        dst = dst_h.path.read_bytes()[dst_h.data_start :]
        for key, info in src_h.tensors.items():
            s, e = info.data_offsets
            if src[s:e] != dst[s:e]:
                changed.add(dst_layout.key_format.to_original_key(key))
    assert changed == targets | rewritten


@pytest.mark.parametrize(("form", "scale"), FORMS, ids=FORM_IDS)
@pytest.mark.parametrize("prefix", [COMFY_PREFIX, ""], ids=["comfy-prefix", "no-prefix"])
def test_merge_into_fp8_matches_float64_reference(tmp_path, tiny_state, lora, form, scale, prefix):
    lora_path, modules = lora
    base = fp8_state(_bf16_rest(tiny_state), form, scale, scale_input=True)
    base_path = write_fp8_checkpoint(_bf16_rest(tiny_state), tmp_path / "base.safetensors", form, prefix, scale, scale_input=True)
    before = {p: sha256_file(p) for p in (base_path, lora_path)}
    out = tmp_path / "merged.safetensors"

    result = merge_lora_into_checkpoint(base_path, lora_path, out, lora_multiplier=M, task="tiny-t2v", progress=False)

    assert result.merged_modules == len(modules)
    merged, layout = read_checkpoint(out)
    assert layout.key_format == KeyFormat(style="original", prefix=prefix)
    targets = {m + ".weight" for m in modules}
    for key in targets:
        _check_merged_weight(key, base, merged, modules[key.removesuffix(".weight")], form == "comfy_scaled")
    rewritten = {scale_key_for(k) for k in targets} if form == "comfy_scaled" else set()
    _check_bytes(base_path, out, targets, rewritten)
    assert any(k.endswith(".scale_input") for k in merged) == (form == "comfy_scaled")  # kept byte for byte
    if form == "comfy_scaled":
        assert merged[SCALED_FP8_MARKER].dtype == FP8_DTYPE and merged[SCALED_FP8_MARKER].shape == (0,)
    # Inputs untouched; provenance names the fp8 form and both sha256s.
    assert before == {p: sha256_file(p) for p in before}
    rec = json.loads(layout.headers[0].metadata["lora_moe.merged_from"])[-1]
    assert rec["fp8"] == ("plain" if form == "plain" else "comfy-scaled")
    assert rec.get("fp8_scale") == (None if form == "plain" else scale)
    assert rec["base_sha256"] == before[base_path] and rec["lora_sha256"] == before[lora_path]
    assert rec["multiplier"] == M
    # The output is a merged DiT this tool (and the --task check) reads back.
    assert classify(out).kind == "merged-dit"
    assert "F8_E4M3" in layout.dtypes()


def test_scale_weight_precedes_its_weight_in_the_fixture(tmp_path, tiny_state):
    """The case the pre-pass exists for: ComfyUI-style files store each float32 scale before its
    float8 weight (safetensors orders data by dtype size), so the new scale must be known first."""
    path = write_fp8_checkpoint(tiny_state, tmp_path / "base.safetensors", "comfy_scaled")
    tensors = resolve_checkpoint(path).headers[0].tensors
    key = COMFY_PREFIX + "blocks.7.self_attn.q.weight"
    assert tensors[scale_key_for(key)].data_offsets[1] <= tensors[key].data_offsets[0]


@pytest.mark.parametrize(("form", "scale"), FORMS, ids=FORM_IDS)
def test_sharded_fp8_checkpoint(tmp_path, tiny_state, lora, form, scale):
    """Sharded, with every scale_weight in the last shard, away from its weight."""
    lora_path, modules = lora
    base = fp8_state(tiny_state, form, scale)
    ordered = {k: v for k, v in base.items() if not k.endswith(".scale_weight")} | {k: v for k, v in base.items() if k.endswith(".scale_weight")}
    base_path = write_checkpoint(ordered, tmp_path / "base", KeyFormat(style="original", prefix=COMFY_PREFIX), max_shard_bytes=20_000)
    layout = resolve_checkpoint(base_path)
    assert len(layout.files) > 2
    out = tmp_path / "merged"

    merge_lora_into_checkpoint(base_path, lora_path, out, lora_multiplier=M, task="tiny-t2v", progress=False)

    merged, out_layout = read_checkpoint(out)
    assert out_layout.sharded and [p.name for p in out_layout.files] == [p.name for p in layout.files]
    if form == "comfy_scaled":
        where = {k: h.path.name for h in out_layout.headers for k in h.tensors}
        assert any(where[scale_key_for(COMFY_PREFIX + m + ".weight")] != where[COMFY_PREFIX + m + ".weight"] for m in modules)
    targets = {m + ".weight" for m in modules}
    for key in targets:
        _check_merged_weight(key, base, merged, modules[key.removesuffix(".weight")], form == "comfy_scaled")
    rewritten = {scale_key_for(k) for k in targets} if form == "comfy_scaled" else set()
    _check_bytes(base_path, out, targets, rewritten)
    index = json.loads(next(out.glob("*.index.json")).read_text())
    rec = index["metadata"]["lora_moe.merged_from"][-1]
    assert rec["fp8"] == ("plain" if form == "plain" else "comfy-scaled")
    assert rec["base_shards_sha256"] == {p.name: sha256_file(p) for p in layout.files}


@pytest.mark.parametrize(("form", "scale"), FORMS, ids=FORM_IDS)
def test_fp8_merge_in_small_row_blocks(tmp_path, monkeypatch, tiny_state, lora, form, scale):
    """Row blocks of a few rows, and rows wider than a block (128 > 100 elements), with a small
    copy buffer: the pre-pass and the writing pass
    still agree block by block (each row's scale and rows are sliced right), the result meets
    the same bound, and it differs from the default blocking only where fp32 rounding of the
    rank-r product (BLAS blocking) tips an fp8 rounding (under 1% of the elements)."""
    lora_path, modules = lora
    base = fp8_state(tiny_state, form, scale)
    base_path = write_fp8_checkpoint(tiny_state, tmp_path / "base.safetensors", form, scale=scale)
    merge_lora_into_checkpoint(base_path, lora_path, tmp_path / "a.safetensors", lora_multiplier=M, progress=False)
    monkeypatch.setattr(merge_mod, "MERGE_CHUNK_ELEMENTS", 100)
    monkeypatch.setattr(merge_mod, "COPY_CHUNK_BYTES", 1000)
    merge_lora_into_checkpoint(base_path, lora_path, tmp_path / "b.safetensors", lora_multiplier=M, progress=False)
    a, _ = read_checkpoint(tmp_path / "a.safetensors")
    b, _ = read_checkpoint(tmp_path / "b.safetensors")
    for module, pair in modules.items():
        key = module + ".weight"
        _check_merged_weight(key, base, b, pair, form == "comfy_scaled")
        assert (a[key].view(torch.uint8) != b[key].view(torch.uint8)).float().mean() < 0.01, key


def test_mixed_checkpoint_merges_float_and_fp8_targets(tmp_path, tiny_state, lora):
    """A scaled file may keep some block Linears in bf16: those merge as bf16 weights."""
    lora_path, modules = lora
    base = fp8_state(tiny_state, "comfy_scaled")
    key = "blocks.7.ffn.0.weight"
    base[key] = tiny_state[key].to(torch.bfloat16)
    del base[scale_key_for(key)]
    base_path = write_checkpoint(base, tmp_path / "base.safetensors", KeyFormat(style="original", prefix=COMFY_PREFIX))
    merge_lora_into_checkpoint(base_path, lora_path, tmp_path / "m.safetensors", lora_multiplier=M, progress=False)
    merged = load_file(tmp_path / "m.safetensors")
    pair = modules["blocks.7.ffn.0"]
    ref = tiny_state[key].to(torch.bfloat16).double() + M * pair.scale * (pair.up.double() @ pair.down.double())
    assert merged[COMFY_PREFIX + key].dtype == torch.bfloat16
    assert torch.allclose(merged[COMFY_PREFIX + key].double(), ref, rtol=2**-8, atol=1e-6)
    _check_merged_weight(
        "blocks.7.self_attn.q.weight",
        base,
        {k.removeprefix(COMFY_PREFIX): v for k, v in merged.items()},
        modules["blocks.7.self_attn.q"],
        scaled=True,
    )


# ---------------------------------------------------------------------------------------------
# Refusals: up front, one line naming the tensor and the supported forms, nothing written.


DIM = get_preset("tiny-t2v").dit.dim  # blocks.7.self_attn.q is [DIM, DIM]


def _tamper_e5m2(state):
    state["blocks.7.self_attn.q.weight"] = state["blocks.7.self_attn.q.weight"].float().to(torch.float8_e5m2)


def _tamper_int8(state):
    state["blocks.7.self_attn.q.weight"] = torch.zeros(DIM, DIM, dtype=torch.int8)


def _tamper_scale_dtype(state):
    state["blocks.7.self_attn.q.scale_weight"] = state["blocks.7.self_attn.q.scale_weight"].to(torch.bfloat16)


def _tamper_scale_shape(state):
    state["blocks.7.self_attn.q.scale_weight"] = torch.ones(1, DIM)


def _tamper_missing_scale(state):
    del state["blocks.7.self_attn.q.scale_weight"]


def _tamper_scale_on_bf16(state):
    state["blocks.7.self_attn.q.weight"] = torch.zeros(DIM, DIM, dtype=torch.bfloat16)


REFUSALS = {
    "e5m2": ("plain", _tamper_e5m2, "is stored as F8_E5M2"),
    "int8": ("plain", _tamper_int8, "is stored as I8"),
    "scale-dtype": ("comfy_scaled", _tamper_scale_dtype, f"scale_weight is BF16 [], expected F32 [] or [{DIM}, 1]"),
    "scale-shape": ("comfy_scaled", _tamper_scale_shape, f"scale_weight is F32 [1, {DIM}], expected F32 [] or [{DIM}, 1]"),
    "missing-scale": (
        "comfy_scaled",
        _tamper_missing_scale,
        "is ComfyUI scaled fp8 but has no model.diffusion_model.blocks.7.self_attn.q.scale_weight",
    ),
    "scale-on-bf16": ("comfy_scaled", _tamper_scale_on_bf16, "is stored as BF16 but has a model.diffusion_model.blocks.7.self_attn.q.scale_weight"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refuses_unsupported_storage(tmp_path, capsys, tiny_state, lora, case):
    form, tamper, reason = REFUSALS[case]
    state = fp8_state(tiny_state, form)
    tamper(state)
    base_path = tmp_path / "base.safetensors"
    save_file({COMFY_PREFIX + k: v.contiguous() for k, v in state.items()}, base_path)
    out = tmp_path / "o.safetensors"
    with pytest.raises(MoeError) as e:
        merge_lora_into_checkpoint(base_path, lora[0], out, progress=False)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("cannot merge into model.diffusion_model.blocks.7.self_attn.q.weight: "), msg
    assert reason in msg, msg
    for supported in ("bf16/fp16/fp32", "plain float8_e4m3fn", "ComfyUI scaled fp8", "scale_weight per Linear"):
        assert supported in msg, msg
    # Through the CLI: exit 2, one line, no traceback, nothing left behind.
    with pytest.raises(SystemExit) as exit_:
        main(["merge", "--quiet", "--dit", str(base_path), "--lora_weight", str(lora[0]), "--save_merged_model", str(out)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and reason in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_fp8_writer_forms(tmp_path, tiny_state):
    """The fixture writer: which tensors become fp8, the scales' shapes, the ComfyUI marker."""
    for form, scale in FORMS:
        path = write_fp8_checkpoint(tiny_state, tmp_path / f"{form}-{scale}.safetensors", form, scale=scale)
        sd = load_file(path)
        for key, w in tiny_state.items():
            stored = sd[COMFY_PREFIX + key]
            assert stored.dtype == (FP8_DTYPE if is_block_linear_weight(key) else w.dtype), key
            scale_t = sd.get(COMFY_PREFIX + scale_key_for(key)) if key.endswith(".weight") else None
            if form == "plain" or not is_block_linear_weight(key):
                assert scale_t is None, key
            else:
                assert scale_t.dtype == torch.float32
                assert scale_t.shape == ((w.shape[0], 1) if scale == "row" else ()), key
                assert torch.allclose(stored.float() * scale_t, w, rtol=2**-4, atol=float(scale_t.max()) * 2**-9), key
        marker = sd.get(COMFY_PREFIX + SCALED_FP8_MARKER)
        assert (marker is None) == (form == "plain")
        if marker is not None:
            assert marker.dtype == FP8_DTYPE and marker.shape == (0,)
    assert sum(1 for k in tiny_state if is_block_linear_weight(k)) == 8 * 10  # 8 blocks x (4 + 4 + 2)
