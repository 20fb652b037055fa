"""Loading the real Wan2.2 components (VAE, UMT5 text encoder, tokenizer) from LOCAL paths.

Accepted: a diffusers component folder (`vae/`, `text_encoder/`, `tokenizer/`, or the model root
holding them) or the original Wan release files (`Wan2.1_VAE.pth`,
`models_t5_umt5-xxl-enc-bf16.pth`, converted with `moe.wan.component_keys`). Nothing touches the
hub. Single files are validated key for key against a meta-device model before any tensor is
adopted, so a wrong file is a clear error, never a crash deep inside `load_state_dict`.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    UMT5Config,
    UMT5EncoderModel,
)

from moe.config.presets import WanPreset
from moe.errors import MoeError, key_set_problems, list_names
from moe.wan.component_keys import original_to_umt5_keys


def umt5_config(**sizes) -> UMT5Config:
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
    return umt5_config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=inner // heads,
        d_ff=state_dict[needed[3]].shape[0],
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
    )


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
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, SafetensorError) as e:
        raise MoeError(f"cannot read {path} as a checkpoint file: {e}") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise MoeError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return sd


def _validate_state_dict(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """Raise a MoeError listing missing / unexpected / mis-shaped keys, instead of letting
    `load_state_dict` fail (or, on meta tensors, fail much later)."""
    problems = key_set_problems({k: tuple(v.shape) for k, v in expected.items()}, {k: tuple(v.shape) for k, v in got.items()})
    if problems:
        raise MoeError(f"{path} is not a matching {what} checkpoint; " + "; ".join(problems))


def _load_component_folder(path: Path, subfolder: str, what: str, config_field: str, expected: str, expected_text: str, from_pretrained):
    """A diffusers component folder (`path` itself or `path/subfolder`), its config.json checked
    for the right kind before diffusers/transformers reads it; errors name the folder."""
    folder = _component_dir(path, subfolder, "config.json")
    if folder is None:
        raise MoeError(f"{path} is neither a diffusers {subfolder}/ folder (with config.json) nor a model folder holding one")
    found = _read_json(folder / "config.json").get(config_field)
    if found != expected:
        raise MoeError(f"{folder} holds a {found!r} config, expected {expected_text}")
    try:
        return from_pretrained(folder).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise MoeError(f"cannot load the {what} from {folder}: {e}") from None


def _materialise(build: Callable[[], torch.nn.Module], state_dict: dict, path: Path, what: str, dtype: torch.dtype):
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


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, config: Mapping | None = None) -> AutoencoderKLWan:
    """Load a Wan VAE from a diffusers `vae/` folder (or the model root holding it) or from a
    single original file such as `Wan2.1_VAE.pth`.

    A single file is built with `config` (AutoencoderKLWan kwargs; default: the real Wan2.1 VAE
    config) and must match it key for key. diffusers' converter assumes the released layout
    (num_res_blocks 2); the Wan2.2 z48 VAE file is not supported here, use its diffusers folder.
    """
    path = Path(path)
    if path.is_dir():
        return _load_component_folder(
            path,
            "vae",
            "Wan VAE",
            "_class_name",
            "AutoencoderKLWan",
            "AutoencoderKLWan (a Wan vae/ folder)",
            lambda folder: AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype, local_files_only=True),
        )
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
        return _load_component_folder(
            path,
            "text_encoder",
            "UMT5 text encoder",
            "model_type",
            "umt5",
            "a UMT5 encoder (model_type 'umt5')",
            lambda folder: UMT5EncoderModel.from_pretrained(folder, dtype=dtype, local_files_only=True),
        )
    if not path.is_file():
        raise MoeError(f"text encoder path {path} does not exist; expected a diffusers text_encoder/ folder or models_t5_umt5-xxl-enc-bf16.pth")
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


def tiny_vae_kwargs(preset: WanPreset) -> dict:
    """`AutoencoderKLWan` kwargs of a tiny preset: the Wan2.1 layout (temporal downsampling in
    the last two stages, so 4x8x8 compression) at a small width. `moe.tiny.components.build_tiny_vae` calibrates
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
