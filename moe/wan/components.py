"""The non-DiT components of a Wan2.2 model set: VAE, UMT5 text encoder and tokenizer.

Real components are read from LOCAL paths only (no hub access): a diffusers component folder
(`vae/`, `text_encoder/`, `tokenizer/`, or the model root holding them) or the original Wan
release files (`Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`). Tiny components for CPU tests
are built from the preset's constructor kwargs and keep the real interfaces (4x8x8 VAE
compression, UMT5 architecture, a tokenizer that appends `</s>` like the UMT5 one).

The encoding helpers mirror diffusers' Wan pipelines exactly (`_get_t5_prompt_embeds`,
`WanImageToVideoPipeline.prepare_latents`, the latents normalisation), so the conditioning we
train on is the conditioning diffusers produces at inference.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from diffusers.pipelines.wan.pipeline_wan import prompt_clean
from safetensors.torch import load_file
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from moe.atomic import atomic_dir
from moe.errors import MoeError, key_set_problems, list_names
from moe.wan.presets import WanPreset

__all__ = [
    "TINY_VOCAB",
    "tiny_vae_kwargs",
    "build_tiny_vae",
    "tiny_umt5_config",
    "build_tiny_tokenizer",
    "build_tiny_text_encoder",
    "save_components",
    "wan_vae_to_original_keys",
    "original_to_umt5_keys",
    "umt5_to_original_keys",
    "umt5_config_from_state_dict",
    "load_vae",
    "load_text_encoder",
    "load_tokenizer",
    "encode_prompts",
    "encode_video",
    "decode_latents",
    "i2v_first_frame_mask",
    "i2v_condition",
]

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


# ---------------------------------------------------------------------------------------------
# Tiny components
# ---------------------------------------------------------------------------------------------


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
    return _umt5_config(
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


# ---------------------------------------------------------------------------------------------
# Key conversion
# ---------------------------------------------------------------------------------------------

# diffusers resnet suffix -> original Wan `ResidualBlock` suffix (residual is a Sequential:
# 0 RMS_norm, 1 SiLU, 2 conv, 3 RMS_norm, 4 SiLU, 5 Dropout, 6 conv).
_VAE_RESNET_TO_ORIGINAL = {
    "norm1.gamma": "residual.0.gamma",
    "conv1.weight": "residual.2.weight",
    "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma",
    "conv2.weight": "residual.6.weight",
    "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight",
    "conv_shortcut.bias": "shortcut.bias",
}
_VAE_TOP_TO_ORIGINAL = {
    "quant_conv": "conv1",
    "post_quant_conv": "conv2",
    "encoder.conv_in": "encoder.conv1",
    "decoder.conv_in": "decoder.conv1",
    "encoder.norm_out": "encoder.head.0",
    "encoder.conv_out": "encoder.head.2",
    "decoder.norm_out": "decoder.head.0",
    "decoder.conv_out": "decoder.head.2",
}


def _resnet_suffix_to_original(suffix: str) -> str:
    return _VAE_RESNET_TO_ORIGINAL.get(suffix, suffix)


def _vae_key_to_original(key: str, num_res_blocks: int) -> str:
    """One diffusers Wan2.1 VAE key in the original layout (the inverse of diffusers'
    `convert_wan_vae_to_diffusers`)."""
    module, _, param = key.rpartition(".")
    if module in _VAE_TOP_TO_ORIGINAL:
        return f"{_VAE_TOP_TO_ORIGINAL[module]}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", key):
        return f"{m[1]}.middle.{2 * int(m[2])}.{_resnet_suffix_to_original(m[3])}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.middle.1.{m[2]}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key):
        return f"encoder.downsamples.{m[1]}.{_resnet_suffix_to_original(m[2])}"
    # The original decoder is one flat list: per stage, num_res_blocks + 1 residual blocks then
    # one upsampler (the last stage has none).
    stride = num_res_blocks + 2
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        index = int(m[1]) * stride + int(m[2])
        return f"decoder.upsamples.{index}.{_resnet_suffix_to_original(m[3])}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.upsamples.{int(m[1]) * stride + num_res_blocks + 1}.{m[2]}"
    return key


def wan_vae_to_original_keys(state_dict: Mapping[str, torch.Tensor], num_res_blocks: int = 2) -> dict:
    """A diffusers `AutoencoderKLWan` (Wan2.1 layout) state dict in the original Wan release's
    key layout (`Wan2.1_VAE.pth`). Used to write test fixtures and to export; note that
    diffusers' converter (the forward direction) only understands num_res_blocks == 2."""
    return {_vae_key_to_original(k, num_res_blocks): v for k, v in state_dict.items()}


# original Wan T5 block suffix -> HF UMT5 block suffix (Wan: wan/modules/t5.py `T5SelfAttention`)
_UMT5_BLOCK_KEYS = {
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm1.weight": "layer.0.layer_norm.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # gelu(gate(x)) * fc1(x)
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_UMT5_BLOCK_KEYS_INV = {v: k for k, v in _UMT5_BLOCK_KEYS.items()}


def original_to_umt5_keys(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The original Wan UMT5 encoder state dict (`models_t5_umt5-xxl-enc-bf16.pth`) with HF
    `UMT5EncoderModel` keys. Unknown keys are kept as they are so validation can report them."""
    out = {}
    for key, value in state_dict.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = value
            out["encoder.embed_tokens.weight"] = value
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = value
        elif (m := re.fullmatch(r"blocks\.(\d+)\.(.+)", key)) and m[2] in _UMT5_BLOCK_KEYS:
            out[f"encoder.block.{m[1]}.{_UMT5_BLOCK_KEYS[m[2]]}"] = value
        else:
            out[key] = value
    return out


def umt5_to_original_keys(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """The inverse of `original_to_umt5_keys` (the tied `encoder.embed_tokens.weight` is dropped,
    the original file stores the embedding once)."""
    out = {}
    for key, value in state_dict.items():
        if key == "shared.weight":
            out["token_embedding.weight"] = value
        elif key == "encoder.embed_tokens.weight":
            continue
        elif key == "encoder.final_layer_norm.weight":
            out["norm.weight"] = value
        elif (m := re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", key)) and m[2] in _UMT5_BLOCK_KEYS_INV:
            out[f"blocks.{m[1]}.{_UMT5_BLOCK_KEYS_INV[m[2]]}"] = value
        else:
            out[key] = value
    return out


def _umt5_config(**sizes) -> UMT5Config:
    """UMT5-XXL's architecture choices (gated GELU-tanh FFN, per-layer relative position bias,
    eps 1e-6, pad 0 / eos 1) with the given sizes."""
    return UMT5Config(
        **sizes,
        feed_forward_proj="gated-gelu",
        relative_attention_max_distance=128,
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
        is_encoder_decoder=False,
        use_cache=False,
    )


def umt5_config_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> UMT5Config:
    """Infer the encoder sizes from an HF-keyed UMT5 state dict's shapes (UMT5-XXL gives
    d_model 4096, d_ff 10240, 64 heads of 64, 24 layers, vocab 256384, 32 buckets)."""
    needed = [
        "shared.weight",
        "encoder.block.0.layer.0.SelfAttention.q.weight",
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
    ]
    missing = [k for k in needed if k not in state_dict]
    if missing:
        raise MoeError(f"not a UMT5 encoder state dict: missing {', '.join(missing)}")
    vocab_size, d_model = state_dict["shared.weight"].shape
    buckets, heads = state_dict[needed[2]].shape
    inner = state_dict[needed[1]].shape[0]
    layers = 1 + max(int(m[1]) for k in state_dict if (m := re.match(r"encoder\.block\.(\d+)\.", k)))
    return _umt5_config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=state_dict[needed[3]].shape[0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


# ---------------------------------------------------------------------------------------------
# Loading from local paths
# ---------------------------------------------------------------------------------------------


def _component_dir(path: Path, subfolder: str, marker: str) -> Path | None:
    """`path` itself if it is the component folder, `path/subfolder` if `path` is a model root,
    else None."""
    for candidate in (path, path / subfolder):
        if (candidate / marker).is_file():
            return candidate
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MoeError(f"cannot read {path}: {e}") from None


def _read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a single `.pth`/`.pt`/`.ckpt` (loaded with weights_only=True, never
    unpickling code) or `.safetensors` file."""
    try:
        if path.suffix == ".safetensors":
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise MoeError(f"cannot read {path} as a checkpoint file: {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MoeError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return sd


def _validate_state_dict(
    expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], path: Path, what: str
) -> None:
    """Raise a MoeError listing missing / unexpected / mis-shaped keys, instead of letting
    `load_state_dict` fail (or, on meta tensors, fail much later)."""
    problems = key_set_problems({k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in got.items()})
    if problems:
        raise MoeError(f"{path} is not a matching {what} checkpoint; " + "; ".join(problems))


def _materialise(
    build: Callable[[], torch.nn.Module], state_dict: dict, path: Path, what: str, dtype: torch.dtype
):
    """Build the model on the meta device (no memory, no random init: UMT5-XXL alone is 23 GB
    in fp32), validate the state dict against it, then adopt the checkpoint's tensors cast to
    `dtype` (casting tensors, not the model, keeps one copy and avoids diffusers' `.to()`
    warning)."""
    with torch.device("meta"):
        model = build()
    _validate_state_dict(model.state_dict(), state_dict, path, what)
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(cast, strict=True, assign=True)
    return model.eval()


def _vae_state_dict_to_diffusers(sd: dict, path: Path) -> dict:
    """Accept diffusers keys as they are; convert original Wan2.1 VAE keys with diffusers' own
    converter."""
    if "encoder.conv_in.weight" in sd:
        return sd
    if "encoder.conv1.weight" in sd:
        return convert_wan_vae_to_diffusers(sd)
    raise MoeError(
        f"{path} is not a Wan VAE checkpoint: expected original Wan2.1 VAE keys "
        f"(encoder.conv1.weight, decoder.upsamples.N...) or diffusers keys (encoder.conv_in.weight); "
        f"found e.g. {list_names(sorted(sd), 5)}"
    )


def load_vae(
    path: str | Path, dtype: torch.dtype = torch.float32, config: Mapping | None = None
) -> AutoencoderKLWan:
    """Load a Wan VAE from a diffusers `vae/` folder (or the model root holding it) or from a
    single original file such as `Wan2.1_VAE.pth`.

    A single file is built with `config` (AutoencoderKLWan kwargs; default: the real Wan2.1 VAE
    config) and must match it key for key. diffusers' converter assumes the released layout
    (num_res_blocks 2); the Wan2.2 z48 VAE file is not supported here, use its diffusers folder.
    """
    path = Path(path)
    if path.is_dir():
        folder = _component_dir(path, "vae", "config.json")
        if folder is None:
            raise MoeError(
                f"{path} is neither a diffusers vae/ folder (with config.json) nor a model folder holding one"
            )
        class_name = _read_json(folder / "config.json").get("_class_name")
        if class_name != "AutoencoderKLWan":
            raise MoeError(f"{folder} holds a {class_name} config, expected AutoencoderKLWan (a Wan vae/ folder)")
        try:
            vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise MoeError(f"cannot load the Wan VAE from {folder}: {e}") from None
        return vae.eval()
    if not path.is_file():
        raise MoeError(f"VAE path {path} does not exist; expected a diffusers vae/ folder or Wan2.1_VAE.pth")
    kwargs = dict(config or {})
    raw = _read_state_dict_file(path)
    if "encoder.conv1.weight" in raw and kwargs.get("num_res_blocks", 2) != 2:
        raise MoeError(
            f"{path}: diffusers' Wan VAE converter only handles num_res_blocks=2 (the released "
            f"layout), not {kwargs['num_res_blocks']}; save such a VAE as a diffusers vae/ folder"
        )
    state_dict = _vae_state_dict_to_diffusers(raw, path)
    return _materialise(lambda: AutoencoderKLWan(**kwargs), state_dict, path, "Wan VAE", dtype)


def load_text_encoder(path: str | Path, dtype: torch.dtype = torch.float32) -> UMT5EncoderModel:
    """Load the UMT5 encoder from a diffusers `text_encoder/` folder (or the model root holding
    it) or from a single file: the original `models_t5_umt5-xxl-enc-bf16.pth` (Wan keys,
    converted here) or an HF-keyed `.safetensors`/`.pth`. A single file's sizes are read from its
    shapes, so UMT5-XXL and tiny test encoders load the same way."""
    path = Path(path)
    if path.is_dir():
        folder = _component_dir(path, "text_encoder", "config.json")
        if folder is None:
            raise MoeError(
                f"{path} is neither a diffusers text_encoder/ folder (with config.json) nor a model folder holding one"
            )
        model_type = _read_json(folder / "config.json").get("model_type")
        if model_type != "umt5":
            raise MoeError(f"{folder} holds a {model_type!r} model, expected a UMT5 encoder (model_type 'umt5')")
        try:
            model = UMT5EncoderModel.from_pretrained(folder, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise MoeError(f"cannot load the UMT5 text encoder from {folder}: {e}") from None
        return model.eval()
    if not path.is_file():
        raise MoeError(
            f"text encoder path {path} does not exist; expected a diffusers text_encoder/ folder "
            f"or models_t5_umt5-xxl-enc-bf16.pth"
        )
    state_dict = _read_state_dict_file(path)
    if "token_embedding.weight" in state_dict:
        state_dict = original_to_umt5_keys(state_dict)
    if "shared.weight" in state_dict:  # HF files may store the tied embedding only once
        state_dict.setdefault("encoder.embed_tokens.weight", state_dict["shared.weight"])
    try:
        config = umt5_config_from_state_dict(state_dict)
    except MoeError as e:
        raise MoeError(f"{path}: {e}") from None
    model = _materialise(lambda: UMT5EncoderModel(config), state_dict, path, "UMT5 encoder", dtype)
    model.tie_weights()  # shared and encoder.embed_tokens hold one tensor: keep one copy
    return model


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer from a local diffusers `tokenizer/` folder (or the model root holding
    it); never touches the hub."""
    path = Path(path)
    folder = None
    if path.is_dir():
        folder = next(
            (
                f
                for marker in ("tokenizer_config.json", "tokenizer.json", "spiece.model")
                if (f := _component_dir(path, "tokenizer", marker)) is not None
            ),
            None,
        )
    if folder is None:
        raise MoeError(
            f"{path} is not a tokenizer folder: expected a diffusers tokenizer/ folder with "
            f"tokenizer.json / tokenizer_config.json / spiece.model (or a model folder holding one)"
        )
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MoeError(f"cannot load the tokenizer from {folder}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Encoding helpers (mirroring diffusers' Wan pipelines)
# ---------------------------------------------------------------------------------------------


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
        raise MoeError(
            f"video must be uint8 [F, H, W, 3] or float [B, 3, F, H, W] in [-1, 1], got "
            f"{frames.dtype} {tuple(frames.shape)}"
        )
    return frames


def _check_video_size(vae: AutoencoderKLWan, x: torch.Tensor) -> None:
    t, s = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    f, h, w = x.shape[2:]
    if (f - 1) % t or h % s or w % s:
        raise MoeError(
            f"video of {f} frames at {h}x{w} does not fit the VAE: frames must be {t}k+1 and "
            f"height/width multiples of {s}"
        )


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
        raise MoeError(
            f"image must be uint8 [H, W, 3] or float [B, 3, H, W] in [-1, 1], got {image.dtype} {tuple(image.shape)}"
        )
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
