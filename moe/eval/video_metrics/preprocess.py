"""Videos in, the two networks' inputs out, as the reference implementations prepare them.

Input convention: a batch of clips as uint8 `[N, F, H, W, 3]` (numpy or torch, RGB, the layout
of decoded video frames and of `moe.inference.generate_video`), or float in [-1, 1] in the same
layout; a list of `[F, H, W, 3]` clips may have different frame counts and sizes. Float clips are
quantised to uint8 as `round((x + 1) * 127.5)` first, as a generated video saved to MP4 would be
(the papers' protocols compare uint8 videos).

Both networks see frames resized with TF1's `tf.image.resize_bilinear` (align_corners=False,
no half-pixel centres, no antialiasing), which both reference implementations use: the FVD code
(`frechet_video_distance.preprocess`) resizes the uint8-valued frames to 224x224 and scales them
to [-1, 1]; NVIDIA's Inception (StyleGAN2-ADA/3 metrics) resizes to 299x299 and maps [0, 255] to
[-1, 1) by (x - 128) / 128. Neither keeps the aspect ratio: a frame is stretched to the square.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from moe.errors import MoeError


def _as_uint8_clip(clip, where: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(clip)) if not isinstance(clip, torch.Tensor) else clip.detach().cpu()
    if t.ndim != 4 or t.shape[-1] != 3:
        raise MoeError(f"{where}: a clip must be [F, H, W, 3] (RGB, channels last), got shape {tuple(t.shape)}")
    if t.dtype == torch.uint8:
        return t
    if not t.is_floating_point():
        raise MoeError(f"{where}: clips must be uint8 in [0, 255] or float in [-1, 1], got {t.dtype}")
    if not torch.isfinite(t).all():
        raise MoeError(f"{where}: a clip holds NaN or infinite values")
    if t.min() < -1.001 or t.max() > 1.001:
        raise MoeError(f"{where}: float clips must lie in [-1, 1], got values in [{t.min():.3g}, {t.max():.3g}]")
    return ((t.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def as_clips(videos, where: str) -> list[torch.Tensor]:
    """`[N, F, H, W, 3]` (array or tensor) or a sequence of `[F, H, W, 3]` clips -> a list of
    uint8 CPU tensors `[F, H, W, 3]`."""
    if isinstance(videos, (np.ndarray, torch.Tensor)):
        if videos.ndim != 5:
            raise MoeError(f"{where}: videos must be [N, F, H, W, 3] or a list of [F, H, W, 3] clips, got shape {tuple(videos.shape)}")
        videos = list(videos)
    elif not isinstance(videos, Sequence):
        raise MoeError(f"{where}: videos must be an array [N, F, H, W, 3] or a list of clips, got {type(videos).__name__}")
    return [_as_uint8_clip(clip, where) for clip in videos]


def _source_coords(out_size: int, in_size: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 legacy bilinear: source = dest * in/out; neighbours floor and floor+1 clamped."""
    scale = in_size / out_size
    src = torch.arange(out_size, device=device, dtype=torch.float64) * scale
    low = src.floor().clamp(max=in_size - 1)
    frac = (src - low).to(torch.float32)
    low = low.long()
    high = (low + 1).clamp(max=in_size - 1)
    return low, high, frac


def tf1_resize_bilinear(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """`tf.compat.v1.image.resize_bilinear(x, size)` (align_corners=False, half_pixel_centers=
    False) for float `[B, C, H, W]`: the resize of the original FVD code and of NVIDIA's
    Inception feature extractor (their grid_sample form gives the same values)."""
    height, width = size
    if tuple(x.shape[-2:]) == (height, width):
        return x
    y0, y1, fy = _source_coords(height, x.shape[-2], x.device)
    x0, x1, fx = _source_coords(width, x.shape[-1], x.device)
    top, bottom = x[..., y0, :], x[..., y1, :]
    rows = top + (bottom - top) * fy.to(x.dtype)[:, None]
    left, right = rows[..., x0], rows[..., x1]
    return left + (right - left) * fx.to(x.dtype)


def i3d_input(clips: list[torch.Tensor], device, size: int = 224) -> torch.Tensor:
    """uint8 clips `[F, H, W, 3]` (same F) -> float32 `[B, 3, F, 224, 224]` in [-1, 1]."""
    video = torch.stack(clips).to(device)  # [B, F, H, W, 3]
    b, f, h, w, c = video.shape
    frames = video.reshape(b * f, h, w, c).permute(0, 3, 1, 2).float()
    frames = tf1_resize_bilinear(frames, (size, size))
    frames = 2.0 * frames / 255.0 - 1.0
    return frames.reshape(b, f, c, size, size).permute(0, 2, 1, 3, 4).contiguous()


def inception_input(frames: torch.Tensor, device, size: int = 299) -> torch.Tensor:
    """uint8 frames `[B, H, W, 3]` -> float32 `[B, 3, 299, 299]` in [-1, 1) as NVIDIA's
    Inception wrapper prepares them: TF1 bilinear resize of the [0, 255] values, (x - 128) / 128."""
    x = frames.to(device).permute(0, 3, 1, 2).float()
    x = tf1_resize_bilinear(x, (size, size))
    return (x - 128.0) / 128.0
