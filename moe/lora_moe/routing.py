"""Routing modes, the rule-based teacher, inference smoothing and the shared routing state
(SPEC section 5).

Modes (`compute_gates`), g [B, E]:
    learned  g = top_k(normalise((1 - rho) p + rho q))   rho = 0 at inference / without teacher forcing
    teacher  g = q
    uniform  g = 1/E
    hint     g = one_hot(hint)                             (`--instrument_hint NAME`, inference)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from moe.config.instruments import FALLBACK_EXPERT, INSTRUMENT_CLASSES, expert_index
from moe.errors import MoeError
from moe.lora_moe.router import top_k_gates

RoutingMode = Literal["learned", "teacher", "uniform", "hint"]


def multi_hot(labels: Sequence[Sequence[str]], experts: tuple[str, ...] = INSTRUMENT_CLASSES) -> torch.Tensor:
    """Per-clip expert labels (e.g. `[["hook"], ["scissors", "other"]]`) -> multi-hot [B, E]."""
    out = torch.zeros(len(labels), len(experts))
    for i, names in enumerate(labels):
        for name in names:
            out[i, expert_index(name, experts)] = 1.0
    return out


def labels_by_name(labels: torch.Tensor, label_classes: Sequence[str], experts: tuple[str, ...]) -> torch.Tensor:
    """Multi-hot labels [B, C] over `label_classes` (the cache's column order) -> [B, E] in the
    order of `experts`, matched by name: the expert named hook gets the hook column."""
    classes = tuple(label_classes)
    missing = [e for e in experts if e not in classes]
    if missing:
        raise MoeError(f"experts {', '.join(missing)} are not label classes of the cache ({', '.join(classes)})")
    return labels[:, [classes.index(e) for e in experts]]


def teacher_distribution(labels: torch.Tensor, experts: tuple[str, ...] = INSTRUMENT_CLASSES) -> torch.Tensor:
    """Multi-hot labels [B, E] -> teacher q [B, E]: uniform over the specific instruments present;
    one-hot `other` only when no specific instrument is present (a labelled `other` next to a
    specific instrument gets 0)."""
    other = expert_index(FALLBACK_EXPERT, experts)
    specific = (labels > 0).float()
    specific[:, other] = 0.0
    count = specific.sum(dim=-1, keepdim=True)
    fallback = F.one_hot(torch.full((labels.shape[0],), other, device=labels.device), len(experts)).float()
    return torch.where(count > 0, specific / count.clamp_min(1.0), fallback)


def teacher_forcing_rho(step: int, total_steps: int, fraction: float = 0.3) -> float:
    """rho: 1 at step 0, linearly down to 0 at `fraction * total_steps`, then 0."""
    end = fraction * total_steps
    return max(0.0, 1.0 - step / end) if end > 0 else 0.0


def compute_gates(
    mode: RoutingMode,
    router_probs: torch.Tensor | None = None,
    q: torch.Tensor | None = None,
    rho: float = 0.0,
    hint_index: int | torch.Tensor | None = None,
    top_k: int = 2,
    batch_size: int | None = None,
    num_experts: int = len(INSTRUMENT_CLASSES),
) -> torch.Tensor:
    """Gates g [B, E] for a routing mode (see the module docstring). B and E come from
    router_probs or q when given, else from batch_size and num_experts."""
    if mode not in get_args(RoutingMode):
        raise MoeError(f"unknown routing mode {mode!r}; choose one of: {', '.join(get_args(RoutingMode))}")
    ref = router_probs if router_probs is not None else q
    if ref is not None:
        batch_size, num_experts = ref.shape
    device = ref.device if ref is not None else None
    if mode == "learned":
        if router_probs is None or (rho > 0 and q is None):
            raise ValueError("learned routing needs the router's probabilities (and q when rho > 0)")
        mix = router_probs if rho == 0 else (1.0 - rho) * router_probs + rho * q.to(router_probs)
        return top_k_gates(mix / mix.sum(dim=-1, keepdim=True), top_k)
    if mode == "teacher":
        if q is None:
            raise ValueError("teacher routing needs the teacher distribution q")
        return q
    if batch_size is None:
        raise ValueError(f"{mode} routing needs batch_size (or router_probs / q)")
    if mode == "uniform":
        return torch.full((batch_size, num_experts), 1.0 / num_experts, device=device)
    if hint_index is None:  # mode == "hint"
        raise MoeError("routing mode 'hint' needs --instrument_hint NAME")
    index = torch.as_tensor(hint_index, device=device).expand(batch_size)
    return F.one_hot(index, num_experts).float()


class GateSmoother:
    """Inference smoothing across sampling steps: `g_k = beta g_{k-1} + (1 - beta) g_k_raw`,
    renormalised to sum 1; the first step passes g_raw through. Use one per generation and
    `reset()` before the next (the state spans both DiTs of one video). After smoothing, more
    than top_k gates may be non-zero while the router changes its mind."""

    def __init__(self, beta: float = 0.5):
        self.beta = beta
        self.previous: torch.Tensor | None = None

    def reset(self) -> None:
        self.previous = None

    def __call__(self, raw: torch.Tensor) -> torch.Tensor:
        g = raw if self.previous is None else self.beta * self.previous + (1.0 - self.beta) * raw
        g = g / g.sum(dim=-1, keepdim=True)
        self.previous = g.detach()
        return g


@dataclass
class RoutingState:
    """The routing decision for the current DiT forward, shared by every LoRAMoELinear of a model
    (or of both DiTs). The model wrapper calls `set` before each DiT forward.

    gates [B, E] (g), sigma [B], timestep_weights [B, E] (w_e(sigma); None = all 1). Layers use
    `mix = g * w`. B may be 1 to broadcast over the batch, e.g. both CFG branches with the
    conditional branch's gates. With gradient checkpointing, keep the state until backward.
    """

    gates: torch.Tensor | None = None
    sigma: torch.Tensor | None = None
    timestep_weights: torch.Tensor | None = None
    mix: torch.Tensor | None = None

    def set(self, gates: torch.Tensor, sigma: torch.Tensor | None = None, timestep_weights: torch.Tensor | None = None):
        self.gates, self.sigma, self.timestep_weights = gates, sigma, timestep_weights
        self.mix = gates if timestep_weights is None else gates * timestep_weights

    def clear(self) -> None:
        self.gates = self.sigma = self.timestep_weights = self.mix = None
