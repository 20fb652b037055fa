"""`--fsdp`: the frozen DiTs sharded over the processes of a multi-process run (FSDP2).

Every transformer block of every expert is `fully_shard`ed on a one-dimensional mesh of all the
processes, and then each expert's root (patch and condition embeddings, head): at rest a process
holds 1/N of each frozen weight. A block's whole weights exist only while it runs: gathered
before its forward, freed after it, gathered again for its backward (gradient checkpointing's
recompute included). The trainable adapters injected into the blocks are FSDP's
`ignored_params`: they stay whole, plain parameters of the `TrainingModule`, which DDP keeps in
step as before (the same adapter is shared by block i of both experts and ignored in both).
Frozen weights get no gradient, so FSDP never reduce-scatters: the only collectives it adds are
all-gathers, on a process group of their own (gloo has them, so the CPU tests run this path; fp8
weights are gathered as bytes together with the blocks' fp32 norms and biases). The saved LoRA
and LoRA-MoE files, checkpoints and `--resume` are those of a run without `--fsdp`.

Every process must run each sharded forward together. The epoch plan already gives every process
the same expert at the same position; with `--fsdp` every process also runs the held-out
evaluation (only the main one writes it).

Refused, one line each (`check_fsdp`): `--fsdp` with one process (nothing to shard over: a user
asking for it expects the memory saving, and a silent no-op would only show up later as an
out-of-memory); with `--blocks_to_swap` (the block swap's copies and FSDP's gathers would fight
over the same weights, and sharding already divides them); with `--offload_inactive_dit always`
(each process already holds 1/N of both experts). With `auto`, both sharded experts stay on the
device.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from moe.dit.expert import format_bytes, local_shard
from moe.errors import MoeError


def check_fsdp(cfg, num_processes: int | None = None) -> None:
    """Refuse what `--fsdp` does not combine with, before anything is loaded. `num_processes`
    defaults to the launcher's WORLD_SIZE (accelerate launch and torchrun set it)."""
    if not getattr(cfg, "fsdp", False):
        return
    n = int(os.environ.get("WORLD_SIZE", "1")) if num_processes is None else num_processes
    if n < 2:
        raise MoeError(
            "--fsdp shards the frozen DiTs over the processes of a multi-process run, and this run has one process: "
            "launch it with `accelerate launch --num_processes N` (or `torchrun --nproc_per_node N`), or drop --fsdp"
        )
    if getattr(cfg, "blocks_to_swap", 0):
        raise MoeError(
            f"--fsdp and --blocks_to_swap {cfg.blocks_to_swap} do not combine: FSDP already spreads each block's weights "
            "over the processes and the block swap would move the same weights; drop --blocks_to_swap (or --fsdp)"
        )
    if cfg.offload_inactive_dit == "always":
        raise MoeError(
            "--fsdp and --offload_inactive_dit always do not combine: each process already holds 1/N of both experts; "
            "use --offload_inactive_dit auto or never (both sharded experts stay on the device), or drop --fsdp"
        )


def _frozen(model: nn.Module) -> list[torch.Tensor]:
    """The model's frozen weights and buffers (not the trainable adapters injected into it)."""
    return [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())


def frozen_bytes_per_process(model: nn.Module) -> int:
    """Bytes of the model's frozen weights and buffers held by this process (its shards when
    sharded, everything when not)."""
    return sum(local_shard(t).numel() * t.element_size() for t in _frozen(model))


def bytes_per_process(dits) -> dict[str, int]:
    """Expert name -> bytes of its frozen weights and buffers on this process (for the memory plan)."""
    return {name: frozen_bytes_per_process(m) for name, m in dits.models.items()}


def shard_fraction(model: nn.Module) -> float:
    """This process's share of the model's frozen parameters (1.0 unsharded, about 1/N sharded:
    FSDP splits each weight along its first dimension, the last shards may be shorter)."""
    frozen = [p for p in model.parameters() if not p.requires_grad]
    return sum(local_shard(p).numel() for p in frozen) / max(sum(p.numel() for p in frozen), 1)


def _mesh(device: torch.device):
    """A one-dimensional mesh of all processes on a process group of its own, so FSDP's gathers
    never queue behind (or interleave with) DDP's gradient all-reduces."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(dist.new_group(), device.type)


def shard_frozen_dits(dits, trainable: nn.Module, accelerator) -> str:
    """Shard every block, then the root, of every expert in `dits` over the processes (FSDP2
    `fully_shard`), leaving `trainable`'s parameters (the adapters injected into the blocks) whole.
    Call after the adapters are injected and before `accelerator.prepare`. The experts may be on
    the host or on the device: each block's weights are moved to `accelerator.device` as they are
    sharded, so a process never holds a whole expert there. Returns a memory line."""
    from torch.distributed.fsdp import fully_shard

    if accelerator.num_processes < 2:
        raise MoeError("--fsdp needs a multi-process run (accelerate launch --num_processes N); drop --fsdp")
    device = accelerator.device
    if any(getattr(m, "block_swap", None) is not None for m in dits):
        raise MoeError("--fsdp and --blocks_to_swap do not combine; drop --blocks_to_swap (or --fsdp)")
    if dits.offload:  # `auto` counted both whole experts; sharded, both stay on the device
        dits.offload, dits.active = False, None
        dits._host.clear()
    # The root's output is a view (diffusers' unpatchify); FSDP warns that an in-place op on it
    # would skip the root's gather for backward. The losses use it out of place only (and
    # tests/test_fsdp.py checks the gradients against an unsharded run, bit for bit).
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPWanTransformer3DModel\) returned a view")
    mesh = _mesh(device)
    keep = {id(p) for p in trainable.parameters()}
    for model in dits:
        ignored = {p for p in model.parameters() if id(p) in keep}
        for block in model.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True, ignored_params={p for p in block.parameters() if id(p) in keep})
        fully_shard(model, mesh=mesh, reshard_after_forward=True, ignored_params=ignored)  # buffers stay whole
    dits.device = device
    local = bytes_per_process(dits)
    whole = {name: sum(t.numel() * t.element_size() for t in _frozen(m)) for name, m in dits.models.items()}  # global numel
    n = accelerator.num_processes
    parts = ", ".join(f"{name} {format_bytes(local[name])} of {format_bytes(whole[name])}" for name in dits.models)
    return f"FSDP: each of {n} processes holds about 1/{n} of every expert's frozen weights on {device} ({parts})"
