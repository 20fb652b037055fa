"""The vanilla LoRA layer: `y = W x + m * (alpha / r) * up(down(x))` (kohya scale convention).

`LoRAAdapter` holds the trainable pair; `LoRALinear` wraps a frozen `nn.Linear` and adds an
adapter's output. Keeping the two apart lets one adapter be shared by the same module of both
Wan2.2 experts, so stage 1 trains a single LoRA across the high- and low-noise DiTs.

Both stages' layers run `FusedLowRankLinear`: the base matmul and the low-rank update in one
autograd node, in the base's compute dtype (bf16 for a bf16 checkpoint or under bf16 autocast),
with fp32 master weights and fp32 scales; it saves only what backward needs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe.wan.fp8 import Fp8Linear, dequantize_weight


class LoRAAdapter(nn.Module):
    """`down` [r, in] (Kaiming-uniform, as peft) and `up` [out, r] (zeros, so a fresh adapter
    leaves the model unchanged); trainable parameters stay fp32 whatever the base dtype."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float):
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.lora_down = nn.Parameter(torch.empty(rank, in_features))
        self.lora_up = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def scale_dtype(master: torch.Tensor) -> torch.dtype:
    """fp32 for the column scales (fp64 when the adapter is fp64, as in gradient checks)."""
    return torch.promote_types(master.dtype, torch.float32)


def compute_dtype(x: torch.Tensor, base: nn.Linear) -> torch.dtype:
    """The dtype a frozen Linear computes in: autocast's (bf16/fp16) when autocast is on for the
    input's device, else the base weight's (a bf16 checkpoint computes in bf16; an fp8 weight
    computes in the dtype it was loaded for)."""
    if isinstance(base, Fp8Linear):
        return base.dtype_for(x)
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else base.weight.dtype


class FusedLowRankLinear(torch.autograd.Function):
    """y = x W^T + b + (x A^T * s) B^T for x [B, T, in], with s [B or 1, R] per-sample column
    scales of the rank-R update (stage 1: the LoRA scale; stage 2: gates x timestep gates).

    One autograd node: the update is accumulated into the base output, and in backward the
    adapter's input gradient into the base's, so no extra [tokens, out] or [tokens, in] tensors
    are formed. The frozen W and b get no gradient; x, A, B and s do (s carries the router's).

    Dtypes: x and b arrive in the compute dtype (the caller casts them, see `compute_dtype`), and W
    too, unless it is an fp8 weight (`--fp8_base`) with its scale (or None): then it is dequantised
    here, in forward and again in backward, so only the fp8 weight is saved between them;
    A, B (master weights, fp32) and s (fp32) may be wider. The matmuls run in the compute dtype,
    as the base Linear's own do (their GEMMs accumulate in fp32). s is folded into B per sample in
    fp32 before B is rounded (B_s = B * s, [B, out, R], parameter-sized), and its gradient is taken
    from the fp32 product of B with G = g^T h: scaling the bf16 h by s instead would round every
    h * s back onto h's bf16 grid, which quantises the gate itself (a gate of 0.5019 acts as 0.5).
    Saved for backward: the input x as it is (no copy, no upcast), h = x A^T ([tokens, R], small)
    and parameters (an fp8 W as fp8), nothing else.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, down, up, s):
        with torch.autocast(x.device.type, enabled=False):
            b, t = x.shape[:2]
            x2 = x.reshape(b * t, -1)
            h = x2 @ down.to(x.dtype).t()  # [B*T, R]
            w = dequantize_weight(weight, weight_scale, x.dtype)  # a no-op cast unless W is fp8
            y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()
            del w
            up_s = _scaled_up(up, s, x.dtype)  # [B or 1, out, R]
            if up_s.shape[0] == 1:
                y.addmm_(h, up_s[0].t())
            else:
                y.view(b, t, -1).baddbmm_(h.view(b, t, -1), up_s.transpose(1, 2))
        ctx.save_for_backward(x2, weight, weight_scale, down, up, s, h)
        ctx.batch = (b, t)
        return y.view(b, t, -1)

    @staticmethod
    def backward(ctx, grad):
        x2, weight, weight_scale, down, up, s, h = ctx.saved_tensors
        b, t = ctx.batch
        dtype = x2.dtype
        with torch.autocast(grad.device.type, enabled=False):
            g2 = grad.reshape(b * t, -1).to(dtype)
            up_s = _scaled_up(up, s, dtype)
            if up_s.shape[0] == 1:
                ghs = g2 @ up_s[0]  # dL/dh [B*T, R]
            else:
                ghs = torch.bmm(g2.view(b, t, -1), up_s).view(b * t, -1)
            grad_x = None
            if ctx.needs_input_grad[0]:
                grad_x = g2 @ dequantize_weight(weight, weight_scale, dtype)
                grad_x.addmm_(ghs, down.to(dtype))
                grad_x = grad_x.view(b, t, -1)
            grad_down = (ghs.t() @ x2).to(down.dtype) if ctx.needs_input_grad[4] else None
            grad_up = grad_s = None
            if ctx.needs_input_grad[5] or ctx.needs_input_grad[6]:
                wide = torch.promote_types(up.dtype, s.dtype)
                if s.shape[0] == 1:  # one scale for the batch: G summed over it, one GEMM
                    g_h = (g2.t() @ h)[None].to(wide)  # [1, out, R]
                else:
                    g_h = torch.bmm(g2.view(b, t, -1).transpose(1, 2), h.view(b, t, -1)).to(wide)  # [B, out, R]
                if ctx.needs_input_grad[5]:
                    grad_up = (g_h * s[:, None, :]).sum(0).to(up.dtype)
                if ctx.needs_input_grad[6]:
                    grad_s = (g_h * up.to(wide)).sum(1)  # [B, R]
                    grad_s = (grad_s.sum(0, keepdim=True) if s.shape[0] == 1 else grad_s).to(s.dtype)
        return grad_x, None, None, None, grad_down, grad_up, grad_s


def _scaled_up(up: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B_s = B * s per sample, [B or 1, out, R], formed in the wider dtype, then rounded."""
    wide = torch.promote_types(up.dtype, s.dtype)
    return (up.to(wide)[None] * s.to(wide)[:, None, :]).to(dtype)


class AdaptedLinear(nn.Module):
    """The shell shared by the stage-1 and stage-2 layers: a frozen `nn.Linear`, an adapter
    (with `lora_down` [*, in] and `lora_up` [out, *]) and an on/off switch."""

    def __init__(self, base: nn.Linear, adapter: nn.Module):
        super().__init__()
        if (adapter.lora_down.shape[1], adapter.lora_up.shape[0]) != (base.in_features, base.out_features):
            raise ValueError(
                f"adapter shape [{adapter.lora_up.shape[0]}, {adapter.lora_down.shape[1]}] does not fit "
                f"Linear [{base.out_features}, {base.in_features}]"
            )
        self.base = base.requires_grad_(False)
        self.adapter = adapter
        self.enabled = True

    def low_rank_forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """`base(x)` plus the adapter's update with column scales s [B or 1, R] (fp32), through
        `FusedLowRankLinear` in the base Linear's compute dtype (autocast's when it is on)."""
        dtype = compute_dtype(x, self.base)
        lead, width = x.shape[:-1], x.shape[-1]
        x3 = x.reshape(1, -1, width) if x.ndim == 2 else x.reshape(x.shape[0], -1, width)
        bias = self.base.bias.to(dtype) if self.base.bias is not None else None
        a = self.adapter
        base = self.base
        fp8 = isinstance(base, Fp8Linear)
        weight, scale = (base.weight, base.scale_weight) if fp8 else (base.weight.to(dtype), None)
        y = FusedLowRankLinear.apply(x3.to(dtype), weight, scale, bias, a.lora_down, a.lora_up, s)
        return y.reshape(*lead, self.out_features)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features


class LoRALinear(AdaptedLinear):
    """A frozen `nn.Linear` plus a LoRA adapter with a multiplier and an on/off switch."""

    def __init__(self, base: nn.Linear, adapter: LoRAAdapter, multiplier: float = 1.0):
        super().__init__(base, adapter)
        self.multiplier = multiplier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.multiplier == 0:
            return self.base(x)
        a = self.adapter
        s = torch.full((1, a.rank), a.scale * self.multiplier, dtype=scale_dtype(a.lora_down), device=x.device)
        return self.low_rank_forward(x, s)
