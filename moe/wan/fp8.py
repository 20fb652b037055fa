"""fp8 storage of a frozen DiT's Linear weights (`--fp8_base`, `--fp8_scaled`).

The Linear layers inside the transformer blocks (self- and cross-attention q/k/v/o, both FFN
Linears) keep their weight as `float8_e4m3fn`, one byte per element, and dequantise it to the
compute dtype inside their own forward and backward, one layer at a time: no whole-model bf16
copy ever exists. Norms, modulation tables, embeddings and the head keep their dtype; trainable
adapters stay fp32.

Two forms, as musubi-tuner's options name them:
- `--fp8_base`: a plain cast (values clamped to E4M3's +-448). Wan's weights are small, so a cast
  loses mainly the mantissa bits (3 of bf16's 7).
- `--fp8_scaled`: a scale per output row, `W ~= scale[o] * W8[o, :]` with
  `scale[o] = max|W[o, :]| / 448`, so every row uses the full E4M3 range. E4M3 keeps 3 mantissa
  bits whatever the scale: on trained-looking weights every form rounds about 2.6% of each
  weight away (bench/fp8_bench.py). Per row rather than per tensor for robustness: rows whose
  magnitudes span decades (small-weight layers, outlier rows) keep that 2.6% instead of falling
  into E4M3's subnormals (100% error on the small rows with a plain cast or one scale per
  tensor, measured in the same bench); the scales cost 4 bytes per row (0.03% of a 5120-wide
  weight).

ComfyUI's scaled fp8 releases store one scalar `scale_weight` per Linear; such a checkpoint is
read as is (a scalar scale broadcasts like a row scale).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
Fp8Mode = Literal["none", "fp8", "fp8_scaled"]


def quantize_weight(weight: torch.Tensor, scaled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W8, scale) for a [out, in] weight: with `scaled`, one fp32 scale per output row
    ([out, 1]); without, a clamped cast and no scale. Rows that are all zero get scale 1.
    Works in place on one fp32 copy (this runs for every block Linear while a checkpoint loads)."""
    if not scaled:  # one rounding from the weight's own dtype (448 is exact in bf16/fp16/fp32)
        return weight.detach().clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), None
    w = weight.detach().to(torch.float32, copy=True)
    low, high = torch.aminmax(w, dim=-1, keepdim=True)
    amax = torch.maximum(high, low.neg_())
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return w.div_(scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """W8 (times its scale) in `dtype`; a weight that is not fp8 is just cast."""
    w = weight.to(dtype)
    return w * scale.to(dtype) if scale is not None else w


def is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


class _Fp8LinearFunction(torch.autograd.Function):
    """y = x deq(W8)^T + b with only W8 and its scale saved for backward (the dequantised weight
    is formed again there): a frozen fp8 Linear holds no bf16 copy of its weight between the
    forward and the backward."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        w = dequantize_weight(weight, scale, x.dtype)
        ctx.save_for_backward(weight, scale)
        return F.linear(x, w, bias)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        grad_x = grad @ dequantize_weight(weight, scale, grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


class Fp8Linear(nn.Linear):
    """A frozen Linear whose weight is stored in fp8 (plus an optional per-row or scalar fp32
    `scale_weight`), computing in `compute_dtype` (autocast's dtype when autocast is on).

    A subclass of `nn.Linear`, so the adapter injection and everything that looks for Linear
    layers treat it as one; `weight_in(dtype)` is the dequantised weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype, device=None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.register_buffer("scale_weight", None)

    @classmethod
    def like(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> Fp8Linear:
        """An empty Fp8Linear of `linear`'s shape on the same device (meta while loading)."""
        return cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype, linear.weight.device)

    def set_weight(self, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
        """Store an fp8 weight and its scale ([out, 1], a scalar, or None)."""
        if weight.dtype != FP8_DTYPE or tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(f"expected a float8_e4m3fn [{self.out_features}, {self.in_features}] weight, got {weight.dtype} {list(weight.shape)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale_weight = (
            None if scale is None else scale.to(torch.float32).reshape(-1, 1) if scale.numel() > 1 else scale.to(torch.float32).reshape(())
        )

    def dtype_for(self, x: torch.Tensor) -> torch.dtype:
        device = x.device.type
        return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else self.compute_dtype

    def weight_in(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(self.weight, self.scale_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype_for(x)
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return _Fp8LinearFunction.apply(x.to(dtype), self.weight, self.scale_weight, bias)

    def extra_repr(self) -> str:
        scale = "none" if self.scale_weight is None else "per-row" if self.scale_weight.ndim else "per-tensor"
        return f"{super().extra_repr()}, fp8 e4m3, scale {scale}, computes in {self.compute_dtype}"


def block_linear_names(model: nn.Module) -> list[str]:
    """Dotted (diffusers) names of the Linear layers inside the transformer blocks: the layers
    fp8 storage applies to."""
    return [name for name, m in model.named_modules() if name.startswith("blocks.") and isinstance(m, nn.Linear)]


def convert_to_fp8(model: nn.Module, scaled: bool, compute_dtype: torch.dtype | None = None) -> int:
    """Replace every block Linear of a loaded `model` by an `Fp8Linear`, quantising its weight
    one layer at a time (the bf16/fp32 weight is freed as each layer is done). Returns the count.
    Biases keep their dtype. Used on models built in memory; checkpoints are quantised while
    they are read (`moe.wan.checkpoint.load_transformer`)."""
    count = 0
    for name in block_linear_names(model):
        linear = model.get_submodule(name)
        if isinstance(linear, Fp8Linear):
            continue
        fp8 = Fp8Linear.like(linear, compute_dtype or linear.weight.dtype)
        fp8.set_weight(*quantize_weight(linear.weight, scaled))
        if linear.bias is not None:
            fp8.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        model.set_submodule(name, fp8)
        count += 1
    return count


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the block Linear weights and their scales (what fp8 storage shrinks)."""
    total = 0
    for name in block_linear_names(model):
        m = model.get_submodule(name)
        total += m.weight.numel() * m.weight.element_size()
        scale = getattr(m, "scale_weight", None)
        if scale is not None:
            total += scale.numel() * scale.element_size()
    return total


# ---------------------------------------------------------------------------------------------
# fp8 checkpoints on disk. Two forms are read (and merged into, `moe.merge`):
#   plain: block Linear weights stored as F8_E4M3, nothing else added;
#   ComfyUI's scaled fp8 releases: each F8_E4M3 `X.weight` has a float32 `X.scale_weight`
#     (a scalar, or a [out, 1] row scale) and the file holds a marker tensor `scaled_fp8`
#     (with the file's key prefix, e.g. `model.diffusion_model.scaled_fp8`); some also carry a
#     `X.scale_input` for fp8 matmuls, which a weight-only reader ignores.

SCALE_WEIGHT_SUFFIX = ".scale_weight"
SCALE_INPUT_SUFFIX = ".scale_input"
SCALED_FP8_MARKER = "scaled_fp8"
FP8_FILE_DTYPES = ("F8_E4M3",)


def fp8_extra_key(key: str, prefix: str = "") -> bool:
    """Whether a file key is one of the scaled-fp8 additions rather than a model tensor."""
    bare = key[len(prefix) :] if prefix and key.startswith(prefix) else key
    return bare == SCALED_FP8_MARKER or bare.endswith((SCALE_WEIGHT_SUFFIX, SCALE_INPUT_SUFFIX))


def scale_key_for(weight_key: str) -> str:
    """`blocks.0.self_attn.q.weight` -> `blocks.0.self_attn.q.scale_weight`."""
    return weight_key[: -len(".weight")] + SCALE_WEIGHT_SUFFIX
