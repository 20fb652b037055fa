"""Frame fitting: resize a clip keeping its aspect so it covers the training bucket, then crop
the centre. Frames and ROI masks go through this one mapping (`CoverCrop`), so a mask lines up
with the latents of the frames it annotates."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_RESIZE_CHUNK = 8  # frames resized at once: bounds the float copy of a 1080p source clip


@dataclass(frozen=True)
class CoverCrop:
    """Resize a (W0, H0) source keeping its aspect so it covers `size` = (W, H), then crop the
    centre. Frames and ROI go through this one mapping, so the mask lines up with the latents."""

    source: tuple[int, int]
    resized: tuple[int, int]
    size: tuple[int, int]

    @classmethod
    def fit(cls, source: tuple[int, int], size: tuple[int, int]) -> CoverCrop:
        scale = max(size[0] / source[0], size[1] / source[1])
        resized = (max(size[0], round(source[0] * scale)), max(size[1], round(source[1] * scale)))
        return cls(source, resized, size)

    @property
    def offset(self) -> tuple[int, int]:
        return (self.resized[0] - self.size[0]) // 2, (self.resized[1] - self.size[1]) // 2

    def apply(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [n, H0, W0, 3] -> float32 [n, 3, H, W] in [-1, 1].

        `interpolate` with an explicit size maps pixel edges to pixel edges (scale = in / out),
        which is the mapping `cell_weights` uses for the ROI.
        """
        x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.resized != self.source:
            x = F.interpolate(x, size=self.resized[::-1], mode="bilinear", antialias=True, align_corners=False).clamp(-1.0, 1.0)
        (left, top), (width, height) = self.offset, self.size
        return x[:, :, top : top + height, left : left + width]

    def cell_weights(self, cell: int) -> tuple[np.ndarray, np.ndarray]:
        """(ay [h, H0], ax [w, W0]): the share of each output cell row/column that each source
        pixel row/column covers. For a binary source image m, `ay @ m @ ax.T` is the exact
        fraction of each cell's area that m covers (the mapping is axis-aligned and affine)."""
        return tuple(self._axis_weights(axis, cell) for axis in (1, 0))

    def _axis_weights(self, axis: int, cell: int) -> np.ndarray:
        edges = np.arange(0, self.size[axis] + 1, cell, dtype=np.float64)
        edges = (edges + self.offset[axis]) * self.source[axis] / self.resized[axis]
        lo, hi = edges[:-1, None], edges[1:, None]
        pixel = np.arange(self.source[axis], dtype=np.float64)[None, :]
        overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
        return overlap / (hi - lo)


def fit_frames(frames: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 frames [F, H0, W0, 3] -> float32 [1, 3, F, H, W] in [-1, 1] (what `encode_video`
    takes), resized to cover `size` = (W, H) and centre-cropped, a few frames at a time."""
    frames = torch.as_tensor(frames)
    crop = CoverCrop.fit((frames.shape[2], frames.shape[1]), size)
    fitted = torch.cat([crop.apply(chunk) for chunk in frames.split(_RESIZE_CHUNK)])
    return fitted.permute(1, 0, 2, 3).unsqueeze(0).contiguous()
