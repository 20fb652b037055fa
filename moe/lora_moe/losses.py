"""Routing losses (SPEC section 5), added to flow matching as
`L = L_fm + lambda_teach KL(q || p) + lambda_ent mean_n H(p_n) + lambda_lb E sum_e f_e P_e`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _log(p: torch.Tensor) -> torch.Tensor:
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def kl_teacher(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """KL(q || p) = sum_e q_e (log q_e - log p_e), averaged over the batch; 0 log 0 = 0."""
    return (torch.xlogy(q, q) - q * _log(p)).sum(dim=-1).mean()


def mean_entropy(p: torch.Tensor) -> torch.Tensor:
    """mean_n H(p_n) = mean_n -sum_e p_ne log p_ne (minimising it makes routing decisive)."""
    return -(p * _log(p)).sum(dim=-1).mean()


class LoadBalance(nn.Module):
    """`E * sum_e f_e P_e` over EMAs across steps, because a batch is often one video.

    f_e: EMA (beta 0.99) of the share of samples whose router top-1 (argmax p, not the teacher-
    forced gates: f measures the router) is expert e; P_e: EMA of the batch mean of p_e. Each
    call is one update:
        f = beta f_prev + (1 - beta) top1_share(batch)
        P = beta P_prev.detach() + (1 - beta) mean_n p_n(batch)
    so the gradient flows only through the current batch's P, scaled by (1 - beta).

    Start bias: f and P start at the uniform 1/E, not 0 with a bias correction, so the loss
    starts at 1 (its value under perfect balance) and over the first ~1/(1 - beta) = 100 steps
    the EMAs still lean towards balance: early, few-sample steps are not punished for an
    imbalance they cannot measure yet. The buffers are in `state_dict` for checkpoints and resume.
    Call it once per training micro-batch only (each call updates the EMAs).
    """

    def __init__(self, num_experts: int, beta: float = 0.99):
        super().__init__()
        self.num_experts = num_experts
        self.beta = beta
        self.register_buffer("f", torch.full((num_experts,), 1.0 / num_experts))
        self.register_buffer("P", torch.full((num_experts,), 1.0 / num_experts))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        p = p.float()
        top1 = F.one_hot(p.argmax(dim=-1), self.num_experts).float().mean(dim=0)
        f = self.beta * self.f + (1.0 - self.beta) * top1
        P = self.beta * self.P + (1.0 - self.beta) * p.mean(dim=0)
        with torch.no_grad():
            self.f.copy_(f)
            self.P.copy_(P)
        return self.num_experts * (f * P).sum()
