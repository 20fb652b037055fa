"""Held-out loss statistics: per variant, region, class and sigma, with bootstrap intervals.

The raw numbers come from `moe.dit.validation.measure` (a `Measurement`: per variant the loss
of every (clip, sigma) pair in three regions). A clip's value is its mean over the sigma grid;
an estimate is the mean over clips with a percentile bootstrap over clips. One fixed set of
resamples serves every estimate, so intervals of differences and ratios are paired.
"""

from __future__ import annotations

import numpy as np

from moe.dit.validation import Measurement
from moe.eval.report import REGIONS, Estimate, Improvement, KnockoutReport, RegionLosses, VariantReport


def _mean(values: np.ndarray) -> float | None:
    valid = np.isfinite(values)
    return float(values[valid].mean()) if valid.any() else None


class Bootstrap:
    """Percentile bootstrap over clips with fixed resamples (counts [B, N] of each clip)."""

    def __init__(self, clips: int, samples: int, seed: int):
        rng = np.random.default_rng([seed, 7])
        self.counts = rng.multinomial(clips, np.full(clips, 1.0 / clips), size=samples).astype(np.float64)

    def _replicates(self, values: np.ndarray, valid: np.ndarray) -> np.ndarray:
        c = self.counts * valid
        with np.errstate(invalid="ignore", divide="ignore"):
            return (c * np.where(valid, values, 0.0)).sum(1) / c.sum(1)

    @staticmethod
    def _estimate(point: float | None, reps: np.ndarray, clips: int) -> Estimate:
        reps = reps[np.isfinite(reps)]
        if point is None or not len(reps):
            return Estimate(mean=None, low=None, high=None, clips=clips)
        low, high = np.percentile(reps, [2.5, 97.5])
        return Estimate(mean=point, low=float(low), high=float(high), clips=clips)

    def mean(self, values: np.ndarray) -> Estimate:
        valid = np.isfinite(values)
        return self._estimate(_mean(values), self._replicates(values, valid), int(valid.sum()))

    def relative_change(self, before: np.ndarray, after: np.ndarray) -> Estimate:
        """(mean(after) - mean(before)) / mean(before) over the clips measured in both, paired."""
        valid = np.isfinite(before) & np.isfinite(after)
        if not valid.any():
            return Estimate(mean=None, low=None, high=None, clips=0)
        b, a = before[valid].mean(), after[valid].mean()
        with np.errstate(invalid="ignore", divide="ignore"):
            reps = self._replicates(after, valid) / self._replicates(before, valid) - 1.0
        return self._estimate(float(a / b - 1.0), reps, int(valid.sum()))

    def improvement(self, before: np.ndarray, after: np.ndarray) -> Estimate:
        """(mean(before) - mean(after)) / mean(before): positive when `after` is better."""
        change = self.relative_change(before, after)
        if change.mean is None:
            return change
        return Estimate(mean=-change.mean, low=-change.high, high=-change.low, clips=change.clips)


def _masked(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, values, np.nan)


def region_estimates(m: Measurement, boot: Bootstrap, variant: str, mask: np.ndarray | None = None) -> RegionLosses:
    mask = np.ones(len(m.clip_ids), bool) if mask is None else mask
    return RegionLosses(**{r: boot.mean(_masked(m.clip_values(variant, r), mask)) for r in REGIONS})


def variant_report(m: Measurement, boot: Bootstrap, variant: str, description: str) -> VariantReport:
    grid = m.losses[variant]
    by_sigma = {f"{s:g}": {r: _mean(grid[:, j, REGIONS.index(r)]) for r in REGIONS} for j, s in enumerate(m.sigmas)}
    by_class = {e: region_estimates(m, boot, variant, m.class_mask(e)) for e in m.experts if m.class_mask(e).any()}
    return VariantReport(
        name=variant,
        description=description,
        losses=region_estimates(m, boot, variant),
        by_sigma=by_sigma,
        by_class=by_class,
    )


def improvements(m: Measurement, boot: Bootstrap, pairs: list[tuple[str, str]]) -> list[Improvement]:
    return [
        Improvement(before=b, after=a, region=r, relative=boot.improvement(m.clip_values(b, r), m.clip_values(a, r)))
        for b, a in pairs
        if b in m.losses and a in m.losses
        for r in REGIONS
    ]


def hint_matrix(m: Measurement) -> dict[str, dict[str, float | None]]:
    """Hinted expert -> class -> mean ROI loss of that class's clips with the expert forced."""
    return {
        e: {c: _mean(_masked(m.clip_values(f"stage2_hint_{e}", "roi"), m.class_mask(c))) for c in m.experts if m.class_mask(c).any()}
        for e in m.experts
    }


def knockout_report(m: Measurement, boot: Bootstrap) -> KnockoutReport:
    """Relative loss change per class when each expert is switched off (positive = it helped)."""

    def deltas(region: str) -> dict[str, dict[str, Estimate]]:
        learned = m.clip_values("stage2_learned", region)
        return {
            e: {
                c: boot.relative_change(_masked(learned, m.class_mask(c)), m.clip_values(f"stage2_knockout_{e}", region))
                for c in m.experts
                if m.class_mask(c).any()
            }
            for e in m.experts
        }

    return KnockoutReport(roi_delta=deltas("roi"), overall_delta=deltas("overall"))
