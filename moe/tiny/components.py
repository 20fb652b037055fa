"""Tiny stand-ins for the Wan2.2 components, for CPU tests and the embedded demo.

Built from the preset's constructor kwargs (no hub access) and keeping the real interfaces: the
VAE's 4x8x8 compression (with a content-preserving encoder, calibrated latent statistics and a
decoder that inverts the encoder, see `build_tiny_vae`), UMT5's architecture at a small width,
and an in-memory WordLevel tokenizer that appends `</s>` like the UMT5 one. `save_components`
writes them in the published diffusers layout, so they load through the same code as real
components (`moe.wan.component_loaders`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from moe.config.presets import WanPreset
from moe.errors import MoeError
from moe.files.atomic import atomic_dir
from moe.wan.component_loaders import tiny_vae_kwargs, umt5_config

# Special tokens in UMT5's order: pad 0, eos 1, unk 2 (UMT5Config's pad/eos ids match).
SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")

# The tiny tokenizer's vocabulary: the words of our surgical captions (the synthetic data set's
# and Cholec80's tool names), common English glue words, the words of the usual Wan negative
# prompt, and punctuation. Anything else maps to <unk>, which is harmless for tiny models.
_WORDS = """
a an the of with and or in on at to into onto from by for near while over under across toward
away through between is are be being it its this that there no not one two three four
laparoscopic laparoscopy endoscopic surgical surgery operation procedure cholecystectomy view
scene video clip frame image camera close up wide shot left right upper lower center middle top
bottom side foreground background visible moving moves slowly quickly steady still
instrument instruments tool tools tip tips shaft jaw jaws metal metallic
scissors hook suction cannula irrigator irrigation grasper graspers bipolar clipper clip clips
specimen bag forceps trocar
tissue tissues fat fatty liver gallbladder duct artery vessel vessels organ organs membrane
abdominal abdomen cavity wall peritoneum blood bleeding smoke fluid
cutting cut cuts cauterizing cauterize cauterizes cautery coagulating burning dissecting
dissection irrigating irrigates rinsing aspirating suctioning grasping grasps holding holds
retracting retracts pulling pushing clipping lifting
red pink dark bright white yellow glistening wet shiny
high low quality best worst bad blurry blurred static still overexposed underexposed
distorted deformed jpeg artifacts noise noisy subtitles watermark text
""".split()
_PUNCTUATION = list(".,;:!?-'\"()/")
TINY_VOCAB: tuple[str, ...] = tuple(dict.fromkeys([*SPECIAL_TOKENS, *_WORDS, *_PUNCTUATION]))


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Run `build` under a private RNG state so the result depends only on `seed` and the
    caller's global RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _require_tiny(preset: WanPreset, what: str) -> None:
    if not preset.tiny:
        raise MoeError(
            f"preset {preset.task!r} uses the published {what}; load it from a local path "
            f"(load_vae / load_text_encoder / load_tokenizer) instead of building a random one"
        )


def build_tiny_vae(preset: WanPreset, seed: int = 0, calibration: torch.Tensor | None = None) -> AutoencoderKLWan:
    """A tiny Wan VAE for `preset`, identical for identical seeds (and calibration videos).

    A randomly initialised encoder barely lets picture content through (normalised latents vary
    by ~0.05 whatever the frame shows), so nothing downstream could learn what instruments look
    like. The encoder is therefore set to a content-preserving map (`_content_preserving_encoder`)
    and latents_mean/std are calibrated on `calibration` (videos [N, 3, F, H, W] in [-1, 1] of the
    domain the stand-in serves; default: smooth random colour fields) so that its normalised
    latents are zero-mean with unit variance, as the published statistics make them for the
    real VAE. The decoder is set to invert the encoder (`_inverting_decoder`), so decoded
    latents (sample videos, reconstructions) show the picture, not coloured noise.
    """
    _require_tiny(preset, "Wan VAE")
    vae = _seeded(seed, lambda: AutoencoderKLWan(**tiny_vae_kwargs(preset))).eval()
    _content_preserving_encoder(vae, seed)
    _calibrate_latent_stats(vae, calibration if calibration is not None else _smooth_colour_videos(seed))
    _inverting_decoder(vae)
    return vae


def _main_path_only(name: str, m: torch.nn.Module) -> bool:
    """Leave a Wan VAE block only its main path: residual and attention branches zeroed
    (identity blocks), channel-changing shortcuts identities. True when `m` was one of them."""
    if name.endswith(("conv2", "attentions.0.proj")):
        m.weight.zero_()
        m.bias.zero_()
        return True
    if name.endswith("conv_shortcut") and hasattr(m, "weight"):
        _identity_channels(m, lambda w, c: w[c, c].fill_(1.0))
        return True
    return False


@torch.no_grad()
def _content_preserving_encoder(vae: AutoencoderKLWan, seed: int) -> None:
    """Encoder = per-latent-cell average of 8 features of the frames (RGB + `_RGB_OFFSET`, the
    constant `_CONST`, luminance gradients in x, y and t, a Laplacian), mixed into the z channels
    by a fixed random orthonormal map: residual and attention branches are zeroed (identity
    blocks), shortcuts are identities, spatial downsamplers average 2x2, temporal ones average
    frame pairs.

    The offset and the constant keep every colour where the output SiLU is nearly linear (its
    input u in [0.6, 2.7], slope 0.8-1.1): without them dark colours sat at SiLU's minimum
    (slope 0 at u = -1.28), where the decoder must amplify a latent error up to 14 times, and
    generated latents, never exact, decoded to a grid of saturated dots."""
    enc = vae.encoder
    for name, m in enc.named_modules():
        if _main_path_only(name, m):
            continue
        if name.endswith("resample.1") and isinstance(m, torch.nn.Conv2d):  # 3x3 stride 2 after (0,1,0,1) pad
            _identity_channels(m, lambda w, c: w[c, c, 0:2, 0:2].fill_(0.25))
        elif name.endswith("time_conv"):  # (3,1,1) stride 2: average the two newest frames of each triple
            _identity_channels(m, lambda w, c: w[c, c, 1:3].fill_(0.5))
    w, b = enc.conv_in.weight, enc.conv_in.bias  # [base_dim >= 8, 3, 3, 3, 3] (out, in, t, h, w)
    w.zero_()
    b.zero_()
    luma = torch.full((3,), 1 / 3)
    for c in range(3):
        w[c, c, 2, 1, 1] = 1.0  # RGB + offset
        b[c] = _RGB_OFFSET
    b[3] = _CONST  # the decoder divides by it; it also keeps the RMS norm from amplifying dark frames
    w[4, :, 2, 1, 2], w[4, :, 2, 1, 0] = luma / 2, -luma / 2  # d/dx
    w[5, :, 2, 2, 1], w[5, :, 2, 0, 1] = luma / 2, -luma / 2  # d/dy
    w[6, :, 2, 1, 1], w[6, :, 1, 1, 1] = luma, -luma  # d/dt
    w[7, :, 2, 1, 1] = luma  # Laplacian
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        w[7, :, 2, dy, dx] = -luma / 4
    z = vae.config.z_dim
    mix = torch.linalg.qr(torch.randn(z, z, generator=torch.Generator().manual_seed(seed)))[0][:, :8]
    enc.conv_out.weight.zero_()
    enc.conv_out.bias.zero_()
    enc.conv_out.weight[:z, :8, 2, 1, 1] = 2.0 * mix
    _identity_channels(vae.quant_conv, lambda w, c: w[c, c].fill_(1.0))


# --- the decoder: the encoder's inverse, up to what the encoder keeps -------------------------
#
# Per latent cell the encoder keeps f = the means of (R + o, G + o, B + o, C, d/dx, d/dy, d/dt,
# Laplacian), as s = silu(u) with u = sqrt(32) f / |f| (its RMS norm and SiLU), mixed into z by
# the orthonormal `mix`. The decoder unmixes s, inverts the SiLU per channel, gets
# RGB = C u_rgb / u_3 - o (f_3 = C is known) and upsamples each cell's colour smoothly; the
# 8x8x4 detail inside a cell is not in the latent and cannot come back (see
# `moe.wan.reconstruction`).
_RGB_OFFSET = 2.0  # o: colours in [-1, 1] become features in [1, 3]
_CONST = 6.0  # C: with o, |f| stays in [6.2, 8.3], so u_rgb in [0.6, 2.7] and u_3 in [4.0, 5.5]
_GAIN = 1000.0  # the cell constant's gain before the output norm: the norm then divides by it alone
_ANCHOR = 1.0e4  # a constant channel that dominates the latent-resolution norms, making them fixed scales
_SHARPNESS = 200.0  # SiLU(b x) / b is ReLU(x) to within 0.28 / b: the hinges of the SiLU inverse
_KNOTS = (0.3, 0.45, 0.6, 0.8, 1.0, 1.3, 1.7, 2.2)  # hinge points in s, denser where SiLU bends more
# a of the separable [a, 1 - 2a, a] kernels after each 2x nearest upsampling (a = 0.25 would be
# bilinear): chosen for the best reconstruction of synthetic surgical clips (seed 4242, the first, smaller instruments) from
# exact cell means, 21.7 dB against 21.2 dB for three bilinear steps; the sharpening first step
# acts like a bicubic's negative lobes.
_UPSAMPLE_TAPS = (-0.3, 0.5, 0.4)
_U_RGB = (0.5, 3.0)  # the fits' ranges of u, with a margin over what the encoder produces
_U_CONST = (3.9, 5.6)


@lru_cache(maxsize=1)
def _silu_inverse_fit() -> tuple[tuple[float, ...], tuple[float, float]]:
    """Least-squares fits, on dense grids of u, of u from s = silu(u): (coefficients of
    [s, 1, silu(b (s - t_j)) / b for the knots t_j] on u in `_U_RGB`, the colours' range;
    (slope, intercept) of u_3 on u_3 in `_U_CONST`, where the constant feature lives)."""
    u = torch.linspace(*_U_RGB, 4001, dtype=torch.float64)
    s = F.silu(u)
    basis = torch.stack([s, torch.ones_like(s)] + [F.silu(_SHARPNESS * (s - t)) / _SHARPNESS for t in _KNOTS], 1)
    rgb = torch.linalg.solve(basis.T @ basis + 1e-6 * torch.eye(basis.shape[1], dtype=torch.float64), basis.T @ u)
    u3 = torch.linspace(*_U_CONST, 1001, dtype=torch.float64)
    s3 = F.silu(u3)
    slope, intercept = torch.linalg.lstsq(torch.stack([s3, torch.ones_like(s3)], 1), u3[:, None]).solution[:, 0]
    return tuple(rgb.tolist()), (float(slope), float(intercept))


@torch.no_grad()
def _inverting_decoder(vae: AutoencoderKLWan) -> None:
    """Decoder = the inverse of `_content_preserving_encoder`, read off its weights (so it is
    seeded by the same mix and needs no data): per latent cell, RGB = C u_rgb / u_3 - o with
    u = silu^-1(s), upsampled by three (nearest 2x + 3x3) steps, each latent frame held for its
    four frames (the encoder averaged them).

    Only the main path is used, where the Wan decoder is linear (residual and attention
    branches zeroed, as in the encoder), except for three nonlinear spots:
    - silu^-1 (a least-squares fit in SiLU hinges, within 0.03 in RGB) runs in the first
      residual branch at latent resolution, whose RMS norms a huge constant channel turns into
      fixed scales;
    - the division by u_3 is done by the output RMS norm: channel 0 carries u_3 times a large
      gain, so |h| is that channel; the same zero-padded upsampling of numerator and
      denominator also makes the border a normalised convolution (no dark frame edges);
    - the output SiLU is bypassed with silu(x) - silu(-x) = x (each colour also carried negated).
    """
    dec = vae.decoder
    z = vae.config.z_dim
    widths = (dec.conv_in.out_channels, dec.conv_out.in_channels)
    hinges = 3 * len(_KNOTS)
    if widths[0] < 4 + hinges + 1 or widths[1] < 7 or vae.encoder.conv_out.in_channels < 8:
        raise MoeError(
            f"the tiny VAE decoder needs >= {4 + hinges + 1} channels at latent resolution and >= 7 at "
            f"full resolution, got {widths}; use base_dim >= 8 with dim_mult (1, 2, 4, 4)"
        )
    mix = vae.encoder.conv_out.weight[:z, :8, 2, 1, 1].double() / 2.0  # z = 2 mix s
    unmix = mix.T / 2.0  # s = unmix z
    coef, (slope3, intercept3) = _silu_inverse_fit()
    lin, const, hinge_coef = coef[0], coef[1], coef[2:]

    for name, m in dec.named_modules():
        _main_path_only(name, m)
    _identity_channels(vae.post_quant_conv, lambda w, c: w[c, c].fill_(1.0))

    # conv_in (centre tap, current frame): 0 = u_3, 1-3 = the linear part of C u_rgb,
    # 4.. = hinge inputs s_c - t_j, last = the anchor constant.
    w, b = dec.conv_in.weight, dec.conv_in.bias
    w.zero_()
    b.zero_()
    rows = torch.zeros(widths[0], z, dtype=torch.float64)
    bias = torch.zeros(widths[0], dtype=torch.float64)
    rows[0], bias[0] = slope3 * unmix[3], intercept3
    for c in range(3):
        rows[1 + c], bias[1 + c] = _CONST * lin * unmix[c], _CONST * const
        for j, t in enumerate(_KNOTS):
            rows[4 + 3 * j + c], bias[4 + 3 * j + c] = unmix[c], -t
    bias[-1] = _ANCHOR
    w[:, :, 2, 1, 1] = rows.float()
    b.copy_(bias.float())

    # The first residual block adds C sum_j a_j silu(b (s_c - t_j)) / b to channel 1 + c.
    block = dec.mid_block.resnets[0]
    scale = widths[0] ** 0.5
    block.norm1.gamma.zero_()
    block.norm1.gamma[4 : 4 + hinges] = _SHARPNESS * _ANCHOR / scale  # norm1 -> b (s_c - t_j)
    block.conv1.weight.zero_()
    block.conv1.bias.zero_()
    block.conv1.bias[0] = _ANCHOR
    for c in range(3):
        for j, a in enumerate(hinge_coef):
            block.conv1.weight[1 + c, 4 + 3 * j + c, 2, 1, 1] = a / _SHARPNESS
            block.conv1.weight[4 + c, 4 + 3 * j + c, 2, 1, 1] = -a / _SHARPNESS
    block.norm2.gamma.zero_()
    block.norm2.gamma[1:7] = _ANCHOR / scale  # norm2 -> (delta, -delta)
    for c in range(3):
        block.conv2.weight[1 + c, 1 + c, 2, 1, 1] = _CONST
        block.conv2.weight[1 + c, 4 + c, 2, 1, 1] = -_CONST

    # Upsamplers carry channels 0-3: time convs repeat the frame, 2x steps smooth with the taps;
    # the last one scales u_3 by the gain and adds the negated colours.
    upsamplers = [blk.upsamplers[0] for blk in dec.up_blocks if blk.upsamplers is not None]
    if len(upsamplers) != len(_UPSAMPLE_TAPS):
        raise MoeError(f"the tiny VAE decoder expects {len(_UPSAMPLE_TAPS)} 2x upsamplers (8x), got {len(upsamplers)}")
    for k, (up, a) in enumerate(zip(upsamplers, _UPSAMPLE_TAPS)):
        if hasattr(up, "time_conv"):
            tw = up.time_conv.weight  # [2 dim, dim, 3, 1, 1]: two output frames per input frame
            tw.zero_()
            up.time_conv.bias.zero_()
            for c in range(4):
                tw[c, c, 2] = tw[tw.shape[1] + c, c, 2] = 1.0
        conv = up.resample[1]
        conv.weight.zero_()
        conv.bias.zero_()
        taps = torch.tensor([a, 1 - 2 * a, a])
        kernel = torch.outer(taps, taps)
        for c in range(4):
            conv.weight[c, c] = kernel
        if k == len(upsamplers) - 1:
            conv.weight[0, 0] *= _GAIN
            for c in range(3):
                conv.weight[4 + c, 1 + c] = -kernel

    # Output: norm divides by |h| = gain * u_3, gamma restores the scale, SiLU pairs cancel,
    # the bias takes the offset off.
    g = dec.norm_out.gamma
    g.zero_()
    g[1:7] = _GAIN / widths[1] ** 0.5
    dec.conv_out.weight.zero_()
    dec.conv_out.bias.zero_()
    for c in range(3):
        dec.conv_out.weight[c, 1 + c, 2, 1, 1] = 1.0
        dec.conv_out.weight[c, 4 + c, 2, 1, 1] = -1.0
        dec.conv_out.bias[c] = -_RGB_OFFSET


def _identity_channels(conv, set_diagonal) -> None:
    """Zero a conv, then let `set_diagonal(weight, c)` connect channel c to itself."""
    conv.weight.zero_()
    conv.bias.zero_()
    for c in range(min(conv.weight.shape[0], conv.weight.shape[1])):
        set_diagonal(conv.weight, c)


def _smooth_colour_videos(seed: int) -> torch.Tensor:
    """Smooth random colour fields drifting over 9 frames, [8, 3, 9, 64, 64] in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(8, 3, 3, 5, 5, generator=g) * 2 - 1  # [clips, rgb, t, y, x] control points
    video = F.interpolate(coarse, size=(9, 64, 64), mode="trilinear", align_corners=True)
    return (video + 0.1 * torch.randn(video.shape, generator=g)).clamp(-1, 1)


@torch.no_grad()
def _calibrate_latent_stats(vae: AutoencoderKLWan, video: torch.Tensor) -> None:
    """latents_mean/std := the per-channel statistics of the encoder's output on `video`."""
    raw = vae.encode(video).latent_dist.mode()
    vae.register_to_config(
        latents_mean=[round(float(v), 5) for v in raw.mean((0, 2, 3, 4))],
        latents_std=[round(float(v), 5) for v in raw.std((0, 2, 3, 4)).clamp_min(1e-4)],
    )


def build_tiny_tokenizer(max_length: int = 512) -> PreTrainedTokenizerFast:
    """A WordLevel tokenizer over `TINY_VOCAB` that behaves like the UMT5 tokenizer for our
    use: lowercases, splits words and punctuation, appends `</s>`, pads with `<pad>` (id 0)."""
    vocab = {tok: i for i, tok in enumerate(TINY_VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    eos_id = vocab["</s>"]
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces on decode
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )


def tiny_umt5_config(preset: WanPreset, vocab_size: int | None = None) -> UMT5Config:
    """The UMT5 encoder config of a tiny preset (UMT5-XXL's structure at a small width)."""
    te = preset.text_encoder
    if te.d_model % te.num_heads:
        raise MoeError(f"text encoder d_model {te.d_model} is not divisible by num_heads {te.num_heads}")
    return umt5_config(
        vocab_size=vocab_size or te.vocab_size,
        d_model=te.d_model,
        d_kv=te.d_model // te.num_heads,
        d_ff=te.d_ff,
        num_layers=te.num_layers,
        num_heads=te.num_heads,
        relative_attention_num_buckets=32,
    )


def build_tiny_text_encoder(preset: WanPreset, seed: int = 0) -> tuple[UMT5EncoderModel, PreTrainedTokenizerFast]:
    """A randomly initialised tiny UMT5 encoder and the in-memory tokenizer for `preset`."""
    _require_tiny(preset, "UMT5-XXL text encoder")
    tokenizer = build_tiny_tokenizer(preset.text_encoder.max_length)
    if len(tokenizer) > preset.text_encoder.vocab_size:
        raise MoeError(f"tiny vocab has {len(tokenizer)} tokens but the preset's text encoder only {preset.text_encoder.vocab_size}")
    config = tiny_umt5_config(preset)
    model = _seeded(seed, lambda: UMT5EncoderModel(config))
    return model.eval(), tokenizer


def save_components(out_dir: str | Path, preset: WanPreset, seed: int = 0, calibration: torch.Tensor | None = None) -> dict[str, Path]:
    """Write a tiny preset's VAE, text encoder and tokenizer in the published diffusers layout
    (`out_dir/vae`, `out_dir/text_encoder`, `out_dir/tokenizer`, safetensors weights);
    `calibration` videos set the VAE's latent statistics (see `build_tiny_vae`).

    Each subfolder is built under a temporary sibling name and renamed into place, so a crash
    never leaves a half-written component and other subfolders of `out_dir` (the DiTs, written
    by someone else) are untouched.
    """
    out_dir = Path(out_dir)
    vae = build_tiny_vae(preset, seed, calibration)
    text_encoder, tokenizer = build_tiny_text_encoder(preset, seed)
    writers = {
        "vae": lambda d: vae.save_pretrained(d, safe_serialization=True),
        "text_encoder": lambda d: text_encoder.save_pretrained(d, safe_serialization=True),
        "tokenizer": lambda d: tokenizer.save_pretrained(d),
    }
    paths = {}
    for name, write in writers.items():
        with atomic_dir(out_dir / name) as tmp:
            write(tmp)
        paths[name] = out_dir / name
    return paths
