"""The bf16 path users run (issue 10 items 6 and 7): a bf16 base Linear with fp32 adapter
weights, with and without autocast, through the fused autograd function; the router, the
timestep gates and the gate mix stay fp32.

Tolerances: bf16 keeps 8 significant bits (unit roundoff 2^-9 = 0.2%), so a bf16 result is
compared with a float64 reference computed from the same (bf16-rounded) inputs at 1% relative
error (Frobenius norm) for outputs and gradients, and must not be much worse than what the bf16
base Linear alone gets against its own float64 reference.
"""

import contextlib

import pytest
import torch
from torch import nn

from moe.lora.layer import LoRAAdapter, LoRALinear
from moe.lora_moe.gates import TimestepGate
from moe.lora_moe.layer import LoRAMoEAdapter, LoRAMoELinear
from moe.lora_moe.router import Router, RouterConfig
from moe.lora_moe.routing import RoutingState
from moe.runtime.profiling import saved_activation_bytes

E, RANK = 4, 8


def _moe_layer(dim, base_dtype, seed=0, mix=((0.3, 0.7, 0.0, 0.0),)):
    torch.manual_seed(seed)
    base = nn.Linear(dim, dim).to(base_dtype).requires_grad_(False)
    adapter = LoRAMoEAdapter(dim, dim, RANK, 1.0, E)
    with torch.no_grad():
        adapter.lora_up.normal_(0, 0.05)
    state = RoutingState()
    state.set(torch.tensor(mix))
    return LoRAMoELinear(base, adapter, state)


def _autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("autocast, base_dtype", [(False, torch.bfloat16), (True, torch.bfloat16), (True, torch.float32)])
def test_adapted_layer_saves_only_its_input_for_backward(autocast, base_dtype):
    """Before: the bf16 path saved an fp32 copy of x per adapted layer (2.75 MB vs 0.5 MB for the
    base on this case). A LoRA needs x for dL/dA, nothing more: the adapted layer may hold at most
    1.10x the bytes of x in the compute dtype beyond what the base Linear holds."""
    layer = _moe_layer(512, base_dtype, mix=((0.3, 0.7, 0, 0), (0, 0.5, 0.5, 0)))
    x = torch.randn(2, 512, 512, dtype=base_dtype, requires_grad=True)
    params = [*layer.parameters()]
    with _autocast(autocast):
        base_bytes, _ = saved_activation_bytes(lambda: layer.base(x), params)
        fused_bytes, y = saved_activation_bytes(lambda: layer(x), params)
    x_bytes = x.numel() * 2  # x in bf16, the compute dtype
    assert y.dtype == torch.bfloat16
    assert fused_bytes - base_bytes <= 1.10 * x_bytes, (fused_bytes, base_bytes, x_bytes)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("kind", ["lora", "lora_moe"])
def test_bf16_base_with_fp32_adapters_matches_float64(kind, autocast):
    torch.manual_seed(1)
    dim, out = 96, 80
    base = nn.Linear(dim, out).to(torch.bfloat16).requires_grad_(False)
    if kind == "lora":
        adapter = LoRAAdapter(dim, out, RANK, alpha=4.0)
        layer = LoRALinear(base, adapter, multiplier=0.8)
        coef = torch.full((1, RANK), 0.8 * 4.0 / RANK, dtype=torch.float64)
    else:
        adapter = LoRAMoEAdapter(dim, out, RANK, 1.0, E)
        state = RoutingState()
        mix = torch.tensor([[0.3, 0.7, 0.0, 0.0], [0.0, 0.0, 0.45, 0.55]])
        state.set(mix)
        layer = LoRAMoELinear(base, adapter, state, alpha_expert=0.9)
        coef = (mix.double() * 0.9 / RANK).repeat_interleave(RANK, -1)
    with torch.no_grad():
        adapter.lora_up.normal_(0, 0.2)
    x = torch.randn(2, 33, dim).to(torch.bfloat16).requires_grad_(True)
    grad_out = torch.randn(2, 33, out)
    with _autocast(autocast):
        y = layer(x)
    (y.float() * grad_out).sum().backward()
    assert y.dtype == torch.bfloat16 and adapter.lora_down.grad.dtype == torch.float32

    leaves = [t.detach().double().requires_grad_(True) for t in (x, adapter.lora_down, adapter.lora_up)]
    x64, down64, up64 = leaves
    ref = x64 @ base.weight.double().T + base.bias.double() + ((x64 @ down64.T) * coef[:, None, :]) @ up64.T
    (ref * grad_out.double()).sum().backward()
    base_err = _rel(base(x.detach()), x.detach().double() @ base.weight.double().T + base.bias.double())
    assert _rel(y, ref) <= max(1e-2, 2 * base_err), (_rel(y, ref), base_err)
    for got, want in zip((x, adapter.lora_down, adapter.lora_up), leaves):
        assert _rel(got.grad, want.grad) <= 1e-2, _rel(got.grad, want.grad)


@pytest.mark.parametrize("autocast", [False, True])
def test_gate_mix_is_not_quantised_to_bf16(autocast):
    """A gate of 0.5019 is 0.5 in bf16 (-0.38%). With the mix applied in fp32 the expert's update
    keeps its scale: the least-squares ratio of the bf16 update to the float64 one is 1 within
    5e-4 (per-element rounding averages out; a quantised gate shifts every element alike)."""
    layer = _moe_layer(256, torch.bfloat16, mix=((0.5019, 0.0, 0.0, 0.0),))
    with torch.no_grad():
        layer.base.weight.zero_()
        layer.base.bias.zero_()
    x = torch.randn(4, 256, 256).to(torch.bfloat16)
    with torch.no_grad(), _autocast(autocast):
        y = layer(x).double()
    a = layer.adapter
    ref = 0.5019 * a.scale * (x.double() @ a.lora_down.double()[:RANK].T) @ a.lora_up.double()[:, :RANK].T
    ratio = float((y * ref).sum() / (ref * ref).sum())
    assert abs(ratio - 1) < 5e-4, ratio


def test_router_and_timestep_gates_stay_fp32_under_autocast():
    torch.manual_seed(0)
    router, gate = Router(RouterConfig(text_dim=48)), TimestepGate(E)
    text, mask, sigma = torch.randn(3, 7, 48), torch.ones(3, 7), torch.tensor([0.1, 0.5, 0.93])
    plain_logits, plain_w = router(text, mask, sigma), gate(sigma)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, w = router(text, mask, sigma), gate(sigma)
    assert logits.dtype == torch.float32 and w.dtype == torch.float32
    torch.testing.assert_close(logits, plain_logits, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w, plain_w, rtol=0, atol=0)
