"""Fréchet distance, the polynomial-kernel MMD of KID/KVD, and a percentile bootstrap, in float64.

Fréchet distance between Gaussians fitted to two feature sets (FID, Heusel et al. 2017; FVD,
Unterthiner et al. 2018):

    d² = |mu_x - mu_y|² + tr(S_x) + tr(S_y) - 2 tr((S_x S_y)^(1/2))

with unbiased covariances (ddof 1, as `np.cov` and tf-gan). The trace term is computed without a
non-symmetric matrix square root (scipy's `sqrtm` of `S_x S_y` can return complex noise): for any
factors with `A^T A = S_x` and `B^T B = S_y`, the eigenvalues of `S_x S_y` are the squared singular
values of `A B^T`, so `tr((S_x S_y)^(1/2)) = ||A B^T||_*` (nuclear norm). A factor is the centred
data / sqrt(n - 1) when n - 1 <= d (exact, cheap: few clips) and the symmetric eigen square root of
the covariance otherwise. With identical sets both factors coincide and d² is 0 to rounding.

KID / KVD (Bińkowski et al. 2018): the unbiased MMD² with the kernel k(x, y) = (x.y / d + 1)^3.
When both sets have at most `subset_size` rows it is the full unbiased estimator (unequal sizes
allowed); otherwise, as StyleGAN2-ADA/3 and torch-fidelity do, the mean of the equal-size
estimator over `subsets` random subsets of m = min(subset_size, n_x, n_y) rows of each set.
KID can be negative (an unbiased estimate of a value near 0).
"""

from __future__ import annotations

import numpy as np
import torch

KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000


def _f64(x, device) -> torch.Tensor:
    return torch.as_tensor(x).to(device=device, dtype=torch.float64)


def _factor(x: torch.Tensor) -> torch.Tensor:
    """F with F^T F = cov(x) (ddof 1)."""
    n, d = x.shape
    centred = x - x.mean(0)
    if n - 1 <= d:
        return centred / (n - 1) ** 0.5
    cov = centred.T @ centred / (n - 1)
    w, v = torch.linalg.eigh(cov)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(x, y, device="cpu") -> float:
    """Fréchet distance between Gaussians fitted to features x [n, d] and y [m, d] (n, m >= 2)."""
    x, y = _f64(x, device), _f64(y, device)
    fx, fy = _factor(x), _factor(y)
    trace_sqrt = torch.linalg.svdvals(fx @ fy.T).sum()
    diff = x.mean(0) - y.mean(0)
    return float(diff @ diff + (fx * fx).sum() + (fy * fy).sum() - 2 * trace_sqrt)


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, block: int = 2048) -> torch.Tensor:
    """The sum of k(a_i, b_j) over all pairs, in row blocks to bound memory."""
    total = torch.zeros((), dtype=a.dtype, device=a.device)
    for start in range(0, len(a), block):
        total = total + ((a[start : start + block] @ b.T / a.shape[1] + 1) ** 3).sum()
    return total


def _within_mean(a: torch.Tensor) -> torch.Tensor:
    """The mean of k(a_i, a_j) over pairs i != j."""
    n = len(a)
    diagonal = (((a * a).sum(1) / a.shape[1] + 1) ** 3).sum()
    return (_kernel_sum(a, a) - diagonal) / (n * (n - 1))


def _mmd2_full(x: torch.Tensor, y: torch.Tensor) -> float:
    """The unbiased estimator on all rows (sizes may differ)."""
    return float(_within_mean(x) + _within_mean(y) - 2 * _kernel_sum(x, y) / (len(x) * len(y)))


def polynomial_mmd2(
    x,
    y,
    *,
    rng: np.random.Generator | None = None,
    subsets: int = KID_SUBSETS,
    subset_size: int = KID_SUBSET_SIZE,
    device="cpu",
    method: str = "protocol",
) -> float:
    """Unbiased MMD² with the cubic polynomial kernel (KID, KVD) of x [n, d] and y [m, d].

    method "protocol": all rows when both sets have at most `subset_size`, else the mean over
    `subsets` random subsets of m = min(subset_size, n, m) rows (StyleGAN2-ADA/3, torch-fidelity).
    method "fastest": whichever of the two costs fewer kernel evaluations (both estimate the same
    MMD² without bias; the bootstrap uses this)."""
    x, y = _f64(x, device), _f64(y, device)
    m = min(subset_size, len(x), len(y))
    if method == "protocol":
        full = max(len(x), len(y)) <= subset_size
    elif method == "fastest":
        full = len(x) ** 2 + len(y) ** 2 + len(x) * len(y) <= 3 * subsets * m * m
    else:
        raise ValueError(f"unknown method {method!r}")
    if full:
        return _mmd2_full(x, y)
    rng = rng if rng is not None else np.random.default_rng(0)
    total = 0.0
    for _ in range(subsets):
        xs = x[torch.from_numpy(rng.choice(len(x), m, replace=False)).to(x.device)]
        ys = y[torch.from_numpy(rng.choice(len(y), m, replace=False)).to(y.device)]
        total += _mmd2_full(xs, ys)
    return total / subsets


def bootstrap_interval(value: float, replicates, level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, bias): the percentile interval of the replicates shifted by the bootstrap's
    bias estimate `bias = mean(replicates) - value`, i.e. recentred on the point estimate.

    Resampling clips with replacement duplicates some of them, which by itself inflates a
    Fréchet distance (fewer distinct clips, noisier covariances) and the within-set kernel terms
    of MMD; with few clips the raw replicates can all lie above the value. Removing that mean
    shift leaves the spread of the estimate at this clip count, the quantity that matters when
    variants are compared on the same clips. The raw percentile interval is (low + bias,
    high + bias)."""
    values = np.asarray(replicates, dtype=np.float64)
    values = values[np.isfinite(values)]
    bias = float(values.mean() - value)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values - bias, [tail, 100 - tail])
    return float(low), float(high), bias
