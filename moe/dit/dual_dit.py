"""The Wan2.2 expert pair: the high-noise DiT owns t >= boundary * 1000, the low-noise DiT the
rest (SPEC section 1; split by sigma, never by scheduler index), and where the two live.

Placement (`--offload_inactive_dit`): `never` keeps both experts on the device; `always` keeps
only the active one there and parks the other in host memory (pinned, so loading it back is a
plain DMA; the frozen weights keep a host copy, so parking costs no copy back at all); `auto`
(default) keeps both on the device when their weights plus a headroom for activations fit in the
device's free memory, else offloads. With offloading, the training loop orders each accumulation
window's micro-batches by expert (`moe.train.epoch_plan`) so a window swaps at most once.
`swaps` counts the times the resident expert changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from torch import nn

from moe.config.presets import WanPreset
from moe.dit.expert import format_bytes, is_sharded, load_expert, place, resident_bytes, resident_tensors, storage_name, swapped_bytes
from moe.errors import MoeError
from moe.wan.fp8 import Fp8Mode

Expert = Literal["high", "low"]
Placement = Literal["auto", "always", "never"]
GiB = 2**30


def should_offload(policy: Placement, device: torch.device, need_bytes: int, free_bytes: int | None, headroom_bytes: int) -> bool:
    """Whether to keep only the active expert on `device`. `auto` offloads when the two experts'
    weights (`need_bytes`) plus `headroom_bytes` for activations exceed the device's free memory
    (`free_bytes`; None on the CPU, where there is nowhere to offload to)."""
    if policy != "auto":
        return policy == "always"
    return free_bytes is not None and need_bytes + headroom_bytes > free_bytes


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on an accelerator (None on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


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
        for model in self.models.values():
            model.requires_grad_(False)  # frozen: only adapters injected later train
        self.boundary = boundary
        self.device = torch.device(device)
        self.offload = offload and high is not None
        self.active: str | None = None
        self.swaps = 0
        self._host: dict[str, list[torch.Tensor]] = {}
        if self.offload:
            pin = self.device.type == "cuda"
            for name, model in self.models.items():
                self._host[name] = []
                for t in resident_tensors(model):  # one tensor at a time: no second copy of a whole model
                    t.data = t.data.to("cpu").pin_memory() if pin else t.data.to("cpu")
                    self._host[name].append(t.data)
        else:
            for model in self.models.values():
                place(model, self.device)

    @classmethod
    def load(
        cls,
        preset: WanPreset,
        dit: Path,
        dit_high_noise: Path | None,
        boundary: float | None,
        dtype: torch.dtype | None,
        device: torch.device | str,
        placement: Placement = "auto",
        headroom_bytes: int = 32 * GiB,
        free_bytes: int | None = None,
        fp8: Fp8Mode = "none",
        blocks_to_swap: int = 0,
        compile: bool = False,
        compile_mode: str = "default",
        attention_backend: str = "native",
    ) -> DualDiT:
        """Load the expert(s) and place them. `free_bytes` overrides the device's free memory
        (queried when None) for the `auto` decision. `fp8` keeps the block Linear weights in fp8
        (`moe.wan.fp8`); `blocks_to_swap` keeps that many blocks of each expert in (pinned) host
        memory, copied to the device one block ahead of use (`moe.dit.block_swap`). The `auto`
        decision counts the bytes that actually live on the device (fp8, minus swapped blocks).
        `compile` and `attention_backend`: `moe.dit.expert.load_expert`'s."""
        if preset.two_experts and dit_high_noise is None:
            raise MoeError(f"task {preset.task} has two experts: pass the high-noise DiT as --dit_high_noise")
        if not preset.two_experts and dit_high_noise is not None:
            raise MoeError(f"task {preset.task} has a single DiT; drop --dit_high_noise")
        device = torch.device(device)
        runtime = dict(compile=compile, compile_mode=compile_mode, attention_backend=attention_backend)
        low = load_expert(dit, preset, dtype, device, fp8, blocks_to_swap, on_device=False, **runtime)
        offload = False
        if dit_high_noise is not None:
            free = device_free_bytes(device) if free_bytes is None else free_bytes
            offload = should_offload(placement, device, 2 * resident_bytes(low), free, headroom_bytes)
            if not offload:
                place(low, device)  # before the second expert is read: host memory holds one at a time
        high = load_expert(dit_high_noise, preset, dtype, device, fp8, blocks_to_swap, on_device=False, **runtime) if dit_high_noise else None
        return cls(low, high, boundary if high is not None else None, device, offload)

    def memory_plan(self) -> str:
        """One line: what lives where, bytes per expert, and the copies to expect (printed by
        `lora-moe stage1/stage2` at start)."""
        first = next(iter(self))
        storage = storage_name(first)
        on_device, on_host = resident_bytes(first), swapped_bytes(first)
        swap = getattr(first, "block_swap", None)
        n = len(self.models)
        per = f"{n} expert{'s' if n > 1 else ''} x {format_bytes(on_device + on_host)} ({storage})"
        pinned = "pinned host memory" if self.device.type == "cuda" else "host memory (CPU: a no-op swap)"
        swaps = (
            f"; blocks 0-{len(swap.swapped) - 1} of {len(first.blocks)} per expert in {pinned} "
            f"({format_bytes(on_host)} each), {len(swap.swapped)} block copies per forward"
            if swap is not None and swap.swapped
            else ""
        )
        if is_sharded(first):
            where = f"sharded over the processes (FSDP): {format_bytes(n * on_device)} of them on this process's {self.device}"
        elif n == 1:
            where = f"on {self.device} ({format_bytes(on_device)})"
        elif self.offload:
            where = (
                f"active expert on {self.device} ({format_bytes(on_device)}), the other in {pinned}; "
                f"micro-batches grouped by expert, at most one expert swap per accumulation window"
            )
        else:
            where = f"both resident on {self.device} ({format_bytes(n * on_device)})"
        return f"memory plan: {per}, {where}{swaps}"

    def expert_for(self, sigma: float) -> Expert:
        if "high" in self.models and sigma * 1000 >= self.boundary * 1000:
            return "high"
        return "low"

    def get(self, expert: Expert) -> nn.Module:
        """The expert's model, on the device (parking the other one first when offloading)."""
        model = self.models[expert]
        if self.offload and self.active != expert:
            if self.active is not None:
                self.swaps += 1
                self._place(self.active, self._host[self.active])
            self._place(expert, [t.to(self.device, non_blocking=True) for t in self._host[expert]])
        self.active = expert
        return model

    def _place(self, name: str, tensors: list[torch.Tensor]) -> None:
        """Point the model's frozen weights and buffers at `tensors` (host copies or device ones)."""
        for t, new in zip(resident_tensors(self.models[name]), tensors, strict=True):
            t.data = new

    def __iter__(self):
        return iter(self.models.values())

    def enable_gradient_checkpointing(self) -> None:
        for m in self:
            m.enable_gradient_checkpointing()
