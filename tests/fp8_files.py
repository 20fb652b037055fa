"""Test fixtures: Wan DiT checkpoints stored in fp8, the way the public fp8 releases look.

- `plain`: the block Linear weights (`blocks.N.{self_attn,cross_attn}.{q,k,v,o}.weight`,
  `blocks.N.ffn.{0,2}.weight`) cast to float8_e4m3fn (clamped to +-448); everything else
  (biases, norms, modulation, embeddings, head) unchanged.
- `comfy_scaled`: ComfyUI's scaled fp8. Each of those weights is stored as
  `W8 = clamp(W / scale, +-448)` in float8_e4m3fn with a float32 `X.scale_weight` beside it
  (`scale="tensor"`: a 0-d scalar `max|W| / 448`, as ComfyUI's releases; `scale="row"`: an
  [out, 1] column, one scale per output row), plus the marker tensor `{prefix}scaled_fp8`:
  an empty float8_e4m3fn tensor (shape [0]), as ComfyUI's `BaseModel.state_dict_for_saving`
  writes it (`torch.tensor([], dtype=scaled_fp8)`; `comfy/model_detection.py` reads the fp8
  dtype from its dtype, and a 2-element marker would mean "full-precision matmul").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch

from moe.wan.checkpoint import write_checkpoint
from moe.wan.fp8 import FP8_DTYPE, FP8_MAX, SCALED_FP8_MARKER, quantize_weight, scale_key_for
from moe.wan.keys import KeyFormat

BLOCK_LINEAR_WEIGHT = re.compile(r"blocks\.\d+\.(?:(?:self_attn|cross_attn)\.(?:q|k|v|o|k_img|v_img)|ffn\.[02])\.weight")


def is_block_linear_weight(key: str) -> bool:
    """Whether a canonical key is one of the weights fp8 releases store as float8_e4m3fn."""
    return BLOCK_LINEAR_WEIGHT.fullmatch(key) is not None


def fp8_state(
    state: dict[str, torch.Tensor],
    form: Literal["plain", "comfy_scaled"],
    scale: Literal["tensor", "row"] = "tensor",
    *,
    scale_input: bool = False,
) -> dict[str, torch.Tensor]:
    """The canonical-key state dict of the fp8 checkpoint (unprefixed keys, marker included)."""
    if form not in ("plain", "comfy_scaled") or scale not in ("tensor", "row"):
        raise ValueError(f"unknown fp8 form {form!r} / scale {scale!r}")
    out: dict[str, torch.Tensor] = {}
    if form == "comfy_scaled":
        out[SCALED_FP8_MARKER] = torch.tensor([], dtype=FP8_DTYPE)
    for key, w in state.items():
        if not is_block_linear_weight(key):
            out[key] = w
        elif form == "plain":
            out[key] = quantize_weight(w, scaled=False)[0]
        else:
            if scale == "row":
                w8, s = quantize_weight(w, scaled=True)
            else:
                amax = w.detach().float().abs().max()
                s = amax / FP8_MAX if amax > 0 else torch.ones(())
                w8 = (w.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            out[scale_key_for(key)] = s.to(torch.float32).contiguous()
            out[key] = w8
            if scale_input:
                out[key[: -len(".weight")] + ".scale_input"] = torch.ones((), dtype=torch.float32)
    return out


def write_fp8_checkpoint(
    state: dict[str, torch.Tensor],
    path: str | Path,
    form: Literal["plain", "comfy_scaled"],
    prefix: str = "model.diffusion_model.",
    scale: Literal["tensor", "row"] = "tensor",
    *,
    max_shard_bytes: int | None = None,
    scale_input: bool = False,
) -> Path:
    """Write a canonical-key fp32/bf16 state dict as an fp8 checkpoint (original-style keys under
    `prefix`); `max_shard_bytes` writes a sharded folder, `scale_input` adds a float32
    `X.scale_input` per scaled Linear as some releases carry. Returns the path."""
    return write_checkpoint(
        fp8_state(state, form, scale, scale_input=scale_input),
        path,
        KeyFormat(style="original", prefix=prefix),
        max_shard_bytes=max_shard_bytes,
    )
