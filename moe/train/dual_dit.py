"""The Wan2.2 expert pair: the high-noise DiT owns t >= boundary * 1000, the low-noise DiT the
rest (SPEC section 1; split by sigma, never by scheduler index). Only the active DiT needs to be
on the accelerator: with `offload` the other waits on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from moe.errors import MoeError
from moe.wan.checkpoint import load_transformer
from moe.wan.presets import WanPreset

Expert = Literal["high", "low"]


class DualDiT:
    """Holds one or two `WanTransformer3DModel`s (not an nn.Module: the frozen DiTs must not be
    seen by optimizers, DDP or checkpoints, which only handle the trainable adapters)."""

    def __init__(
        self,
        low: nn.Module,
        high: nn.Module | None,
        boundary: float | None,
        device: torch.device | str = "cpu",
        offload: bool = False,
    ):
        if high is not None and boundary is None:
            raise MoeError("two DiTs need a timestep boundary")
        self.models: dict[str, nn.Module] = {"low": low} | ({"high": high} if high is not None else {})
        self.boundary = boundary
        self.device = torch.device(device)
        self.offload = offload and self.device.type != "cpu"
        self.active: str | None = None

    @classmethod
    def load(
        cls,
        preset: WanPreset,
        dit: Path,
        dit_high_noise: Path | None,
        boundary: float | None,
        dtype: torch.dtype | None,
        device: torch.device | str,
        offload: bool,
    ) -> DualDiT:
        if preset.two_experts and dit_high_noise is None:
            raise MoeError(f"task {preset.task} has two experts: pass the high-noise DiT as --dit_high_noise")
        if not preset.two_experts and dit_high_noise is not None:
            raise MoeError(f"task {preset.task} has a single DiT; drop --dit_high_noise")
        first = "cpu" if offload else device
        low = load_transformer(dit, preset, dtype=dtype, device=first)
        high = load_transformer(dit_high_noise, preset, dtype=dtype, device="cpu" if offload else device) if dit_high_noise else None
        return cls(low, high, boundary if high is not None else None, device, offload)

    def expert_for(self, sigma: float) -> Expert:
        if "high" in self.models and sigma * 1000 >= self.boundary * 1000:
            return "high"
        return "low"

    def get(self, expert: Expert) -> nn.Module:
        """The expert's model, on the device (moving the other one off first when offloading)."""
        model = self.models[expert]
        if self.offload and self.active != expert:
            for name, other in self.models.items():
                if name != expert:
                    other.to("cpu")
            model.to(self.device)
        self.active = expert
        return model

    def __iter__(self):
        return iter(self.models.values())

    def enable_gradient_checkpointing(self) -> None:
        for m in self:
            m.enable_gradient_checkpointing()
