"""fp8 storage of frozen DiT weights (`--fp8_base`, `--fp8_scaled`): quantisation error bounds
against float64, the fp8 Linear's forward and backward, the adapters on an fp8 base (gradients
checked in float64), and fp8 models loaded from checkpoints.

E4M3 keeps 3 mantissa bits: a normal value rounds with a relative error of at most 2^-4, a
subnormal one (below 2^-6 of the scale) with an absolute error of at most 2^-10 of the scale."""

import copy

import pytest
import torch
from torch import nn

from moe.config.presets import get_preset
from moe.lora.layer import LoRAAdapter, LoRALinear
from moe.lora_moe.layer import LoRAMoEAdapter, LoRAMoELinear
from moe.lora_moe.routing import RoutingState
from moe.wan.checkpoint import build_random_transformer, load_transformer, transformer_state_dict, write_checkpoint
from moe.wan.fp8 import (
    FP8_DTYPE,
    Fp8Linear,
    convert_to_fp8,
    dequantize_weight,
    linear_weight_bytes,
    quantize_weight,
)


def _weight(out=48, inp=64, seed=0) -> torch.Tensor:
    """Rows of very different magnitudes, as real layers have (1e-3 to 1)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=torch.float64) * torch.logspace(-3, 0, out, dtype=torch.float64)[:, None]


def _bound(w: torch.Tensor, scale) -> torch.Tensor:
    return torch.maximum(w.abs() * 2**-4, torch.as_tensor(scale, dtype=torch.float64) * 2**-10)


@pytest.mark.parametrize("scaled", [False, True])
def test_quantisation_error_is_within_half_an_e4m3_step(scaled):
    w = _weight()
    w8, scale = quantize_weight(w, scaled)
    assert w8.dtype == FP8_DTYPE and (scale is None) == (not scaled)
    back = dequantize_weight(w8, scale, torch.float64)
    bound = _bound(w, scale.double() if scaled else 1.0)
    assert bool(((back - w).abs() <= bound * (1 + 1e-6)).all())
    if scaled:  # each row uses the whole E4M3 range: its largest element maps to 448
        assert torch.allclose(w8.float().abs().amax(dim=1), torch.full((w.shape[0],), 448.0))


def test_row_scales_beat_a_plain_cast_on_small_rows():
    w = _weight()
    errors = {}
    for scaled in (False, True):
        back = dequantize_weight(*quantize_weight(w, scaled), torch.float64)
        errors[scaled] = (back - w).norm(dim=1) / w.norm(dim=1)
    # The smallest rows (1e-3) fall into E4M3's subnormals without a scale.
    assert errors[True].max() < 0.05 < errors[False][:4].min()


def _fp8_linear(scaled: bool, dtype=torch.float64, bias=True, seed=0) -> tuple[Fp8Linear, torch.Tensor]:
    w = _weight(seed=seed)
    layer = Fp8Linear(w.shape[1], w.shape[0], bias, compute_dtype=dtype)
    layer.set_weight(*quantize_weight(w, scaled))
    if bias:
        layer.bias = nn.Parameter(torch.linspace(-1, 1, w.shape[0], dtype=dtype), requires_grad=False)
    return layer, layer.weight_in(torch.float64)


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_linear_forward_and_backward_match_the_dequantised_weight(scaled):
    layer, w = _fp8_linear(scaled)
    x = torch.randn(3, 5, w.shape[1], dtype=torch.float64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = ref_x @ w.T + layer.bias
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=1e-12)
    # Between forward and backward only the fp8 weight (and its scale) is kept, never a dequantised copy.
    assert not [t for t in saved if t.shape == w.shape and t.dtype != FP8_DTYPE]
    assert [t for t in saved if t.dtype == FP8_DTYPE]


def test_fp8_linear_computes_in_autocast_dtype():
    layer, _ = _fp8_linear(True, dtype=torch.float32)
    x = torch.randn(2, 64)
    assert layer(x).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("scaled", [False, True])
def test_lora_on_an_fp8_base_gradchecks_in_float64(scaled):
    torch.manual_seed(0)
    base, w = _fp8_linear(scaled)
    adapter = LoRAAdapter(base.in_features, base.out_features, rank=3, alpha=2.0).double()
    with torch.no_grad():
        adapter.lora_up.normal_()
    layer = LoRALinear(base, adapter, multiplier=0.7)
    x = torch.randn(2, 4, base.in_features, dtype=torch.float64, requires_grad=True)
    ref = x @ w.T + base.bias + 0.7 * (2.0 / 3) * (x @ adapter.lora_down.T) @ adapter.lora_up.T
    torch.testing.assert_close(layer(x), ref, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x, d, u: _with(adapter, d, u, lambda: layer(x)),
        (x, adapter.lora_down.detach().clone().requires_grad_(True), adapter.lora_up.detach().clone().requires_grad_(True)),
    )


def _with(adapter, down, up, fn):
    """Run fn with the adapter's parameters replaced by the given tensors (for gradcheck)."""
    old = adapter.lora_down, adapter.lora_up
    del adapter.lora_down, adapter.lora_up
    adapter.lora_down, adapter.lora_up = down, up
    try:
        return fn()
    finally:
        del adapter.lora_down, adapter.lora_up
        adapter.lora_down, adapter.lora_up = old


def test_lora_moe_on_an_fp8_base_matches_float64():
    torch.manual_seed(0)
    base, w = _fp8_linear(True)
    adapter = LoRAMoEAdapter(base.in_features, base.out_features, rank=2, alpha=1.0, num_experts=4).double()
    with torch.no_grad():
        adapter.lora_up.normal_()
    state = RoutingState()
    gates = torch.tensor([[0.6, 0.4, 0.0, 0.0], [0.0, 0.0, 0.3, 0.7]], dtype=torch.float64)
    state.set(gates)
    layer = LoRAMoELinear(base, adapter, state)
    x = torch.randn(2, 5, base.in_features, dtype=torch.float64)
    h = (x @ adapter.lora_down.T) * (gates.repeat_interleave(2, dim=-1) * 0.5)[:, None, :]
    torch.testing.assert_close(layer(x), x @ w.T + base.bias + h @ adapter.lora_up.T, rtol=1e-12, atol=1e-12)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_preset):
    model = build_random_transformer(tiny_preset, seed=0)
    path = tmp_path_factory.mktemp("fp8") / "dit.safetensors"
    write_checkpoint(transformer_state_dict(model), path)
    return model, path


def _forward(model, preset, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, preset.dit.in_channels, 2, 8, 8, generator=g).to(dtype)
    text = torch.randn(1, 8, preset.dit.text_dim, generator=g).to(dtype)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([700.0]), encoder_hidden_states=text, return_dict=False)[0]


@pytest.mark.parametrize("mode", ["fp8", "fp8_scaled"])
def test_loaded_fp8_model_keeps_only_block_linears_in_fp8(tiny_file, tiny_preset, mode):
    model, path = tiny_file
    fp8 = load_transformer(path, tiny_preset, fp8=mode)
    linears = [n for n, m in fp8.named_modules() if isinstance(m, nn.Linear)]
    for name in linears:
        layer = fp8.get_submodule(name)
        assert isinstance(layer, Fp8Linear) == name.startswith("blocks."), name
        if isinstance(layer, Fp8Linear):
            assert layer.weight.dtype == FP8_DTYPE and layer.compute_dtype == torch.float32
            assert (layer.scale_weight is not None) == (mode == "fp8_scaled")
    # Norms, modulation tables, embeddings and the head keep the file's dtype.
    assert fp8.scale_shift_table.dtype == fp8.patch_embedding.weight.dtype == fp8.proj_out.weight.dtype == torch.float32
    assert fp8.blocks[0].scale_shift_table.dtype == torch.float32
    # fp8 weights: a quarter of the fp32 bytes (plus 4 bytes per row for scales).
    rows = sum(fp8.get_submodule(n).out_features for n in linears if n.startswith("blocks."))
    assert linear_weight_bytes(fp8) == linear_weight_bytes(model) // 4 + (4 * rows if mode == "fp8_scaled" else 0)
    # Same quantisation as converting the model in memory.
    converted = convert_to_fp8(build_random_transformer(tiny_preset, seed=0), scaled=mode == "fp8_scaled")
    assert converted == sum(1 for n in linears if n.startswith("blocks."))


@pytest.mark.parametrize("mode", ["fp8", "fp8_scaled"])
def test_fp8_model_output_is_close_to_the_full_precision_one(tiny_file, tiny_preset, mode):
    model, path = tiny_file
    ref = _forward(copy.deepcopy(model).double(), tiny_preset, torch.float64).float()
    out = _forward(load_transformer(path, tiny_preset, fp8=mode), tiny_preset)
    rel = ((out - ref).norm() / ref.norm()).item()
    # Measured: 0.0086 (per-row scales) and 0.012 (plain cast: the tiny model's std-0.02 weights
    # sit low in E4M3's range, partly among its subnormals); bound: 1.5x that.
    assert rel < (0.013 if mode == "fp8_scaled" else 0.019), rel
    assert rel > 1e-5  # it really is quantised


# ---------------------------------------------------------------------------------------------
# fp8 checkpoints as inputs: plain float8_e4m3fn and ComfyUI's scaled form.


@pytest.mark.parametrize("form, scale", [("plain", "tensor"), ("comfy_scaled", "tensor"), ("comfy_scaled", "row")])
def test_fp8_checkpoints_load_as_fp8_or_dequantised(tiny_file, tiny_preset, tmp_path, form, scale):
    from fp8_files import fp8_state, write_fp8_checkpoint

    model, _ = tiny_file
    state = transformer_state_dict(model)
    path = write_fp8_checkpoint(state, tmp_path / "dit_fp8.safetensors", form, scale=scale)
    stored = fp8_state(state, form, scale)
    key = "blocks.2.ffn.0.weight"
    expected = dequantize_weight(stored[key], stored.get(key.replace(".weight", ".scale_weight")), torch.float64)

    # --fp8_base: the stored bytes are kept as they are, with the file's scale.
    kept = load_transformer(path, tiny_preset, fp8="fp8")
    layer = kept.blocks[2].ffn.net[0].proj
    assert isinstance(layer, Fp8Linear) and torch.equal(layer.weight.view(torch.uint8), stored[key].view(torch.uint8))
    torch.testing.assert_close(layer.weight_in(torch.float64), expected, rtol=0, atol=0)
    assert layer.compute_dtype == torch.bfloat16  # an fp8 file computes in bf16 unless a dtype is asked for

    # Without it: dequantised once to the asked dtype, a plain Linear.
    plain = load_transformer(path, tiny_preset, dtype=torch.float32)
    linear = plain.blocks[2].ffn.net[0].proj
    assert type(linear) is nn.Linear and linear.weight.dtype == torch.float32
    torch.testing.assert_close(linear.weight.double(), expected, rtol=2**-23, atol=0)  # one fp32 rounding of W8 x scale
    # Non-block tensors are read unchanged.
    assert torch.equal(plain.patch_embedding.weight, model.patch_embedding.weight)
    kept32 = load_transformer(path, tiny_preset, dtype=torch.float32, fp8="fp8")
    torch.testing.assert_close(_forward(kept32, tiny_preset), _forward(plain, tiny_preset), rtol=1e-5, atol=1e-6)


def test_fp8_checkpoint_passes_the_task_check_and_a_wrong_task_is_named(tiny_file, tmp_path):
    from fp8_files import write_fp8_checkpoint

    from moe.config.presets import get_preset
    from moe.errors import MoeError
    from moe.wan.checkpoint import check_checkpoint_task

    model, _ = tiny_file
    path = write_fp8_checkpoint(transformer_state_dict(model), tmp_path / "dit.safetensors", "comfy_scaled", scale_input=True)
    check_checkpoint_task(path, get_preset("tiny-t2v"))  # scales and marker are not unexpected keys
    with pytest.raises(MoeError, match="does not match task tiny-i2v"):
        check_checkpoint_task(path, get_preset("tiny-i2v"))


# ---------------------------------------------------------------------------------------------
# Placement and the memory plan.


def test_auto_placement_keeps_both_fp8_a14b_experts_on_an_80gb_card():
    from moe.config.presets import get_preset
    from moe.dit.dual_dit import GiB, should_offload
    from moe.dit.expert import expert_bytes

    a14b = get_preset("t2v-A14B")
    bf16, fp8 = expert_bytes(a14b), expert_bytes(a14b, fp8="fp8_scaled")
    assert 28.5e9 < bf16 < 28.7e9 and fp8 / bf16 <= 0.51  # 28.6 GB -> 14.5 GB, scales included
    cuda, free = torch.device("cuda"), int(79 * GiB)  # an 80 GB card after the CUDA context
    assert not should_offload("auto", cuda, 2 * fp8, free, 32 * GiB)  # both fp8 experts resident
    assert should_offload("auto", cuda, 2 * bf16, free, 32 * GiB)  # bf16: one at a time


def test_memory_plan_names_storage_placement_and_swaps(tiny_workspace):
    from moe.dit.dual_dit import DualDiT
    from moe.dit.expert import resident_bytes, swapped_bytes

    models, preset = tiny_workspace["models"], get_preset("tiny-t2v")
    plain = DualDiT.load(preset, models.low_noise, models.high_noise, preset.boundary, None, "cpu", "never")
    dits = DualDiT.load(preset, models.low_noise, models.high_noise, preset.boundary, None, "cpu", "never", fp8="fp8_scaled", blocks_to_swap=3)
    low = dits.models["low"]
    assert len(low.block_swap.swapped) == 3 and swapped_bytes(low) > 0
    # Every frozen byte is either resident or swapped; fp8 shrinks the block Linears only.
    total = resident_bytes(low) + swapped_bytes(low)
    full = resident_bytes(plain.models["low"])
    assert total == full - linear_weight_bytes(plain.models["low"]) + linear_weight_bytes(low)
    plan = dits.memory_plan()
    assert plan.startswith("memory plan: 2 experts x ") and "fp8 e4m3, per-row scales" in plan
    assert "both resident on cpu" in plan and "blocks 0-2 of 8 per expert" in plan and "3 block copies per forward" in plan
    assert "float32" in plain.memory_plan() and "blocks" not in plain.memory_plan()


def test_blocks_to_swap_beyond_the_model_is_one_line(tiny_workspace):
    from moe.dit.dual_dit import DualDiT
    from moe.errors import MoeError

    models, preset = tiny_workspace["models"], get_preset("tiny-t2v")
    with pytest.raises(MoeError, match=r"--blocks_to_swap 9: the model has 8 blocks"):
        DualDiT.load(preset, models.low_noise, models.high_noise, preset.boundary, None, "cpu", blocks_to_swap=9)
