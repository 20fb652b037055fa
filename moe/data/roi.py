"""ROI masks on the latent grid (SPEC section 6).

The union of a frame's tip boxes (and mask-video pixels) is mapped through the clip's cover-resize
+ centre crop (`moe.data.cover_crop.CoverCrop`); each latent cell gets the exact fraction of its
area that the union covers (area average per frame); the per-frame maps are reduced with max over
Wan's causal VAE groups (latent frame 0 <- pixel frame 0, latent frame t >= 1 <- pixel frames
4t-3 .. 4t). Training turns the mask m into loss weights `1 + (lambda_roi - 1) m`
(`moe.dit.flow_matching.roi_weights`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from pathlib import Path

import numpy as np
import torch

from moe.data.cover_crop import CoverCrop
from moe.data.video import iter_frames
from moe.errors import MoeError


def temporal_max(per_frame: torch.Tensor, temporal: int = 4) -> torch.Tensor:
    """[F, h, w] -> [T, h, w] with Wan's causal grouping: latent frame 0 <- frame 0, latent
    frame t >= 1 <- max over frames (t-1)*temporal+1 .. t*temporal."""
    rest = per_frame[1:]
    if rest.shape[0] % temporal:
        raise MoeError(f"{per_frame.shape[0]} frames do not fit the VAE's groups ({temporal}k+1 needed)")
    grouped = rest.reshape(-1, temporal, *rest.shape[1:]).amax(dim=1)
    return torch.cat([per_frame[:1], grouped])


def _boxes_by_frame(boxes: Iterable[Sequence[int]], source: tuple[int, int]) -> dict[int, list]:
    width, height = source
    by_frame: dict[int, list] = defaultdict(list)
    for frame, x0, y0, x1, y1 in boxes:
        if x1 > width or y1 > height:
            raise MoeError(f"tip box {[frame, x0, y0, x1, y1]} lies outside the {width}x{height} video; boxes are in pixels of the source video")
        by_frame[frame].append((x0, y0, x1, y1))
    return by_frame


def _mask_frames(path: Path, frames: int, source: tuple[int, int]) -> Iterator[np.ndarray]:
    """bool [H0, W0] per frame of a mask video: grey (ITU-R 601 luma) > 127."""
    count = 0
    for _, rgb in iter_frames(path, only=range(frames)):
        if (rgb.shape[1], rgb.shape[0]) != source:
            raise MoeError(
                f"mask video {path} is {rgb.shape[1]}x{rgb.shape[0]}, the clip's video {source[0]}x{source[1]}; a mask must match its video"
            )
        grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        count += 1
        yield grey > 127
    if count < frames:
        raise MoeError(f"mask video {path} has {count} frames, fewer than the {frames} cached")


def _roi_frames(boxes: Iterable[Sequence[int]], mask: Path | None, source: tuple[int, int], frames: int) -> Iterator[np.ndarray]:
    """Per source frame, bool [H0, W0]: the union of the frame's tip boxes and mask pixels.
    Building the union in pixels makes overlapping boxes count once."""
    by_frame = _boxes_by_frame(boxes, source)
    masks = _mask_frames(mask, frames, source) if mask is not None else repeat(None)
    for frame, mask_pixels in zip(range(frames), masks):
        covered = np.zeros(source[::-1], dtype=bool) if mask_pixels is None else mask_pixels
        for x0, y0, x1, y1 in by_frame.get(frame, ()):
            covered[y0:y1, x0:x1] = True
        yield covered


def roi_mask(
    boxes: Iterable[Sequence[int]],
    mask: Path | None,
    source: tuple[int, int],
    size: tuple[int, int],
    frames: int,
    cell: int = 8,
    temporal: int = 4,
) -> torch.Tensor:
    """The latent-grid ROI mask float32 [T, H/cell, W/cell] in [0, 1] of a clip.

    boxes: `[frame, x0, y0, x1, y1]` in source pixels (slice semantics; frames >= `frames` are
    ignored); mask: a mask video of the source's size, or None; source / size: (width, height).
    """
    ay, ax = CoverCrop.fit(source, size).cell_weights(cell)
    coverage = np.stack(
        [
            ay @ covered.astype(np.float64) @ ax.T if covered.any() else np.zeros((len(ay), len(ax)))
            for covered in _roi_frames(boxes, mask, source, frames)
        ]
    )
    per_frame = torch.from_numpy(np.clip(coverage, 0.0, 1.0)).float()
    return temporal_max(per_frame, temporal)
