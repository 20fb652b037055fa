"""Encoding with the Wan2.2 components, exactly as diffusers' Wan pipelines do it.

Prompt embeddings (`WanPipeline._get_t5_prompt_embeds`), normalised VAE latents
`(mode(encode(x)) - latents_mean) / latents_std` and their inverse, and the I2V conditioning
(`WanImageToVideoPipeline.prepare_latents`: the 4-channel first-frame mask and the first-frame
latent). The latent cache and generation both use these, so the conditioning we train on is the
conditioning diffusers produces at inference.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from moe.errors import MoeError


@torch.no_grad()
def encode_prompts(
    text_encoder: UMT5EncoderModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_length: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """UMT5 embeddings of `prompts` exactly as diffusers' `WanPipeline._get_t5_prompt_embeds`
    makes them: cleaned text, padded/truncated to `max_length` with `</s>` appended, and every
    position past a prompt's valid length zeroed (the DiT attends to all `max_length` tokens, so
    the padding must be zeros, not UMT5's padding outputs).

    Returns (embeds [B, L, d] in the text encoder's dtype, mask [B, L] int64: 1 = valid token),
    both on the text encoder's device.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    inputs = tokenizer(
        [prompt_clean(p) for p in prompts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = text_encoder.device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    valid = mask.gt(0).unsqueeze(-1)
    return hidden * valid.to(hidden.dtype), mask.long()


def _latent_stats(vae: AutoencoderKLWan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents_mean, 1 / latents_std) as float32 [1, z, 1, 1, 1], as the pipelines build them."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, z, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, z, 1, 1, 1)
    return mean.to(device), inv_std.to(device)


def _video_to_model_input(frames: torch.Tensor) -> torch.Tensor:
    """uint8 [F, H, W, 3] or [B, F, H, W, 3] -> float32 [B, 3, F, H, W] in [-1, 1]; a float
    tensor must already be [B, 3, F, H, W] in [-1, 1]."""
    if frames.dtype == torch.uint8:
        if frames.ndim == 4:
            frames = frames.unsqueeze(0)
        if frames.ndim != 5 or frames.shape[-1] != 3:
            raise MoeError(f"uint8 video must be [F, H, W, 3] or [B, F, H, W, 3], got {tuple(frames.shape)}")
        return frames.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    if not frames.is_floating_point() or frames.ndim != 5 or frames.shape[1] != 3:
        raise MoeError(f"video must be uint8 [F, H, W, 3] or float [B, 3, F, H, W] in [-1, 1], got {frames.dtype} {tuple(frames.shape)}")
    return frames


def _check_video_size(vae: AutoencoderKLWan, x: torch.Tensor) -> None:
    t, s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    f, h, w = x.shape[2:]
    if (f - 1) % t or h % s or w % s:
        raise MoeError(f"video of {f} frames at {h}x{w} does not fit the VAE: frames must be {t}k+1 and height/width multiples of {s}")


@torch.no_grad()
def _encode_normalised(vae: AutoencoderKLWan, x: torch.Tensor) -> torch.Tensor:
    """Deterministic latents (the posterior mode, diffusers' sample_mode="argmax") normalised
    with the VAE's latents_mean/std, in float32."""
    latents = vae.encode(x.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode().float()
    mean, inv_std = _latent_stats(vae, latents.device)
    return (latents - mean) * inv_std


def encode_video(vae: AutoencoderKLWan, frames: torch.Tensor) -> torch.Tensor:
    """Normalised training latents `(mode(vae.encode(x)) - latents_mean) / latents_std`.

    frames: uint8 [F, H, W, 3] (one clip) / [B, F, H, W, 3], or float [B, 3, F, H, W] in [-1, 1];
    F = 4k+1, H and W multiples of 8. The VAE runs in its own dtype and device; the result is
    float32 [B, z, k+1, H/8, W/8] on the VAE's device.
    """
    x = _video_to_model_input(frames)
    _check_video_size(vae, x)
    return _encode_normalised(vae, x)


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor, output: str = "float") -> torch.Tensor:
    """The inverse of `encode_video`: denormalise (in float32), decode in the VAE's dtype.

    output="float": float32 [B, 3, F, H, W] clamped to [-1, 1]; output="uint8": uint8
    [B, F, H, W, 3] (the layout `encode_video` accepts).
    """
    if output not in ("float", "uint8"):
        raise MoeError(f"decode_latents output must be 'float' or 'uint8', got {output!r}")
    mean, inv_std = _latent_stats(vae, latents.device)
    latents = latents.float() / inv_std + mean
    video = vae.decode(latents.to(device=vae.device, dtype=vae.dtype), return_dict=False)[0]
    video = video.float().clamp(-1.0, 1.0)
    if output == "float":
        return video
    return ((video + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1)


def _image_to_model_input(image: torch.Tensor) -> torch.Tensor:
    """uint8 [H, W, 3] / [B, H, W, 3] or float [B, 3, H, W] in [-1, 1] -> float [B, 3, H, W]."""
    if image.dtype == torch.uint8:
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[-1] != 3:
            raise MoeError(f"uint8 image must be [H, W, 3] or [B, H, W, 3], got {tuple(image.shape)}")
        return image.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if not image.is_floating_point() or image.ndim != 4 or image.shape[1] != 3:
        raise MoeError(f"image must be uint8 [H, W, 3] or float [B, 3, H, W] in [-1, 1], got {image.dtype} {tuple(image.shape)}")
    return image.float()


def i2v_first_frame_mask(batch: int, num_frames: int, height: int, width: int, temporal: int = 4) -> torch.Tensor:
    """The 4-channel I2V mask [B, 4, T_lat, h, w] of `WanImageToVideoPipeline.prepare_latents`:
    a per-pixel-frame mask (1 on frame 0, 0 elsewhere) whose first frame is repeated `temporal`
    times, so the F + 3 = 4 * T_lat frames fold into `temporal` channels per latent frame."""
    mask = torch.ones(batch, 1, num_frames, height, width)
    mask[:, :, 1:] = 0
    first = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
    mask = torch.cat([first, mask[:, :, 1:]], dim=2)
    mask = mask.view(batch, -1, temporal, height, width)
    return mask.transpose(1, 2)


def i2v_condition(vae: AutoencoderKLWan, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Wan2.1/2.2 A14B image-to-video conditioning, as `WanImageToVideoPipeline.prepare_latents`
    builds it (expand_timesteps=False): cat([mask 4, normalised latent of (image, then
    num_frames - 1 zero frames) 16], dim=1) -> float32 [B, 20, T_lat, H/8, W/8].

    first_frame: uint8 [H, W, 3] / [B, H, W, 3] or float [B, 3, H, W] in [-1, 1].
    """
    image = _image_to_model_input(first_frame)
    b, _, h, w = image.shape
    video = torch.cat([image.unsqueeze(2), image.new_zeros(b, 3, num_frames - 1, h, w)], dim=2)
    _check_video_size(vae, video)
    latent = _encode_normalised(vae, video)
    s, t = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
    mask = i2v_first_frame_mask(b, num_frames, h // s, w // s, t).to(latent.device)
    return torch.cat([mask, latent], dim=1)
