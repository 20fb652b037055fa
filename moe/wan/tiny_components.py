"""Tiny stand-ins for the Wan2.2 components, for CPU tests and the embedded demo.

Built from the preset's constructor kwargs (no hub access) and keeping the real interfaces: the
VAE's 4x8x8 compression (with a content-preserving encoder and calibrated latent statistics, see
`build_tiny_vae`), UMT5's architecture at a small width, and an in-memory WordLevel tokenizer that
appends `</s>` like the UMT5 one. `save_components` writes them in the published diffusers
layout, so they load through the same code as real components (`moe.wan.component_loaders`).
"""

from __future__ import annotations

from collections.abc import Callable
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

from moe.atomic import atomic_dir
from moe.errors import MoeError
from moe.wan.component_loaders import umt5_config
from moe.wan.presets import WanPreset

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


def tiny_vae_kwargs(preset: WanPreset) -> dict:
    """`AutoencoderKLWan` kwargs of a tiny preset: the Wan2.1 layout (temporal downsampling in
    the last two stages, so 4x8x8 compression) at a small width. `build_tiny_vae` calibrates
    latents_mean/std for its content-preserving encoder."""
    cfg = preset.vae
    return dict(
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_res_blocks=cfg.num_res_blocks,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        scale_factor_temporal=cfg.temporal_compression,
        scale_factor_spatial=cfg.spatial_compression,
    )


def build_tiny_vae(preset: WanPreset, seed: int = 0, calibration: torch.Tensor | None = None) -> AutoencoderKLWan:
    """A tiny Wan VAE for `preset`, identical for identical seeds (and calibration videos).

    A randomly initialised encoder barely lets picture content through (normalised latents vary
    by ~0.05 whatever the frame shows), so nothing downstream could learn what instruments look
    like. The encoder is therefore set to a content-preserving map (`_content_preserving_encoder`)
    and latents_mean/std are calibrated on `calibration` (videos [N, 3, F, H, W] in [-1, 1] of the
    domain the stand-in serves; default: smooth random colour fields) so that its normalised
    latents are zero-mean with unit variance, as the published statistics make them for the
    real VAE. The decoder stays random.
    """
    _require_tiny(preset, "Wan VAE")
    vae = _seeded(seed, lambda: AutoencoderKLWan(**tiny_vae_kwargs(preset))).eval()
    _content_preserving_encoder(vae, seed)
    _calibrate_latent_stats(vae, calibration if calibration is not None else _smooth_colour_videos(seed))
    return vae


@torch.no_grad()
def _content_preserving_encoder(vae: AutoencoderKLWan, seed: int) -> None:
    """Encoder = per-latent-cell average of 8 features of the frames (RGB, a constant, luminance
    gradients in x, y and t, a Laplacian), mixed into the z channels by a fixed random
    orthonormal map: residual and attention branches are zeroed (identity blocks), shortcuts are
    identities, spatial downsamplers average 2x2, temporal ones average frame pairs."""
    enc = vae.encoder
    for name, m in enc.named_modules():
        if name.endswith(("conv2", "attentions.0.proj")):
            m.weight.zero_()
            m.bias.zero_()
        elif name.endswith("conv_shortcut") and hasattr(m, "weight"):
            _identity_channels(m, lambda w, c: w[c, c].fill_(1.0))
        elif name.endswith("resample.1") and isinstance(m, torch.nn.Conv2d):  # 3x3 stride 2 after (0,1,0,1) pad
            _identity_channels(m, lambda w, c: w[c, c, 0:2, 0:2].fill_(0.25))
        elif name.endswith("time_conv"):  # (3,1,1) stride 2: average the two newest frames of each triple
            _identity_channels(m, lambda w, c: w[c, c, 1:3].fill_(0.5))
    w, b = enc.conv_in.weight, enc.conv_in.bias  # [base_dim >= 8, 3, 3, 3, 3] (out, in, t, h, w)
    w.zero_()
    b.zero_()
    luma = torch.full((3,), 1 / 3)
    for c in range(3):
        w[c, c, 2, 1, 1] = 1.0  # RGB
    b[3] = 3.0  # a constant, which keeps the encoder's RMS norm from amplifying dark frames
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
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", eos_id)]
    )
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


def build_tiny_text_encoder(
    preset: WanPreset, seed: int = 0
) -> tuple[UMT5EncoderModel, PreTrainedTokenizerFast]:
    """A randomly initialised tiny UMT5 encoder and the in-memory tokenizer for `preset`."""
    _require_tiny(preset, "UMT5-XXL text encoder")
    tokenizer = build_tiny_tokenizer(preset.text_encoder.max_length)
    if len(tokenizer) > preset.text_encoder.vocab_size:
        raise MoeError(
            f"tiny vocab has {len(tokenizer)} tokens but the preset's text encoder only "
            f"{preset.text_encoder.vocab_size}"
        )
    config = tiny_umt5_config(preset)
    model = _seeded(seed, lambda: UMT5EncoderModel(config))
    return model.eval(), tokenizer


def save_components(
    out_dir: str | Path, preset: WanPreset, seed: int = 0, calibration: torch.Tensor | None = None
) -> dict[str, Path]:
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
