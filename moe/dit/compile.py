"""`--compile`: regional `torch.compile` of a Wan DiT, one transformer block at a time.

Each block's `forward` is replaced by `torch.compile(block.forward)`; the block module itself is
left alone. So:
- the module hooks around a block (block swap's fetch/park hooks, FSDP2's all-gather/reshard
  hooks, gradient checkpointing's `checkpoint(block, ...)`) run eagerly around the compiled
  code, exactly as without `--compile` (compiling the module's `__call__`, as `block.compile()`
  does, would put block swap's `.data` moves inside the traced region);
- compile time stays small: every block of every expert runs the same code object
  (`WanTransformerBlock.forward`), and since PyTorch 2.5 dynamo treats a module's parameters as
  graph inputs (`inline_inbuilt_nn_modules`), so one compiled graph serves every block with the
  same structure. A new graph is compiled only for a new variant: the block's input needing a
  gradient or not (the blocks below the first adapter), which Linear layers carry an adapter
  (and of which rank), gradient mode (training vs sampling), input shapes;
- the adapters are injected after loading (`moe.train.stage1`, `moe.train.stage2`,
  `moe.lora_moe.model`, `moe.inference`): compilation is lazy, the first call of a block traces
  the module tree as it is then, with the injected `LoRALinear` / `LoRAMoELinear` layers; their
  fused autograd Function (`moe.lora.layer.FusedLowRankLinear`, fp8 dequantisation included) and
  `Fp8Linear`'s are traced into the block's graph (forward and backward), with no graph break
  per layer (tests/test_compile.py counts dynamo's graph breaks and compiled frames).

CUDA graphs (`reduce-overhead`, `max-autotune`) are not offered: block swap, expert offloading
and FSDP move the frozen weights between calls, which a captured graph cannot follow.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import get_args

from torch import nn

from moe.config.runtime_options import CompileMode

COMPILE_MODES: tuple[str, ...] = get_args(CompileMode)
# One code object serves every block: its cache holds one entry per variant (see above), more
# than dynamo's default of 8 once training, sampling and a few shapes mix.
RECOMPILE_LIMIT = 64
# torch.compile's backend when none is named; tests set `aot_eager` (dynamo and AOTAutograd as in
# production, without inductor's C++ code generation, which takes minutes on a small CPU).
DEFAULT_BACKEND = "inductor"
_EAGER_FORWARD = "_moe_eager_forward"


def is_compiled(block: nn.Module) -> bool:
    return _EAGER_FORWARD in block.__dict__


def compile_blocks(
    model: nn.Module,
    mode: str | None = None,
    *,
    backend: str | None = None,
    dynamic: bool | None = None,
    fullgraph: bool = False,
    only: Iterable[int] | None = None,
) -> int:
    """Compile the `forward` of every block in `model.blocks` (regional compilation); returns the
    number of blocks compiled by this call (blocks already compiled are skipped). `mode`: None or
    one of `COMPILE_MODES`; `backend`: torch.compile's (`DEFAULT_BACKEND` when None); `dynamic`:
    torch.compile's (None: static shapes first, dynamic after a shape change); `only`: the block
    indices to compile (default all; tests and benches compile a few)."""
    if mode not in (None, *COMPILE_MODES):
        raise ValueError(f"compile mode {mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"compile_blocks needs a model with a `blocks` ModuleList, got {type(model).__name__}")
    import torch._dynamo

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    backend = backend or DEFAULT_BACKEND
    options = {"mode": None if mode == "default" or backend != "inductor" else mode}
    wanted = None if only is None else set(only)
    count = 0
    for i, block in enumerate(blocks):
        if is_compiled(block) or (wanted is not None and i not in wanted):
            continue
        eager = block.forward  # the bound class method
        block.__dict__[_EAGER_FORWARD] = eager
        block.forward = torch.compile(eager, backend=backend, dynamic=dynamic, fullgraph=fullgraph, **options)
        count += 1
    return count


def uncompile_blocks(model: nn.Module) -> int:
    """Undo `compile_blocks` (the blocks run eagerly again); returns the number of blocks."""
    count = 0
    for block in model.blocks:
        if is_compiled(block):
            del block.__dict__[_EAGER_FORWARD]
            del block.forward  # the instance attribute: the class's forward shows through again
            count += 1
    return count
