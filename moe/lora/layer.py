"""The vanilla LoRA layer: `y = W x + m * (alpha / r) * up(down(x))` (kohya scale convention).

`LoRAAdapter` holds the trainable pair; `LoRALinear` wraps a frozen `nn.Linear` and adds an
adapter's output. Keeping the two apart lets one adapter be shared by the same module of both
Wan2.2 experts, so stage 1 trains a single LoRA across the high- and low-noise DiTs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unscaled low-rank update `up(down(x))`, in the adapter's dtype."""
        x = x.to(self.lora_down.dtype)
        return F.linear(F.linear(x, self.lora_down), self.lora_up)


class FusedLowRankLinear(torch.autograd.Function):
    """y = x W^T + b + (x A^T * s) B^T for x [B, T, in], with s [B or 1, R] per-sample column
    scales of the rank-R update (stage 1: the LoRA scale; stage 2: gates x timestep gates).

    One autograd node: the update is accumulated into the base output, and in backward the
    adapter's input gradient into the base's, so no extra [tokens, out] or [tokens, in] tensors
    are formed. The frozen W and b get no gradient; x, A, B and s do (s carries the router's)."""

    @staticmethod
    def forward(ctx, x, weight, bias, down, up, s):
        n, out = x.shape[0] * x.shape[1], weight.shape[0]
        x2 = x.reshape(n, -1)
        h = (x2 @ down.t()).view(x.shape[0], x.shape[1], -1)  # [B, T, E*r]
        hs = h * s[:, None, :]
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
        y.addmm_(hs.view(n, -1), up.t())
        ctx.save_for_backward(x2, weight, down, up, s, h)
        ctx.batch = x.shape[:2]
        return y.view(*x.shape[:2], out)

    @staticmethod
    def backward(ctx, grad):
        x2, weight, down, up, s, h = ctx.saved_tensors
        b, t = ctx.batch
        g2 = grad.reshape(b * t, -1)
        gh = (g2 @ up).view(b, t, -1)  # dL/d(hs)
        ghs = gh * s[:, None, :]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g2 @ weight
            grad_x.addmm_(ghs.view(b * t, -1), down)
            grad_x = grad_x.view(b, t, -1)
        grad_down = ghs.view(b * t, -1).t() @ x2 if ctx.needs_input_grad[3] else None
        grad_up = g2.t() @ (h * s[:, None, :]).view(b * t, -1) if ctx.needs_input_grad[4] else None
        grad_s = None
        if ctx.needs_input_grad[5]:
            grad_s = (gh * h).sum(1)
            if s.shape[0] == 1 and b > 1:
                grad_s = grad_s.sum(0, keepdim=True)
        return grad_x, None, None, grad_down, grad_up, grad_s


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

    def fusable(self, x: torch.Tensor) -> bool:
        """Whether `FusedLowRankLinear` applies: one dtype throughout and no autocast (else the
        same maths runs as plain ops, which autocast and mixed dtypes handle)."""
        return (
            x.ndim == 3
            and x.dtype == self.base.weight.dtype == self.adapter.lora_down.dtype
            and not torch.is_autocast_enabled(x.device.type)
        )

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
        a, scale = self.adapter, self.adapter.scale * self.multiplier
        if self.fusable(x):
            s = torch.full((1, a.rank), scale, dtype=x.dtype, device=x.device)
            return FusedLowRankLinear.apply(x, self.base.weight, self.base.bias, a.lora_down, a.lora_up, s)
        y = self.base(x)
        return y + (a(x) * scale).to(y.dtype)
