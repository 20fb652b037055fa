"""Key layouts of the original Wan release's component files, and their diffusers/HF names.

`Wan2.1_VAE.pth` (the original `WanVAE` module names) <-> diffusers `AutoencoderKLWan`, and
`models_t5_umt5-xxl-enc-bf16.pth` (Wan's `T5Encoder`) <-> HF `UMT5EncoderModel`. diffusers'
own converter handles the VAE's forward direction; the inverse here writes test fixtures.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

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
