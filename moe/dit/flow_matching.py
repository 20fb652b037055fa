"""Rectified-flow training maths (SPEC section 6).

    x_sigma = (1 - sigma) x0 + sigma eps,   target = eps - x0,   timestep = 1000 sigma

Sigma sampling: `shift` (uniform u, then the SD3/Wan shift sigma = s u / (1 + (s - 1) u)),
`logit_normal` (sigma = sigmoid(n), n ~ N(0, 1)) or `uniform`; optionally restricted to a range.
ROI weighting: w = 1 + (lambda_roi - 1) m on the latent grid; per-sample loss sum(w l) / sum(w).
"""

from __future__ import annotations

import torch

from moe.config.train import SigmaSampling


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def sample_sigmas(
    n: int,
    generator: torch.Generator,
    mode: SigmaSampling = "shift",
    shift: float = 5.0,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """`n` sigmas from the chosen distribution restricted to [low, high) by resampling (the
    restriction keeps the distribution's shape inside the range, as clipping would not)."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"empty sigma range [{low}, {high})")
    out = torch.empty(0)
    for _ in range(1000):
        if mode == "shift":
            s = shift_sigma(torch.rand(4 * n + 16, generator=generator), shift)
        elif mode == "logit_normal":
            s = torch.sigmoid(torch.randn(4 * n + 16, generator=generator))
        elif mode == "uniform":
            s = torch.rand(4 * n + 16, generator=generator)
        else:
            raise ValueError(f"unknown sigma sampling {mode!r}")
        out = torch.cat([out, s[(s >= low) & (s < high)]])
        if len(out) >= n:
            return out[:n]
    raise ValueError(f"sigma range [{low}, {high}) is too narrow for {mode} sampling with shift {shift}")


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def roi_weights(roi: torch.Tensor, lambda_roi: float) -> torch.Tensor:
    """[B, T, h, w] ROI coverage in [0, 1] -> loss weights 1 + (lambda_roi - 1) m."""
    return 1 + (lambda_roi - 1) * roi


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error per latent element [B, C, T, h, w], reduced per sample to sum(w l) / sum(w);
    `weights` [B, T, h, w] broadcast over channels (None = plain mean)."""
    err = (pred.float() - target.float()) ** 2
    if weights is None:
        return err.flatten(1).mean(1)
    w = weights.unsqueeze(1).float().expand_as(err)
    return (w * err).flatten(1).sum(1) / w.flatten(1).sum(1)


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error over the latent cells where `mask` [B, T, h, w] is set
    (channels included); NaN for samples whose mask is empty."""
    err = ((pred.float() - target.float()) ** 2).mean(1)
    m = mask.float()
    return (err * m).flatten(1).sum(1) / m.flatten(1).sum(1)
