"""One Wan2.2 expert ready to run: loaded (fp8 as asked), its swapped blocks handed to a block
swap, everything else placed on the device. Training (`moe.dit.dual_dit`), evaluation and
generation load their DiTs through here, so `--fp8_base`, `--fp8_scaled`, `--blocks_to_swap`,
`--compile` and `--attention_backend` mean the same in every command."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from moe.config.presets import WanPreset
from moe.dit.block_swap import enable_block_swap
from moe.dit.compile import compile_blocks
from moe.errors import MoeError
from moe.wan.attention import check_attention_backend, prepare_attention_backend, set_attention_backend
from moe.wan.checkpoint import load_transformer
from moe.wan.fp8 import Fp8Mode


def check_blocks_to_swap(blocks_to_swap: int, num_layers: int) -> None:
    if not 0 <= blocks_to_swap <= num_layers:
        raise MoeError(f"--blocks_to_swap {blocks_to_swap}: the model has {num_layers} blocks; swap 0 to {num_layers}")


def resident_tensors(model: nn.Module) -> list[torch.Tensor]:
    """The model's frozen weights and buffers that live on the device: without the (shared,
    trainable) adapters injected into it, and without the blocks a block swap keeps in host
    memory (it moves those itself)."""
    swap = getattr(model, "block_swap", None)
    skip = {id(t) for t in swap.swapped_tensors()} if swap is not None else set()
    tensors = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    return [t for t in tensors if id(t) not in skip]


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the resident tensors held by this process (a sharded weight's local shard)."""
    return sum(local_shard(t).numel() * t.element_size() for t in resident_tensors(model))


def format_bytes(n: int) -> str:
    """`14.59 GB`, `0.35 GB`, `2.10 MB`: decimal units, MB below 0.1 GB (tiny models)."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def is_sharded(model: nn.Module) -> bool:
    return any(hasattr(t, "to_local") for t in resident_tensors(model))


def local_shard(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP (DTensor) shard


def swapped_bytes(model: nn.Module) -> int:
    swap = getattr(model, "block_swap", None)
    return swap.host_bytes() if swap is not None else 0


def place(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Move the resident tensors to `device` one at a time (not `model.to()`: swapped blocks
    stay in host memory; parameter objects are kept, so shared adapters see the move)."""
    for t in resident_tensors(model):
        t.data = t.data.to(device)
    return model


def load_expert(
    path: str | Path,
    preset: WanPreset,
    dtype: torch.dtype | None,
    device: torch.device | str,
    fp8: Fp8Mode = "none",
    blocks_to_swap: int = 0,
    on_device: bool = True,
    compile: bool = False,
    compile_mode: str = "default",
    attention_backend: str = "native",
) -> nn.Module:
    """One expert, read on the host (fp8 quantised while reading), its first `blocks_to_swap`
    blocks kept in (pinned, on a GPU) host memory by a block swap, the rest moved to `device`
    unless `on_device` is False (the caller places it later). Its attention layers run
    `attention_backend` (`moe.wan.attention`, checked before anything is read); with `compile`
    each block's forward is compiled (`moe.dit.compile`), lazily: the first call traces the
    block as it is then, with the adapters the caller injects after loading."""
    check_blocks_to_swap(blocks_to_swap, preset.dit.num_layers)
    # A GPU-only backend is refused on a machine without one (with --fsdp the experts are read
    # onto the host of a GPU machine and sharded onto the GPU later: `device` is "cpu" there).
    check_attention_backend(attention_backend, device=None if torch.cuda.is_available() else device)
    prepare_attention_backend(attention_backend)
    model = load_transformer(path, preset, dtype=dtype, device="cpu", fp8=fp8)
    set_attention_backend(model, attention_backend)
    if blocks_to_swap:
        model.block_swap = enable_block_swap(model, blocks_to_swap, torch.device(device))
    if compile:
        compile_blocks(model, compile_mode)
    return place(model, device) if on_device else model


def storage_name(model: nn.Module) -> str:
    """How the block Linear weights are stored: `bfloat16`, `fp8 e4m3, per-row scales`..."""
    from moe.wan.fp8 import Fp8Linear

    layer = model.blocks[0].attn1.to_q
    base = getattr(layer, "base", layer)  # under an adapter layer
    if isinstance(base, Fp8Linear):
        form = "plain" if base.scale_weight is None else "per-row scales" if base.scale_weight.ndim else "per-tensor scales"
        return f"fp8 e4m3, {form}"
    return str(base.weight.dtype).removeprefix("torch.")


_BLOCK_LINEAR = re.compile(r"blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|cross_attn\.[kv]_img|ffn\.[02])\.weight")


def expert_bytes(preset: WanPreset, dtype: torch.dtype = torch.bfloat16, fp8: Fp8Mode = "none") -> int:
    """Bytes of one expert's weights as loaded (`dtype`, block Linear weights in fp8 with their
    row scales when asked), from the preset's shapes alone: what placement and the memory plan
    reckon with before a file is read. Modules diffusers keeps in fp32 are not distinguished
    (they are well under 1% of an expert)."""
    from moe.wan.checkpoint import expected_shapes

    total = 0
    for key, shape in expected_shapes(preset.dit).items():
        n = math.prod(shape)
        if fp8 != "none" and _BLOCK_LINEAR.fullmatch(key):
            total += n + (4 * shape[0] if fp8 == "fp8_scaled" else 0)
        else:
            total += n * dtype.itemsize
    return total
