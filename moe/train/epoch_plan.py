"""What each process trains on in one epoch: batches, sigmas, noise streams and their order.

- Data order and sigma come from one generator seeded by (seed, epoch), the same on every
  process: position k of the epoch has one sigma for all processes, so every process runs the
  same expert at the same time (offloading swaps in lockstep, and no process waits at the
  gradient all-reduce for another one's swap). Process r takes batches k * N + r.
- Noise comes from a generator per (seed, epoch, process): every process draws its own noise.
- Within each accumulation window (one optimizer step) the positions are ordered by expert,
  starting with the expert the previous window ended on, so a window swaps DiTs at most once. The
  window's set of (batch, sigma) pairs and hence the sigma distribution are unchanged; only the
  order of its gradient sum is.

Everything is a function of (seed, epoch, number of processes, the expert the epoch starts on),
so a resumed run replays exactly what an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe.config.train import TrainConfig
from moe.dit.flow_matching import sample_sigmas
from moe.dit.validation import stable_seed


@dataclass(frozen=True)
class MicroBatch:
    entries: list  # this process's clips (cache entries sharing a latent shape)
    sigma: float  # the same for every process at this position
    expert: str  # "high" or "low": the DiT that owns sigma
    first: bool  # first micro-batch of its accumulation window
    last: bool  # last one: the optimizer steps after it
    window_size: int  # micro-batches in its window (the loss is divided by it)


def epoch_batches(entries: list, batch_size: int, generator: torch.Generator) -> list[list]:
    """Shuffled batches whose clips share a latent shape (a clip never pads or crops)."""
    order = torch.randperm(len(entries), generator=generator).tolist()
    by_shape: dict[tuple, list] = {}
    for i in order:
        by_shape.setdefault(tuple(entries[i].latent_shape), []).append(entries[i])
    batches = [group[j : j + batch_size] for group in by_shape.values() for j in range(0, len(group), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def positions_per_epoch(num_batches: int, num_processes: int) -> int:
    return -(-num_batches // num_processes)


def plan_epoch(
    entries: list,
    cfg: TrainConfig,
    epoch: int,
    num_processes: int,
    process_index: int,
    expert_for: Callable[[float], str],
    start_expert: str | None,
) -> tuple[list[MicroBatch], str | None]:
    """This process's micro-batches of `epoch` in run order, and the expert the epoch ends on."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    batches = epoch_batches(entries, cfg.batch_size, g)
    # Every process must run the same number of micro-batches (each one is a collective step
    # under DDP): pad with the epoch's first batches, as DistributedSampler does.
    batches += batches[: -len(batches) % num_processes]
    count = len(batches) // num_processes
    low, high = cfg.sigma_range()
    sigmas = sample_sigmas(count, g, cfg.timestep_sampling, cfg.discrete_flow_shift, low, high).tolist()
    experts = [expert_for(s) for s in sigmas]
    mine = batches[process_index::num_processes]

    plan: list[MicroBatch] = []
    current = start_expert
    accum = cfg.gradient_accumulation_steps
    for start in range(0, count, accum):
        window = list(range(start, min(start + accum, count)))
        if current is None:
            current = experts[window[0]]
        window.sort(key=lambda k: experts[k] != current)  # stable: the current expert first
        for i, k in enumerate(window):
            plan.append(MicroBatch(mine[k], sigmas[k], experts[k], i == 0, i == len(window) - 1, len(window)))
        current = experts[window[-1]]
    return plan, current


def noise_generator(cfg: TrainConfig, epoch: int, process_index: int) -> torch.Generator:
    """The noise stream of one process in one epoch (each process draws its own noise)."""
    return torch.Generator().manual_seed(stable_seed("noise", cfg.seed, epoch, process_index))
