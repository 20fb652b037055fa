"""How well a VAE gives videos back: PSNR of decode(encode(x)) against x.

The round trip is the one training and sampling use (`moe.wan.encoding`: normalised posterior
mode in, denormalised decode out), so the number says what the sample videos and the "real"
clips reconstructed from cached latents can show at best.

For the tiny VAE the ceiling is the encoder's: per 4x8x8 cell it keeps the mean colour and
mean luminance gradients, so detail inside a cell (instrument edges, vessels, glints) is gone.
On the synthetic surgical clips (64x64, 17 frames) that bounds any decoder near 23 dB: with the
first, smaller instruments a linear least-squares decoder from 3x3 neighbouring cells' features
reached 22.9 dB, exact cell colours upsampled bilinearly 21.5 dB and the tiny decoder 21.2-21.7 dB
(means over 16 clips). With today's (`moe.tiny.synth.INSTRUMENT_SCALE` 2.0) the tiny decoder
reaches 21.1 dB on 4 held-out clips, 0.2 dB above exact cell colours upsampled bilinearly.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan

from moe.errors import MoeError
from moe.wan.encoding import decode_latents, encode_video

# MSE floor: identical videos give 100 dB rather than infinity (reports are JSON).
_MIN_MSE = 1e-10


@torch.no_grad()
def reconstruct(vae: AutoencoderKLWan, videos: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """decode(encode(videos)) for float videos [N, 3, F, H, W] in [-1, 1] (F = 4k+1, H and W
    multiples of 8), as float32 [N, 3, F, H, W] in [-1, 1] on the videos' device; `batch_size`
    clips go through the VAE at a time, which bounds its activation memory."""
    _check_videos(videos)
    if batch_size < 1:
        raise MoeError(f"batch_size must be at least 1, got {batch_size}")
    out = [decode_latents(vae, encode_video(vae, chunk.float())).to(videos.device) for chunk in videos.split(batch_size)]
    return torch.cat(out)


def reconstruction_psnr(vae: AutoencoderKLWan, videos: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Per-clip PSNR (dB) of the VAE round trip: videos [N, 3, F, H, W] in [-1, 1] -> float32 [N].

    Peak-to-peak is the full range (2 in [-1, 1], i.e. 255 in uint8), so the numbers are the
    usual 8-bit-image PSNR; capped at 100 dB for identical videos."""
    recon = reconstruct(vae, videos, batch_size)
    mse = ((recon - videos.float()) / 2.0).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(_MIN_MSE))


def _check_videos(videos: torch.Tensor) -> None:
    if not (isinstance(videos, torch.Tensor) and videos.is_floating_point() and videos.ndim == 5 and videos.shape[1] == 3):
        what = f"{videos.dtype} {tuple(videos.shape)}" if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise MoeError(
            f"reconstruction needs float videos [N, 3, F, H, W] in [-1, 1], got {what}; convert uint8 "
            f"[N, F, H, W, 3] frames with x.permute(0, 4, 1, 2, 3).float() / 127.5 - 1"
        )
    if videos.numel() and (videos.min() < -1.0 - 1e-6 or videos.max() > 1.0 + 1e-6):
        raise MoeError(
            f"reconstruction needs videos in [-1, 1], got values in [{float(videos.min()):.3g}, "
            f"{float(videos.max()):.3g}]; scale uint8 frames with x / 127.5 - 1"
        )
