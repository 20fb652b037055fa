"""The LoRA-MoE layer (SPEC section 5), for a frozen merged weight W' and E experts of rank r:

    y = W' x + alpha_expert * sum_e g_e * w_e(sigma) * (alpha / r) * B_e A_e x

computed fused: `h = x A_cat^T` [..., E*r]; h is scaled per sample by the mix `g_e w_e(sigma)`
repeated r times (times alpha_expert * alpha / r); `y += h B_cat^T`. Only one [tokens, out]
update is formed, never one per expert.

`LoRAMoEAdapter` holds A_cat/B_cat; `LoRAMoELinear` wraps the frozen Linear and reads the
per-sample mix [B, E] from a `RoutingState` shared by every layer, so one adapter set and one
state can serve both Wan2.2 DiTs (as stage 1's `LoRAAdapter`/`LoRALinear`).

The base matmul and the update run as one autograd function (`moe.lora.layer.FusedLowRankLinear`,
with the per-sample column scales s = mix * alpha_expert * alpha / r repeated r times) in the
base Linear's compute dtype (bf16 for a bf16 checkpoint or under bf16 autocast), while the
experts' weights and the mix stay fp32: the mix scales h in fp32 before it is rounded.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moe.lora.layer import AdaptedLinear, scale_dtype
from moe.lora_moe.routing import RoutingState


class LoRAMoEAdapter(nn.Module):
    """`lora_down` = A_cat [E*r, in] (expert e owns rows e*r:(e+1)*r; Kaiming-uniform as peft, whose
    bound depends only on fan_in = in, so one call initialises every expert alike) and
    `lora_up` = B_cat [out, E*r] (zeros: a fresh adapter leaves the model unchanged).
    Parameters stay fp32 whatever the base dtype."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, num_experts: int):
        super().__init__()
        self.rank = rank
        self.alpha = float(alpha)
        self.num_experts = num_experts
        self.lora_down = nn.Parameter(torch.empty(num_experts * rank, in_features))
        self.lora_up = nn.Parameter(torch.zeros(out_features, num_experts * rank))
        nn.init.kaiming_uniform_(self.lora_down, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAMoELinear(AdaptedLinear):
    """A frozen `nn.Linear` plus a LoRA-MoE adapter; `alpha_expert` (default 1) and `enabled`."""

    def __init__(self, base: nn.Linear, adapter: LoRAMoEAdapter, state: RoutingState, alpha_expert: float = 1.0):
        super().__init__(base, adapter)
        self.state = state
        self.alpha_expert = alpha_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.alpha_expert == 0:
            return self.base(x)
        mix = self.state.mix
        if mix is None:
            raise RuntimeError("LoRA-MoE layer called before RoutingState.set(gates, ...)")
        if mix.shape[0] not in (1, x.shape[0]):
            raise RuntimeError(f"routing state holds gates for {mix.shape[0]} samples, input has {x.shape[0]}")
        a = self.adapter
        s = mix.to(scale_dtype(a.lora_down)) * (self.alpha_expert * a.scale)  # fp32: never rounded to bf16
        return self.low_rank_forward(x, s.repeat_interleave(a.rank, dim=-1))
