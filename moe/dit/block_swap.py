"""Block swap (`--blocks_to_swap N`): the frozen weights of the first N transformer blocks live in
host memory and visit the device one block at a time, as musubi-tuner's `ModelOffloader` does.

What moves: the frozen tensors of a swapped block, i.e. its parameters with `requires_grad`
False and its buffers (an `Fp8Linear`'s `scale_weight`). Trainable parameters (the LoRA /
LoRA-MoE adapters injected into the blocks, shared by the two experts) never move. Tensors move
by reassigning `.data`, so every Parameter keeps its identity (optimizers, adapters, DualDiT's
tensor lists stay valid). Each frozen tensor keeps one permanent host copy (pinned when the device
is CUDA); parking a block only points `.data` back at it (no device-to-host copy, as DualDiT's
expert offloading), and a fetch is one host-to-device copy per tensor (`transfers` counts blocks).

When blocks move:
- Forward (blocks ascending): a forward pre-hook on swapped block i makes it resident (waits for
  its prefetch, or copies now) and starts the prefetch of block i+1 on a side CUDA stream
  (`non_blocking` copies from pinned memory, an event the compute stream waits on,
  `record_stream` on the compute stream so the allocator cannot hand the memory out again
  while kernels that read it are queued); a forward post-hook parks block i. Block 0 is
  prefetched by a pre-hook on the model, so it overlaps the patch and condition embedders.
  At most two swapped blocks are on the device at a time, so a forward costs exactly N transfers.
- Backward (blocks descending): the forward post-hook of a block whose output needs a gradient
  registers a hook on that output tensor; it runs when the output's gradient is ready, i.e.
  before any of the block's own backward nodes (a backward pre-hook). It parks the blocks above
  (their backward is over: the autograd engine runs ready nodes latest-created first), makes the
  block resident and prefetches the next lower swapped block whose output needed a gradient.
  Block N (the first resident one) gets the same hook, so block N-1's fetch overlaps block N's
  backward. A callback queued on the autograd engine parks everything at the end of backward.
  Blocks whose output needed no gradient (no adapter in or below them, as the first blocks of a
  stage-1 run where adapters sit in the last blocks) are never fetched in backward.
  Without gradient checkpointing autograd saved the Parameter objects themselves, whose `.data`
  was parked after the forward: hence the fetch before the block's backward. With (non-reentrant)
  gradient checkpointing the backward recomputes the block's forward: its hooks fire again,
  in descending order, and find the block already resident; it is not parked after the
  recomputation (the recomputed graph saved the Parameter objects too, and checkpoint may stop
  the recomputation early, before the post-hook) but when the next lower block's backward starts.
- Under `no_grad` / `inference_mode` (sampling, validation) only the forward part runs.

On the CPU with `park="host"` the same code runs and the swap is a no-op (a "fetch" returns the
same tensors): results are bit-identical to no swap. `park="meta"` is a test mode for the CPU:
the host copies are private, a parked tensor points at a zero-size placeholder (PyTorch refuses to
point a CPU tensor's `.data` at a meta tensor, so the placeholders are empty CPU tensors; any use
of a parked block fails with a size mismatch) and a fetch is a real copy (`clone`).

Compared with musubi-tuner's `ModelOffloader` (which swaps the last N blocks, exchanging the
device storage of a block leaving for a block arriving in a thread pool, and hooks backward with
`register_full_backward_hook`): the permanent pinned host copies make parking free; the device
memory is left to the caching allocator (per-stream pools plus `record_stream`) instead of being
overwritten in place, which would be unsafe where autograd saved a view of a weight; no thread is
needed since pinned host-to-device copies are already asynchronous; and a tensor hook on the
block output replaces the module full backward hook, which fires before the block's backward
(too early to park it) whenever the block's inputs need no gradient, as block 0's never do.

Use: build the model, freeze it, convert it to fp8 and inject the adapters first (BlockSwap
records the Parameter objects of the swapped blocks), then `enable_block_swap`. The caller places
everything else (other blocks, embeddings, head, adapters) on the device and must leave
`swapped_tensors()` alone: `model.to(device)` would copy the swapped blocks onto the device.
Only diffusers' default non-reentrant checkpointing is supported (reentrant works but fetches
twice per block in backward).
"""

from __future__ import annotations

import functools
import operator
from typing import Literal

import torch
from torch import nn

from moe.errors import MoeError
from moe.lora.layer import AdaptedLinear

Park = Literal["host", "meta"]
_PARKED, _INFLIGHT, _RESIDENT = "parked", "inflight", "resident"


class _Slot:
    """One swapped block: its frozen tensors, their host copies, what `.data` points at when
    parked, and the device copies while it is in flight or resident."""

    def __init__(self, tensors: list[torch.Tensor], host: list[torch.Tensor], parked: list[torch.Tensor]):
        self.tensors = tensors
        self.host = host
        self.parked = parked
        self.state = _PARKED
        self.device_copies: list[torch.Tensor] | None = None
        self.event: torch.cuda.Event | None = None


def _block_frozen_tensors(block: nn.Module) -> list[torch.Tensor]:
    """A block's frozen parameters and its buffers, each once. Refuses a block with trainable
    parameters outside its adapters: a model not frozen yet would silently swap nothing."""
    adapters = {id(p) for m in block.modules() if isinstance(m, AdaptedLinear) for p in m.adapter.parameters()}
    loose = [name for name, p in block.named_parameters() if p.requires_grad and id(p) not in adapters]
    if loose:
        raise ValueError(
            f"block parameter {loose[0]} (and {len(loose) - 1} more) requires grad: "
            "freeze the model (requires_grad_(False)) before enabling block swap"
        )
    seen: set[int] = set()
    out = []
    for t in [p for p in block.parameters() if not p.requires_grad] + list(block.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _first_grad_tensor(output) -> torch.Tensor | None:
    """The block output's first tensor that needs a gradient (None when none does)."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    return next((t for t in items if isinstance(t, torch.Tensor) and t.requires_grad), None)


class BlockSwap:
    """Keeps the frozen weights of `model.blocks[:blocks_to_swap]` in host memory and brings each
    block to `device` only while it runs (see the module docstring)."""

    def __init__(self, model: nn.Module, blocks_to_swap: int, device: torch.device | str, park: Park = "host"):
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            raise TypeError(f"block swap needs a model with a `blocks` ModuleList, got {type(model).__name__}")
        count = len(blocks)
        try:
            n = operator.index(blocks_to_swap)
        except TypeError:
            n = None
        if n is None or isinstance(blocks_to_swap, bool) or not 0 < n <= count:
            raise MoeError(f"--blocks_to_swap {blocks_to_swap}: the model has {count} blocks; swap between 1 and {count}")
        if park not in ("host", "meta"):
            raise ValueError(f"park must be 'host' or 'meta', got {park!r}")
        device = torch.device(device)
        if park == "meta" and device.type != "cpu":
            raise ValueError("park='meta' is a test mode for the CPU")
        if getattr(model, "_block_swap", None) is not None:
            raise RuntimeError("block swap is already enabled on this model; remove() it first")

        self.model = model
        self.device = device
        self.park = park
        self.swapped: list[int] = list(range(n))
        self.transfers = 0
        self._cuda = device.type == "cuda"
        self._stream = torch.cuda.Stream(device=device) if self._cuda else None
        self._mode: Literal["forward", "backward"] = "forward"
        self._needs_backward: set[int] = set()  # swapped blocks whose output needed a gradient
        self._removed = False

        self._slots: list[_Slot] = []
        for i in self.swapped:
            tensors = _block_frozen_tensors(blocks[i])
            host = [self._host_copy(t.data) for t in tensors]
            parked = host if park == "host" else [h.new_empty(0) for h in host]
            slot = _Slot(tensors, host, parked)
            for t, p in zip(tensors, parked):
                t.data = p  # a model already on the device frees that block's memory here
            self._slots.append(slot)

        self._handles = [model.register_forward_pre_hook(self._on_model_forward)]
        for i in self.swapped:
            self._handles.append(blocks[i].register_forward_pre_hook(functools.partial(self._on_block_forward, i)))
        for i in range(min(n + 1, count)):  # the swapped blocks and the first resident one
            self._handles.append(blocks[i].register_forward_hook(functools.partial(self._after_block_forward, i)))
        model._block_swap = self

    # --- public ---------------------------------------------------------------------------
    def swapped_tensors(self) -> list[torch.Tensor]:
        """The frozen parameters and buffers this swap manages (whoever moves the whole model
        must leave them alone)."""
        return [t for slot in self._slots for t in slot.tensors]

    def host_bytes(self) -> int:
        """Bytes of the swapped blocks' frozen tensors, kept in host memory."""
        return sum(h.numel() * h.element_size() for slot in self._slots for h in slot.host)

    def remove(self) -> None:
        """Remove the hooks; the swapped blocks' frozen tensors end on their host copies (pinned
        host memory on CUDA; the original tensors in meta mode)."""
        if self._removed:
            return
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for slot in self._slots:
            self._park(slot)
            for t, h in zip(slot.tensors, slot.host):
                t.data = h
        self._mode = "forward"
        self._needs_backward.clear()
        if getattr(self.model, "_block_swap", None) is self:
            del self.model._block_swap

    # --- moving tensors -------------------------------------------------------------------
    def _host_copy(self, data: torch.Tensor) -> torch.Tensor:
        if self.park == "meta":
            return data.to("cpu")  # private: `.data` points at a placeholder from now on
        if not self._cuda:
            return data.to("cpu")
        if data.device.type == "cpu" and data.is_pinned():
            return data  # DualDiT's offloading already pinned it
        return torch.empty_like(data, device="cpu", pin_memory=True).copy_(data)

    def _start(self, slot: _Slot) -> None:
        """Issue the block's host-to-device copy (asynchronous on CUDA)."""
        self.transfers += 1
        with torch.inference_mode(False), torch.no_grad():  # never inference tensors: training may reuse them
            if self._cuda:
                with torch.cuda.stream(self._stream):
                    slot.device_copies = [h.to(self.device, non_blocking=True) for h in slot.host]
                    slot.event = torch.cuda.Event()
                    slot.event.record(self._stream)
            elif self.park == "meta":
                slot.device_copies = [h.clone() for h in slot.host]
            else:
                slot.device_copies = [h.to(self.device) for h in slot.host]  # the CPU: the same tensors
        slot.state = _INFLIGHT

    def _prefetch(self, i: int | None) -> None:
        if i is not None and self._slots[i].state == _PARKED:
            self._start(self._slots[i])

    def _ensure(self, i: int) -> None:
        """Block i resident: its frozen tensors point at device copies the compute stream may use."""
        slot = self._slots[i]
        if slot.state == _RESIDENT:
            return
        if slot.state == _PARKED:
            self._start(slot)
        if slot.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(slot.event)
            for d in slot.device_copies:
                d.record_stream(compute)  # allocated on the side stream, read on this one
            slot.event = None
        for t, d in zip(slot.tensors, slot.device_copies):
            t.data = d
        slot.state = _RESIDENT

    def _park(self, slot: _Slot) -> None:
        if slot.state == _PARKED:
            return
        if slot.state == _RESIDENT:
            for t, p in zip(slot.tensors, slot.parked):
                t.data = p
        # in flight: only the side stream touched the copies, whose pool orders their reuse
        slot.device_copies = None
        slot.event = None
        slot.state = _PARKED

    def _park_all(self, above: int = -1) -> None:
        for i in self.swapped:
            if i > above:
                self._park(self._slots[i])

    def _next_backward(self, k: int) -> int | None:
        """The nearest swapped block below k whose backward will run."""
        return max((i for i in self._needs_backward if i < k), default=None)

    # --- hooks ----------------------------------------------------------------------------
    def _on_model_forward(self, module, args):
        if self._mode == "backward":  # a backward that raised never reached its end callback
            self._end_backward()
        self._park_all()
        self._prefetch(0)

    def _on_block_forward(self, i: int, module, args):
        self._ensure(i)
        if self._mode == "forward":
            self._prefetch(i + 1 if i + 1 < len(self._slots) else None)
        else:  # checkpoint recomputation inside backward: descending
            self._prefetch(self._next_backward(i))

    def _after_block_forward(self, i: int, module, args, output):
        if self._mode != "forward":
            return  # recomputation: the block stays until its backward is over
        if torch.is_grad_enabled():
            out = _first_grad_tensor(output)
            if out is not None:
                if i < len(self._slots):
                    self._needs_backward.add(i)
                out.register_hook(functools.partial(self._before_block_backward, i))
        if i < len(self._slots):
            self._park(self._slots[i])

    def _before_block_backward(self, k: int, grad: torch.Tensor):
        """Block k's output gradient is ready: its backward (or recomputation) comes next."""
        if self._removed:
            return None
        if self._mode != "backward":
            self._mode = "backward"
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        self._park_all(above=k)  # their backward is over
        if k < len(self._slots):
            self._ensure(k)
        self._prefetch(self._next_backward(k))
        return None

    def _end_backward(self) -> None:
        self._park_all()
        self._needs_backward.clear()
        self._mode = "forward"


def enable_block_swap(model: nn.Module, blocks_to_swap: int, device: torch.device | str, park: Park = "host") -> BlockSwap:
    """Swap the first `blocks_to_swap` blocks of `model` (see `BlockSwap`)."""
    return BlockSwap(model, blocks_to_swap, device, park)
