"""Timestep gates (SPEC section 5): `w_e(sigma) = sigmoid(softplus(k_e) * (c_e - sigma))`.

One learnable centre `c_e` and slope `k_e` per expert, shared by all target modules and both
DiTs. softplus keeps the slope positive, so w_e always falls as the noise level rises.
Initialised with c = 0.9 and softplus(k) = 10: w = 0.9999 at sigma 0, 0.98 at sigma 0.5 (late,
detail-forming steps run at full strength), 0.5 at sigma 0.9 and 0.27 at sigma 1 (near pure noise,
where the high-noise DiT lays out the scene, the experts are damped).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

INIT_CENTER = 0.9
INIT_SLOPE = 10.0  # softplus(k) at init


def timestep_weight(k: torch.Tensor, c: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """w [B, E] for sigma [B], from per-expert k [E] and c [E]."""
    return torch.sigmoid(F.softplus(k) * (c - sigma[:, None]))


class TimestepGate(nn.Module):
    """Learnable `k` [E] and `c` [E]; `forward(sigma [B]) -> w [B, E]`."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.k = nn.Parameter(torch.full((num_experts,), math.log(math.expm1(INIT_SLOPE))))
        self.c = nn.Parameter(torch.full((num_experts,), INIT_CENTER))

    def forward(self, sigma: torch.Tensor) -> torch.Tensor:
        """w [B, E] in the gates' dtype (fp32), also under autocast."""
        with torch.autocast(sigma.device.type, enabled=False):
            return timestep_weight(self.k, self.c, sigma.to(self.k.dtype))
