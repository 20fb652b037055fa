"""The router (SPEC section 5): one per model, shared by every target module, one decision per sample.

Input = concat(
    mean of the text embedding over its valid tokens          [text_dim],
    sinusoidal embedding of sigma                              [sigma_dim],
    I2V only: first-frame latent, mean over h and w             [image_channels]),
then `Linear(in, hidden=64) -> SiLU -> Linear(hidden, E)` gives logits; p = softmax(logits).
Gates are the top-2 of p renormalised to sum 1 (`top_k_gates`).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from moe.config.instruments import INSTRUMENT_CLASSES


class RouterConfig(BaseModel):
    model_config = ConfigDict(frozen=True)

    text_dim: int = Field(gt=0)  # UMT5 d_model: 4096 (32 for tiny presets)
    sigma_dim: int = Field(32, gt=0)  # even: half cos, half sin
    image_channels: int = Field(0, ge=0)  # first-frame latent channels for I2V (16); 0 for T2V
    hidden: int = Field(64, gt=0)
    num_experts: int = Field(len(INSTRUMENT_CLASSES), gt=0)
    top_k: int = Field(2, gt=0)

    @model_validator(mode="after")
    def _check(self) -> RouterConfig:
        if self.sigma_dim % 2:
            raise ValueError(f"sigma_dim must be even, got {self.sigma_dim}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k {self.top_k} is more than the {self.num_experts} experts")
        return self

    @property
    def in_features(self) -> int:
        return self.text_dim + self.sigma_dim + self.image_channels

    @classmethod
    def for_preset(cls, preset, **kwargs) -> RouterConfig:
        """Sizes from a `moe.config.presets.WanPreset`: I2V uses the conditioning's latent channels
        (z_dim = the DiT's out_channels, i.e. without the 4 mask channels)."""
        image_channels = preset.dit.out_channels if preset.i2v else 0
        return cls(text_dim=preset.dit.text_dim, image_channels=image_channels, **kwargs)


def sigma_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """[cos(t f_i), sin(t f_i)] with t = 1000 sigma and f_i = 10000^(-i / (dim/2)), i < dim/2:
    the sinusoidal form of Wan's own timestep embedding, on the same t. sigma [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = 1000.0 * sigma.float()[:, None] * freqs
    return torch.cat([args.cos(), args.sin()], dim=-1)


def pool_text(text: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of text [B, L, D] over the tokens where mask [B, L] is set (all tokens if None)."""
    if mask is None:
        return text.mean(dim=1)
    m = mask.to(text.dtype)[..., None]
    return (text * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def top_k_gates(p: torch.Tensor, k: int = 2) -> torch.Tensor:
    """Keep the k largest probabilities of p [B, E], zero the rest, renormalise to sum 1.
    Differentiable w.r.t. the kept entries of p."""
    values, index = p.topk(k, dim=-1)
    kept = torch.zeros_like(p).scatter(-1, index, values)
    return kept / kept.sum(dim=-1, keepdim=True)


class Router(nn.Module):
    """`forward(text, text_mask, sigma, image_cond=None) -> logits [B, E]`.

    text [B, L, text_dim] and text_mask [B, L] (1 = real token; None = all real); sigma [B];
    image_cond [B, C, F, H, W] for I2V: the I2V conditioning (mask channels, then the first-frame
    latent) or the latent alone; its LAST `image_channels` channels of latent frame 0 are pooled.
    """

    def __init__(self, config: RouterConfig):
        super().__init__()
        self.config = config
        self.mlp = nn.Sequential(nn.Linear(config.in_features, config.hidden), nn.SiLU(), nn.Linear(config.hidden, config.num_experts))

    def features(self, text, text_mask, sigma, image_cond=None) -> torch.Tensor:
        cfg = self.config
        if (image_cond is None) != (cfg.image_channels == 0):
            raise ValueError(f"the router takes an I2V image input iff image_channels > 0 (is {cfg.image_channels})")
        parts = [pool_text(text.float(), text_mask), sigma_embedding(sigma, cfg.sigma_dim)]
        if image_cond is not None:
            parts.append(image_cond[:, -cfg.image_channels :, 0].float().mean(dim=(-2, -1)))
        return torch.cat(parts, dim=-1).to(self.mlp[0].weight.dtype)

    def forward(self, text, text_mask, sigma, image_cond=None) -> torch.Tensor:
        """fp32 logits, also under autocast: routing is a small MLP whose decisions scale every
        adapted layer, so it never runs in bf16."""
        with torch.autocast(text.device.type, enabled=False):
            return self.mlp(self.features(text, text_mask, sigma, image_cond))
