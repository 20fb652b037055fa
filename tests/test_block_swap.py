"""Block swap (`moe.dit.block_swap`): the hook logic, proven on the CPU.

`park="host"` on the CPU is the production code path with a no-op copy (bit-identical to no
swap); `park="meta"` makes a parked block unusable (zero-size placeholders) and every fetch a real
copy, so a result that matches no swap proves each block was fetched before it ran, in forward,
in backward and in checkpoint recomputation. Transfer counts prove blocks are not fetched more
than needed (N per forward; one per block whose backward runs; none for the others).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop

from moe.config.presets import get_preset
from moe.dit.block_swap import BlockSwap, enable_block_swap
from moe.errors import MoeError
from moe.lora.inject import build_adapters, inject_lora
from moe.wan.checkpoint import build_random_transformer
from moe.wan.fp8 import FP8_DTYPE, Fp8Linear, convert_to_fp8

BLOCKS = 8  # tiny-t2v
SUBMODULES = ("self_attn.q", "self_attn.v", "cross_attn.k", "ffn.0")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are far too small for intra-op threads: on a busy machine they only
    contend (a training step takes 0.1 s on one thread, up to 10 s on two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(adapter_blocks=range(BLOCKS), fp8: bool = False):
    """A frozen random tiny-t2v DiT with LoRA adapters (non-zero up and down) in `adapter_blocks`."""
    model = build_random_transformer(get_preset("tiny-t2v"), seed=0)
    model.requires_grad_(False)
    if fp8:
        convert_to_fp8(model, scaled=True)
    torch.manual_seed(1)
    adapters = build_adapters(model, {f"blocks.{b}.{s}": 4 for b in adapter_blocks for s in SUBMODULES}, alpha=1.0)
    with torch.no_grad():
        for a in adapters.values():
            a.lora_up.normal_(0.0, 0.1)
    inject_lora(model, adapters)
    return model, adapters


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
    )


def forward(model, seed: int = 0) -> torch.Tensor:
    return model(**inputs(seed), return_dict=False)[0]


def train_step(model, adapters, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(output, adapter gradients) of one forward and backward; the gradients are reset."""
    out = forward(model, seed)
    out.float().square().mean().backward()
    grads = {}
    for name, p in adapters.named_parameters():
        grads[name] = p.grad.clone()
        p.grad = None
    return out.detach(), grads


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def block_tensors(model, i):
    return [p for p in model.blocks[i].parameters() if not p.requires_grad] + list(model.blocks[i].buffers())


def test_refuses_bad_counts():
    model, _ = tiny_model(adapter_blocks=[7])
    for bad in (0, -1, BLOCKS + 1, True, 2.5):
        with pytest.raises(MoeError, match=rf"--blocks_to_swap {bad}: the model has {BLOCKS} blocks"):
            BlockSwap(model, bad, "cpu")
    swap = enable_block_swap(model, BLOCKS, "cpu")  # all of them is fine
    assert swap.swapped == list(range(BLOCKS))
    with pytest.raises(RuntimeError, match="already enabled"):
        enable_block_swap(model, 2, "cpu")
    unfrozen = build_random_transformer(get_preset("tiny-t2v"), seed=0)  # would swap nothing
    with pytest.raises(ValueError, match="freeze the model"):
        enable_block_swap(unfrozen, 2, "cpu")


def test_manages_the_frozen_tensors_of_the_first_blocks_only():
    model, adapters = tiny_model(fp8=True)
    ids = {id(p) for p in model.parameters()} | {id(b) for b in model.buffers()}
    swap = enable_block_swap(model, 3, "cpu")
    managed = swap.swapped_tensors()
    assert swap.swapped == [0, 1, 2]
    expected = [t for i in range(3) for t in block_tensors(model, i)]
    assert [id(t) for t in managed] == [id(t) for t in expected]
    assert {id(t) for t in managed} <= ids  # the model's own objects: identity kept
    assert not any(t.requires_grad for t in managed)
    assert not {id(p) for p in adapters.parameters()} & {id(t) for t in managed}  # adapters never move
    assert any(t.dtype == FP8_DTYPE for t in managed)
    scales = [m.scale_weight for i in range(3) for m in model.blocks[i].modules() if isinstance(m, Fp8Linear)]
    assert scales and {id(s) for s in scales} <= {id(t) for t in managed}  # fp8 scales are buffers it moves
    assert swap.host_bytes() == sum(t.numel() * t.element_size() for t in expected) > 0
    assert swap.transfers == 0


@pytest.mark.parametrize("checkpointing", [False, True])
def test_host_mode_on_the_cpu_is_bit_identical_to_no_swap(checkpointing):
    model, adapters = tiny_model()
    if checkpointing:
        model.enable_gradient_checkpointing()
    ref_out, ref_grads = train_step(model, adapters)
    swap = enable_block_swap(model, 5, "cpu")
    out, grads = train_step(model, adapters)
    assert torch.equal(out, ref_out)
    assert_same(grads, ref_grads)
    assert swap.transfers == 5 + 5  # one per block in forward, one per block in backward


@pytest.mark.parametrize("checkpointing", [False, True, "no early stop"])
@pytest.mark.parametrize("n", [3, BLOCKS])
def test_meta_mode_fetches_every_block_before_it_runs(checkpointing, n):
    model, adapters = tiny_model()
    if checkpointing:
        model.enable_gradient_checkpointing()
    # Checkpoint stops a recomputation at the last tensor the backward needs, before the block's
    # forward post-hook; without early stop the post-hook runs too and must not park the block.
    early_stop = contextlib.nullcontext() if checkpointing != "no early stop" else set_checkpoint_early_stop(False)
    ref_out, ref_grads = train_step(model, adapters)
    swap = enable_block_swap(model, n, "cpu", park="meta")
    assert all(t.numel() == 0 for t in swap.swapped_tensors())  # parked: unusable

    # At most two swapped blocks hold device copies at any time (the running one and the next).
    held = []
    sample = lambda *_: held.append(sum(s.device_copies is not None for s in swap._slots))  # noqa: E731

    def after(module, args, output):
        sample()
        if output.requires_grad:
            output.register_hook(sample)

    handles = [b.register_forward_pre_hook(sample) for b in model.blocks]
    handles += [b.register_forward_hook(after) for b in model.blocks]
    with early_stop:
        out = forward(model)
        assert swap.transfers == n
        out.float().square().mean().backward()
    for h in handles:
        h.remove()
    grads = {name: p.grad.clone() for name, p in adapters.named_parameters()}
    assert torch.equal(out, ref_out)
    assert_same(grads, ref_grads)
    assert swap.transfers == 2 * n
    assert max(held) == min(2, n) and len(held) >= 3 * BLOCKS
    assert all(t.numel() == 0 for t in swap.swapped_tensors())  # parked again after backward
    assert all(s.device_copies is None for s in swap._slots)


def test_meta_mode_inference_several_forwards():
    model, _ = tiny_model()
    with torch.no_grad():
        refs = [forward(model, seed) for seed in range(3)]
    swap = enable_block_swap(model, 4, "cpu", park="meta")
    with torch.no_grad():
        outs = [forward(model, seed) for seed in range(3)]
    with torch.inference_mode():
        outs.append(forward(model, 0))
    assert all(torch.equal(o, r) for o, r in zip(outs, refs + refs[:1], strict=True))
    assert swap.transfers == 4 * 4  # exactly N per forward, no backward side effects


def test_meta_mode_raises_when_the_hooks_are_skipped():
    model, _ = tiny_model()
    captured = {}
    model.blocks[0].register_forward_pre_hook(lambda m, args: captured.setdefault("args", args))
    with torch.no_grad():
        forward(model)
    swap = enable_block_swap(model, 3, "cpu", park="meta")
    args = captured["args"]
    with torch.no_grad():
        expected = model.blocks[1](*args)  # through the hooks: fetched, run, parked
        for i in swap.swapped:
            with pytest.raises(RuntimeError):
                model.blocks[i].forward(*args)  # bypasses the hooks: the block is parked
        model.blocks[3].forward(*args)  # a resident block runs as it is
        swap.remove()
        assert torch.equal(model.blocks[1].forward(*args), expected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_blocks_without_backward_cost_no_backward_transfer(checkpointing):
    """Stage-1-like: adapters only in the last blocks, the swapped first blocks need no gradient."""
    model, adapters = tiny_model(adapter_blocks=range(5, BLOCKS))
    if checkpointing:
        model.enable_gradient_checkpointing()
    ref_out, ref_grads = train_step(model, adapters)
    swap = enable_block_swap(model, 4, "cpu", park="meta")
    out, grads = train_step(model, adapters)
    assert torch.equal(out, ref_out)
    assert_same(grads, ref_grads)
    assert swap.transfers == 4  # forward only
    # One swapped block with adapters: its backward runs, the three below it cost nothing.
    swap.remove()
    swap = enable_block_swap(model, 6, "cpu", park="meta")
    out, grads = train_step(model, adapters)
    assert_same(grads, ref_grads)
    assert swap.transfers == 6 + 1


@pytest.mark.parametrize("checkpointing", [False, True])
def test_several_training_steps_match_no_swap(checkpointing):
    def run(swap_blocks):
        model, adapters = tiny_model()
        if checkpointing:
            model.enable_gradient_checkpointing()
        swap = enable_block_swap(model, swap_blocks, "cpu", park="meta") if swap_blocks else None
        opt = torch.optim.SGD(adapters.parameters(), lr=0.5)
        losses = []
        for step in range(3):
            loss = forward(model, seed=step).float().square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        with torch.no_grad():  # a validation forward between steps leaves no state behind
            forward(model, seed=9)
        return losses, {k: v.clone() for k, v in adapters.state_dict().items()}, swap

    ref_losses, ref_state, _ = run(0)
    losses, state, swap = run(5)
    assert losses == ref_losses and len(set(losses)) == 3  # the adapters did train
    assert_same(state, ref_state)
    assert swap.transfers == 3 * (5 + 5) + 5


def test_fp8_scaled_model():
    model, adapters = tiny_model(fp8=True)
    model.enable_gradient_checkpointing()
    ref_out, ref_grads = train_step(model, adapters)
    swap = enable_block_swap(model, 6, "cpu", park="meta")
    out, grads = train_step(model, adapters)
    assert torch.equal(out, ref_out)
    assert_same(grads, ref_grads)
    assert swap.transfers == 12
    swap.remove()
    model.disable_gradient_checkpointing()
    swap = enable_block_swap(model, 6, "cpu", park="meta")
    out, grads = train_step(model, adapters)
    assert_same(grads, ref_grads)


def test_remove_restores_a_plain_model():
    model, adapters = tiny_model()
    before = {id(t): t.detach().clone() for i in range(3) for t in block_tensors(model, i)}
    hooks = [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in model.blocks]
    ref_out, ref_grads = train_step(model, adapters)
    swap = enable_block_swap(model, 3, "cpu", park="meta")
    train_step(model, adapters)
    transfers = swap.transfers
    swap.remove()
    assert not hasattr(model, "_block_swap")
    assert [(len(b._forward_pre_hooks), len(b._forward_hooks)) for b in model.blocks] == hooks
    assert len(model._forward_pre_hooks) == 0
    for t in swap.swapped_tensors():  # the same objects hold their data again
        assert torch.equal(t, before[id(t)])
    out, grads = train_step(model, adapters)
    assert torch.equal(out, ref_out)
    assert_same(grads, ref_grads)
    assert swap.transfers == transfers  # no hook left behind
    # A graph built with the swap and backwarded after remove() still works (its hooks stand down).
    swap = enable_block_swap(model, 3, "cpu", park="meta")
    loss = forward(model).float().square().mean()
    swap.remove()
    loss.backward()
    assert_same({n: p.grad for n, p in adapters.named_parameters()}, ref_grads)
