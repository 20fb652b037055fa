"""Held-out flow-matching loss at a fixed sigma grid with fixed noise (SPEC sections 6 and 8).

The noise of each (clip, sigma) pair is drawn from a generator seeded by a stable hash of the
pair, so every model variant (base, stage 1, stage 2 with each routing mode) sees exactly the same
inputs and the losses are directly comparable across runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch

from moe.train.flow_matching import noisy_latents, velocity_target


def stable_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & (2**63 - 1)


def fixed_noise(clip_id: str, sigma: float, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(stable_seed(clip_id, round(sigma, 6), seed))
    return torch.randn(shape, generator=g)


def dit_inputs(batch: dict, sigma: torch.Tensor, noise: torch.Tensor, i2v: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(DiT input, velocity target): noisy latents, with the I2V conditioning concatenated."""
    x0 = batch["latents"]
    x = noisy_latents(x0, noise, sigma)
    if i2v:
        x = torch.cat([x, batch["i2v_condition"].to(x.dtype)], dim=1)
    return x, velocity_target(x0, noise)


def run_dit(dit, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """One DiT forward in the DiT's weight dtype (inputs are fp32 in the cache)."""
    dtype = dit.patch_embedding.weight.dtype
    return dit(
        hidden_states=x.to(dtype),
        timestep=sigma * 1000,
        encoder_hidden_states=text.to(dtype),
        return_dict=False,
    )[0]


def iter_fixed_noise(
    items: list[dict], sigmas: tuple[float, ...], device, seed: int = 0
) -> Iterator[tuple[dict, float, torch.Tensor, torch.Tensor]]:
    """(batch of one clip on `device`, sigma, sigma tensor, noise) for every clip x sigma."""
    for item in items:
        batch = {k: v.unsqueeze(0).to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        for s in sigmas:
            noise = fixed_noise(item["id"], s, batch["latents"].shape, seed).to(device)
            yield batch, s, torch.full((1,), s, device=device), noise


@torch.no_grad()
def mean_loss_by_sigma(
    items: list[dict],
    sigmas: tuple[float, ...],
    loss_fn: Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor],
    device,
    seed: int = 0,
) -> dict[float, float]:
    """Mean of `loss_fn(batch, sigma, noise)` (a per-sample loss [1]) over clips, per sigma."""
    sums = dict.fromkeys(sigmas, 0.0)
    for batch, s, sigma, noise in iter_fixed_noise(items, sigmas, device, seed):
        sums[s] += float(loss_fn(batch, sigma, noise).sum())
    return {s: total / max(1, len(items)) for s, total in sums.items()}
