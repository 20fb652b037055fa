"""Routing losses (SPEC section 5), added to flow matching as
`L = L_fm + lambda_teach KL(q || p) + lambda_ent mean_n H(p_n) + lambda_lb E sum_e f_e P_e`.

KL and entropy take the router's logits and use `log_softmax`: log p stays exact when p
underflows (a confident router), so the teacher's gradient p - q never dies, as it would through
`log(clamp(p))`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def teacher_kl(q: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(q || softmax(logits)) = sum_e q_e (log q_e - log p_e), averaged over the batch; 0 log 0 = 0."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return (torch.xlogy(q, q) - q * log_p).sum(dim=-1).mean()


def routing_entropy(logits: torch.Tensor) -> torch.Tensor:
    """mean_n H(p_n) = mean_n -sum_e p_ne log p_ne for p = softmax(logits) (minimising it makes
    routing decisive)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1).mean()


class LoadBalance(nn.Module):
    """`E * sum_e f_e P_e` over EMAs across steps, because a batch is often one video.

    f_e: EMA (beta 0.99) of the share of samples whose router top-1 (argmax p, not the teacher-
    forced gates: f measures the router) is expert e; P_e: EMA of the batch mean of p_e. Each
    call is one update:
        f = beta f_prev + (1 - beta) top1_share(batch)
        P = beta P_prev.detach() + (1 - beta) mean_n p_n(batch)
    so the gradient flows only through the current batch's P, scaled by (1 - beta).

    Data parallel: the batch is the union of every process's micro-batch. The per-process sums
    are all-reduced before the update, so every process holds the same EMAs, over all the data
    (not rank 0's alone, which DDP's buffer broadcast would otherwise leave). The gradient reaches
    each process's own p with the weight it has in the global mean (times the number of
    processes, which DDP's gradient averaging divides out again).

    Start bias: f and P start at the uniform 1/E, not 0 with a bias correction, so the loss
    starts at 1 (its value under perfect balance) and over the first ~1/(1 - beta) = 100 steps
    the EMAs still lean towards balance: early, few-sample steps are not punished for an
    imbalance they cannot measure yet. The buffers are in `state_dict` for checkpoints and resume.
    Call it once per training micro-batch only (each call updates the EMAs), on every process.
    """

    def __init__(self, num_experts: int, beta: float = 0.99):
        super().__init__()
        self.num_experts = num_experts
        self.beta = beta
        self.register_buffer("f", torch.full((num_experts,), 1.0 / num_experts))
        self.register_buffer("P", torch.full((num_experts,), 1.0 / num_experts))

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        p = p.float()
        e = self.num_experts
        p_sum = p.sum(dim=0)
        local = torch.cat([F.one_hot(p.argmax(dim=-1), e).float().sum(dim=0), p_sum.detach(), p.new_tensor([len(p)])])
        total, world = _sum_over_processes(local)
        n = total[-1]
        top1 = total[:e] / n
        batch_p = total[e : 2 * e] / n + world * (p_sum - p_sum.detach()) / n  # value: global; gradient: own share
        f = self.beta * self.f + (1.0 - self.beta) * top1
        P = self.beta * self.P + (1.0 - self.beta) * batch_p
        with torch.no_grad():
            self.f.copy_(f)
            self.P.copy_(P)
        return self.num_experts * (f * P).sum()


def _sum_over_processes(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of `t` over the data-parallel processes, their number); `t` itself in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t, 1
    total = t.clone()
    dist.all_reduce(total)
    return total, dist.get_world_size()
