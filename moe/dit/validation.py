"""Held-out flow-matching loss at a fixed sigma grid with fixed noise (SPEC sections 6 and 8).

The noise of each (clip, sigma) pair is drawn from a generator seeded by a stable hash of the
pair, so every model variant (base, stage 1, stage 2 with each routing mode) sees exactly the same
inputs and the losses are directly comparable across runs.

`measure` runs a set of named variants on every (clip, sigma) pair and keeps each loss in three
regions: overall (plain mean), ROI (weighted by the latent-grid ROI coverage m) and background
(weighted by 1 - m). Stage 1's and stage 2's end-of-training metrics and `lora-moe eval` all
come from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from moe.config.instruments import INSTRUMENT_CLASSES
from moe.dit.dual_dit import DualDiT, Expert
from moe.dit.flow_matching import masked_loss, noisy_latents, per_sample_loss, velocity_target
from moe.lora.inject import adapters_enabled
from moe.lora_moe.routing import labels_by_name, teacher_distribution
from moe.runtime.progress import progress as progress_bar

REGIONS = ("overall", "roi", "background")


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


def region_losses(pred: torch.Tensor, target: torch.Tensor, roi: torch.Tensor) -> tuple[float, float, float]:
    """(overall, ROI, background) loss of one sample; ROI is NaN when the clip has none."""
    overall = per_sample_loss(pred, target)
    inside = masked_loss(pred, target, roi)
    outside = masked_loss(pred, target, 1 - roi)
    return float(overall[0]), float(inside[0]), float(outside[0])


@dataclass
class Sample:
    """One held-out (clip, sigma) pair on the device: what every variant is run on."""

    index: int  # the clip's position in the measured items
    batch: dict  # the clip as a batch of one
    sigma: float
    sigma_t: torch.Tensor  # [1]
    noise: torch.Tensor
    expert: Expert  # the DiT that owns sigma
    teacher: torch.Tensor  # [1, E] teacher distribution q of the clip
    memo: dict = field(default_factory=dict)  # per-sample results variants share (router output)


Variant = Callable[[Sample], tuple[torch.Tensor, torch.Tensor]]  # -> (prediction, target)


def dit_variant(dits: DualDiT, i2v: bool, adapters: bool = False) -> Variant:
    """The DiTs as they are (adapters of either stage switched off unless `adapters`)."""

    def predict(sample: Sample):
        with adapters_enabled(dits, adapters):
            x, target = dit_inputs(sample.batch, sample.sigma_t, sample.noise, i2v)
            return run_dit(dits.get(sample.expert), x, sample.sigma_t, sample.batch["text_embeds"]), target

    return predict


@dataclass
class Measurement:
    """The raw held-out numbers: per variant a [clips, sigmas, 3] grid of (overall, ROI,
    background) losses (NaN where a clip has no ROI or a variant was skipped), the teacher
    distribution of every clip and, for stage 2, the router's probabilities and gates."""

    clip_ids: list[str]
    sigmas: tuple[float, ...]
    experts: tuple[str, ...]
    teacher: np.ndarray  # [N, E]
    has_roi: np.ndarray  # [N] bool
    losses: dict[str, np.ndarray] = field(default_factory=dict)
    router_probs: np.ndarray | None = None  # [N, S, E]
    gates: np.ndarray | None = None  # [N, S, E]

    def clip_values(self, variant: str, region: str) -> np.ndarray:
        """[N]: each clip's mean over the sigma grid (NaN for a clip not measured there)."""
        return self.losses[variant][:, :, REGIONS.index(region)].mean(axis=1)

    def mean(self, variant: str, region: str = "overall") -> float:
        """Mean over the clips measured (every clip has every sigma, so over all samples too)."""
        values = self.clip_values(variant, region)
        values = values[np.isfinite(values)]
        return float(values.mean()) if len(values) else float("nan")

    def mean_by_sigma(self, variant: str, region: str = "overall") -> dict[float, float]:
        grid = self.losses[variant][:, :, REGIONS.index(region)]
        return {s: float(np.nanmean(grid[:, j])) if np.isfinite(grid[:, j]).any() else float("nan") for j, s in enumerate(self.sigmas)}

    def class_mask(self, expert: str) -> np.ndarray:
        """[N]: clips whose teacher gives `expert` weight (its instruments; `other` only alone)."""
        return self.teacher[:, self.experts.index(expert)] > 0

    def router_hits(self, k: int = 1) -> np.ndarray:
        """[N, S]: 1 where one of the router's k most likely experts is one of the clip's
        teacher experts (k = 1: the top-1 expert is an instrument of the clip)."""
        top = np.argsort(-self.router_probs, axis=-1, kind="stable")[..., :k]
        own = np.broadcast_to((self.teacher > 0)[:, None, :], self.router_probs.shape)
        return np.take_along_axis(own, top, -1).any(-1).astype(np.float64)

    def hint_losses(self) -> tuple[np.ndarray, np.ndarray]:
        """Per clip, the ROI loss with one of its own experts forced (mean over them) and with a
        wrong one forced (mean over the others), from the `stage2_hint_{e}` variants: [N] each,
        NaN for clips without ROI."""
        roi = np.stack([self.losses[f"stage2_hint_{e}"][:, :, 1] for e in self.experts], -1)  # [N, S, E]
        own = np.broadcast_to((self.teacher > 0)[:, None, :], roi.shape)
        with np.errstate(invalid="ignore"):
            correct = np.where(own, roi, 0).sum(-1) / own.sum(-1)
            wrong = np.where(~own, roi, 0).sum(-1) / (~own).sum(-1)
        return correct.mean(1), wrong.mean(1)


@torch.no_grad()
def measure(
    items: Sequence[dict],
    sigmas: Iterable[float],
    variants: dict[str, Variant],
    dits: DualDiT,
    seed: int = 0,
    router: Callable[[Sample], tuple[torch.Tensor, torch.Tensor]] | None = None,
    roi_only: Iterable[str] = (),
    experts: tuple[str, ...] = INSTRUMENT_CLASSES,
    progress: bool = False,
    label_classes: Sequence[str] = INSTRUMENT_CLASSES,
) -> Measurement:
    """Run every variant on every (clip, sigma) pair of `items` (cached clips) with the fixed
    noise of that pair. `router(sample) -> (p, gates)` records the router's decision once per
    pair (variants find it in `sample.memo`); variants in `roi_only` run only on clips with an
    ROI. Sigmas run in ascending order, so each DiT is moved onto the device once. The clips'
    labels (columns `label_classes`, the cache's) are matched to `experts` by name."""
    sigmas = tuple(sorted(sigmas))
    n, device = len(items), dits.device
    labels = torch.stack([item["labels"] for item in items]).float()
    teacher = teacher_distribution(labels_by_name(labels, label_classes, experts), experts)
    has_roi = np.array([bool(item["roi"].sum() > 0) for item in items])
    m = Measurement([item["id"] for item in items], sigmas, experts, teacher.numpy(), has_roi)
    m.losses = {name: np.full((n, len(sigmas), len(REGIONS)), np.nan) for name in variants}
    if router is not None:
        m.router_probs = np.zeros((n, len(sigmas), len(experts)))
        m.gates = np.zeros((n, len(sigmas), len(experts)))
    roi_only = set(roi_only)
    bar = progress_bar(total=n * len(sigmas), desc="held-out", unit="sample", disable=not progress)
    for j, s in enumerate(sigmas):
        expert = dits.expert_for(s)
        for i, item in enumerate(items):
            batch = {k: v.unsqueeze(0).to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
            noise = fixed_noise(item["id"], s, batch["latents"].shape, seed).to(device)
            sample = Sample(i, batch, s, torch.full((1,), s, device=device), noise, expert, teacher[i : i + 1].to(device))
            if router is not None:
                p, g = router(sample)
                m.router_probs[i, j], m.gates[i, j] = p[0].cpu().numpy(), g[0].cpu().numpy()
            for name, predict in variants.items():
                if name in roi_only and not has_roi[i]:
                    continue
                pred, target = predict(sample)
                m.losses[name][i, j] = region_losses(pred, target, batch["roi"])
            bar.update(1)
    bar.close()
    return m
