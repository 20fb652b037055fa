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

    def delta_weight(self) -> torch.Tensor:
        """`(alpha / r) * up @ down`, the change a merge adds to W."""
        return self.scale * (self.lora_up @ self.lora_down)


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
        y = self.base(x)
        if not self.enabled or self.multiplier == 0:
            return y
        return y + (self.adapter(x) * (self.adapter.scale * self.multiplier)).to(y.dtype)
