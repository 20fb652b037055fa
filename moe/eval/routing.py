"""Routing quality on the held-out clips: accuracy against the teacher, the confusion matrix,
entropy, expert load, the load-balance statistic and the timestep-gate curves w_e(sigma).

Entropy and load balance reuse the training losses' definitions (`moe.lora_moe.losses`), here
over all held-out samples at once (no EMA: beta = 0)."""

from __future__ import annotations

import numpy as np
import torch

from moe.dit.validation import Measurement
from moe.eval.metrics import Bootstrap
from moe.eval.report import RoutingReport
from moe.lora_moe.gates import timestep_weight
from moe.lora_moe.losses import LoadBalance, routing_entropy

GATE_CURVE_POINTS = 101


def gate_curves(k: torch.Tensor, c: torch.Tensor, experts: tuple[str, ...]) -> dict[str, list[float]]:
    sigma = torch.linspace(0.0, 1.0, GATE_CURVE_POINTS)
    w = timestep_weight(k.float().cpu(), c.float().cpu(), sigma)
    return {"sigma": sigma.tolist()} | {e: w[:, i].tolist() for i, e in enumerate(experts)}


def routing_report(m: Measurement, boot: Bootstrap, timestep_gate_k: torch.Tensor, timestep_gate_c: torch.Tensor) -> RoutingReport:
    experts = m.experts
    probs, gates = m.router_probs, m.gates
    top1, top2 = m.router_hits(1), m.router_hits(2)
    chosen = probs.argmax(-1)  # [N, S]
    confusion = np.zeros((len(experts), len(experts)), dtype=int)
    for i in range(len(m.clip_ids)):
        for label in np.flatnonzero(m.teacher[i] > 0):
            np.add.at(confusion[label], chosen[i], 1)
    flat = torch.from_numpy(probs.reshape(-1, len(experts)))
    balance = LoadBalance(len(experts), beta=0.0)(flat)
    top1_share = np.bincount(chosen.ravel(), minlength=len(experts)) / chosen.size
    return RoutingReport(
        experts=list(experts),
        top1_accuracy=boot.mean(top1.mean(1)),
        top2_accuracy=boot.mean(top2.mean(1)),
        accuracy_by_sigma={f"{s:g}": float(top1[:, j].mean()) for j, s in enumerate(m.sigmas)},
        confusion=confusion.tolist(),
        mean_entropy=float(routing_entropy(flat.double().clamp_min(1e-300).log())),  # log p as logits; 0 log 0 = 0
        load={e: float(gates[..., i].mean()) for i, e in enumerate(experts)},
        top1_share={e: float(top1_share[i]) for i, e in enumerate(experts)},
        load_balance=float(balance),
        timestep_gate={"k": timestep_gate_k.tolist(), "c": timestep_gate_c.tolist()},
        gate_curves=gate_curves(timestep_gate_k, timestep_gate_c, experts),
    )
