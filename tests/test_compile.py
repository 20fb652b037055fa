"""`--compile` (`moe.dit.compile`: regional torch.compile, one block's forward at a time) and
`--attention_backend` (`moe.wan.attention`), on the CPU.

Most checks compile with the `aot_eager` backend: dynamo traces each block and AOTAutograd
builds its joint forward/backward graph exactly as in production, without inductor's C++ code
generation (minutes on a small CPU); one test runs the real default backend (inductor) on one
block. Tolerances (fp32): aot_eager vs eager rtol 1e-5 / atol 1e-6 (seen: bit-identical, or
2e-7 relative on the LoRA-MoE gate gradient); inductor vs eager rtol 1e-4 / atol 1e-5 (seen:
6e-7 on outputs of magnitude ~1, 6e-10 on adapter gradients).

"No graph break per layer": dynamo counts every graph break (`counters["graph_break"]`) and every
compiled graph (`counters["stats"]["unique_graphs"]`). A model with 8 compiled blocks and 32
adapter layers must add no graph break, and only one graph per block variant (the blocks below
the first adapter, whose input needs no gradient, and the others): an adapter layer's autograd
Function (and fp8 dequantisation) that broke the graph would add graphs per layer.
"""

from __future__ import annotations

from typing import get_args

import pytest
import torch
from torch._dynamo.utils import counters

import moe.dit.compile as compile_mod
from moe.config.presets import get_preset
from moe.config.runtime_options import AttentionBackend, CompileMode
from moe.dit.block_swap import enable_block_swap
from moe.dit.compile import COMPILE_MODES, compile_blocks, is_compiled, uncompile_blocks
from moe.errors import MoeError
from moe.lora.inject import build_adapters, inject_lora
from moe.lora_moe.model import inject_lora_moe
from moe.lora_moe.routing import RoutingState
from moe.wan.attention import BACKENDS, attention_backend_of, check_attention_backend, set_attention_backend
from moe.wan.checkpoint import build_random_transformer
from moe.wan.fp8 import convert_to_fp8

SUBMODULES = ("self_attn.q", "self_attn.v", "cross_attn.k", "ffn.0")
EXACT = dict(rtol=1e-5, atol=1e-6)  # aot_eager: the same ops as eager
INDUCTOR = dict(rtol=1e-4, atol=1e-5)  # inductor fuses and reorders fp32 arithmetic


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only contend
    yield
    torch.set_num_threads(threads)


def tiny(adapters: str = "lora", fp8: bool = False, blocks=(4, 5, 6, 7)):
    """A frozen random tiny-t2v DiT (8 blocks) with LoRA or LoRA-MoE layers (non-zero) on
    SUBMODULES of `blocks`: (model, trainable adapters, routing state or None)."""
    model = build_random_transformer(get_preset("tiny-t2v"), seed=0).requires_grad_(False)
    if fp8:
        convert_to_fp8(model, scaled=True)
    torch.manual_seed(1)
    modules = {f"blocks.{b}.{s}": 4 for b in blocks for s in SUBMODULES}
    state = None
    if adapters == "lora":
        trainable = build_adapters(model, modules, alpha=1.0)
        inject_lora(model, trainable)
    else:
        state = RoutingState()
        trainable = inject_lora_moe(model, modules, 1.0, ("a", "b", "c"), state)
    with torch.no_grad():
        for p in trainable.parameters():
            p.normal_(0.0, 0.1)
    return model, trainable, state


def step(model, trainable, state=None, seed: int = 0):
    """(output, gradients of the adapters and, for LoRA-MoE, of the gates) of one forward and
    backward; gradients are reset."""
    g = torch.Generator().manual_seed(seed)
    x = dict(
        hidden_states=torch.randn(1, 16, 2, 4, 4, generator=g),
        timestep=torch.tensor([700.0]),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
    )
    gates = None
    if state is not None:
        gates = torch.tensor([[0.2, 0.5, 0.3]], requires_grad=True)
        state.set(gates, None, torch.tensor([[1.0, 0.7, 0.4]]))
    out = model(**x, return_dict=False)[0]
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in trainable.named_parameters()}
    if gates is not None:
        grads["gates"] = gates.grad
    for p in trainable.parameters():
        p.grad = None
    return out.detach(), grads


def assert_close(a, b, tol):
    out_a, grads_a = a
    out_b, grads_b = b
    torch.testing.assert_close(out_a, out_b, **tol)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], **tol, msg=lambda m, k=k: f"{k}: {m}")


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def breaks() -> int:
    return sum(counters["graph_break"].values())


def test_compiles_every_block_lazily_and_can_be_undone():
    model, trainable, _ = tiny()
    assert compile_blocks(model, backend="aot_eager", dynamic=False) == 8
    assert compile_blocks(model, backend="aot_eager") == 0  # already compiled
    assert all(is_compiled(b) for b in model.blocks)
    assert uncompile_blocks(model) == 8 and not any(is_compiled(b) for b in model.blocks)
    assert compile_blocks(model, backend="aot_eager", only=[6, 7]) == 2
    with pytest.raises(ValueError, match="compile mode"):
        compile_blocks(model, "reduce-overhead")


@pytest.mark.parametrize("kind", ["lora", "lora_moe"])
def test_compiled_matches_eager_without_graph_breaks(kind):
    """8 compiled blocks, 16 adapter layers (LoRA, or LoRA-MoE with the gates' gradient), with
    and without gradient checkpointing: the eager result, no graph break, and one graph per
    block variant (blocks 0-3: no adapter, input needs no gradient; block 4: the first adapted
    one; blocks 5-7), the checkpoint recomputation reusing them."""
    torch._dynamo.reset()  # trace afresh: graphs cached by an earlier test would hide breaks
    counters.clear()
    model, trainable, state = tiny(kind)
    eager = step(model, trainable, state)
    model.enable_gradient_checkpointing()
    eager_ckpt = step(model, trainable, state)
    model.disable_gradient_checkpointing()

    assert compile_blocks(model, backend="aot_eager", dynamic=False) == 8
    assert_close(step(model, trainable, state), eager, EXACT)
    model.enable_gradient_checkpointing()
    assert_close(step(model, trainable, state), eager_ckpt, EXACT)
    assert breaks() == 0, dict(counters["graph_break"])
    assert graphs() == 3, "more graphs than block variants: something broke a block's graph"


def test_injection_after_compile_is_traced():
    """`compile_blocks` on a bare model, then `inject_lora`: the compiled blocks run the LoRA."""
    model = build_random_transformer(get_preset("tiny-t2v"), seed=0).requires_grad_(False)
    compile_blocks(model, backend="aot_eager", dynamic=False)
    torch.manual_seed(1)
    adapters = build_adapters(model, {f"blocks.7.{s}": 4 for s in SUBMODULES}, alpha=1.0)
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0.0, 0.1)
    inject_lora(model, adapters)
    out, grads = step(model, adapters)
    uncompile_blocks(model)
    ref_out, ref_grads = step(model, adapters)
    assert_close((out, grads), (ref_out, ref_grads), EXACT)
    assert all(g.abs().sum() > 0 for g in grads.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fp8_and_strict_block_swap(checkpointing):
    """fp8 weights (dequantised inside the adapter's autograd Function) and a strict block swap
    (`park="meta"`: a parked block used before its fetch fails) around compiled blocks."""
    model, trainable, _ = tiny(fp8=True, blocks=(1, 6, 7))
    if checkpointing:
        model.enable_gradient_checkpointing()
    eager = step(model, trainable)
    swap = enable_block_swap(model, 2, "cpu", park="meta")
    compile_blocks(model, backend="aot_eager", dynamic=False)
    breaks0 = breaks()
    assert_close(step(model, trainable), eager, EXACT)
    assert_close(step(model, trainable, seed=0), eager, EXACT)  # second call: the cached graphs
    assert breaks() == breaks0
    assert swap.transfers > 0


def test_inductor_matches_eager():
    """The default backend (inductor's C++ code) on the last block: LoRA forward and gradients."""
    model, trainable, _ = tiny(blocks=(7,))
    eager = step(model, trainable)
    assert compile_blocks(model, dynamic=False, only=[7]) == 1
    assert_close(step(model, trainable), eager, INDUCTOR)


def test_stage1_compiled_run_matches_eager(tiny_workspace, tmp_path, monkeypatch):
    """`train_stage1` with compile=True (both experts, validation under no_grad) ends where the
    eager run ends."""
    from safetensors.torch import load_file

    from moe.config.train import Stage1Config
    from moe.train.stage1 import train_stage1

    monkeypatch.setattr(compile_mod, "DEFAULT_BACKEND", "aot_eager")
    calls = []
    real = compile_mod.compile_blocks
    monkeypatch.setattr("moe.dit.expert.compile_blocks", lambda m, mode: calls.append(real(m, mode, dynamic=False)))

    def cfg(out, **kw):
        return Stage1Config(
            task="tiny-t2v",
            dit=tiny_workspace["models"].low_noise,
            dit_high_noise=tiny_workspace["models"].high_noise,
            dataset=tiny_workspace["cache"],
            output_dir=tmp_path / out,
            network_dim=8,
            learning_rate=2e-3,
            max_train_epochs=1,
            progress=False,
            seed=3,
            gradient_checkpointing=True,
            **kw,
        )

    eager = train_stage1(cfg("eager"))
    graphs0 = graphs()
    compiled = train_stage1(cfg("compiled", compile=True))
    assert calls == [8, 8]  # both experts, every block
    assert graphs() > graphs0  # it did run compiled code
    for key in ("val_loss_base", "val_loss_final"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key
    a = load_file(tmp_path / "eager" / "vanilla_lora.safetensors")
    b = load_file(tmp_path / "compiled" / "vanilla_lora.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


# --- attention backends ----------------------------------------------------------------------


def test_backend_names_are_diffusers():
    from diffusers.models.attention_dispatch import AttentionBackendName

    assert set(BACKENDS) == {b.value for b in AttentionBackendName} - {"_native_npu", "_native_xla"}
    assert tuple(BACKENDS) == get_args(AttentionBackend)  # the option's choices
    assert COMPILE_MODES == get_args(CompileMode)


def test_native_by_default_and_native_kernels_agree(tiny_workspace, monkeypatch):
    """`load_expert` points every attention layer at `native` (PyTorch SDPA); the math and
    flash SDPA kernels give the same result on the CPU."""
    from moe.dit.expert import load_expert

    models = tiny_workspace["models"]
    model = load_expert(models.low_noise, get_preset("tiny-t2v"), None, "cpu")
    assert attention_backend_of(model) == "native"
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    native_fn = _AttentionBackendRegistry._backends[AttentionBackendName.NATIVE]
    seen = []
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.NATIVE, lambda **kw: seen.append(1) or native_fn(**kw))
    torch.manual_seed(1)
    adapters = build_adapters(model, {f"blocks.7.{s}": 4 for s in SUBMODULES}, alpha=1.0)
    inject_lora(model, adapters)
    native = step(model, adapters)
    assert len(seen) == 2 * 8  # self- and cross-attention of 8 blocks, one forward
    for name in ("_native_math", "_native_flash"):
        assert set_attention_backend(model, name) == 16
        assert attention_backend_of(model) == name
        assert_close(step(model, adapters), native, EXACT)


def test_backend_refusals(tiny_workspace, tmp_path):
    from moe.config.train import Stage1Config
    from moe.dit.expert import load_expert
    from moe.train.stage1 import train_stage1

    with pytest.raises(MoeError, match=r"^--attention_backend flash needs flash-attn>=2.6.3 \(pip install flash-attn"):
        check_attention_backend("flash", device="cuda")
    with pytest.raises(MoeError, match=r"needs xformers>=0.0.29 \(pip install xformers\)"):
        check_attention_backend("xformers", device="cuda")
    with pytest.raises(MoeError, match=r"needs sageattention>=2.1.1"):
        check_attention_backend("sage", device="cuda")  # generation may use it: only the package is missing
    for name in ("sage", "_flash_3", "sage_hub"):
        with pytest.raises(MoeError, match=rf"^--attention_backend {name} has no backward pass \(inference only\)"):
            check_attention_backend(name, training=True)
    with pytest.raises(MoeError, match="needs a CUDA GPU"):
        check_attention_backend("_native_cudnn", device="cpu")
    # before any model is read: a missing file would fail later
    with pytest.raises(MoeError, match="--attention_backend flash needs a CUDA GPU"):
        load_expert(tmp_path / "missing.safetensors", get_preset("tiny-t2v"), None, "cpu", attention_backend="flash")
    # training refuses before anything is loaded or written
    out = tmp_path / "sage"
    cfg = Stage1Config(
        task="tiny-t2v",
        dit=tiny_workspace["models"].low_noise,
        dit_high_noise=tiny_workspace["models"].high_noise,
        dataset=tiny_workspace["cache"],
        output_dir=out,
        progress=False,
        attention_backend="sage",
    )
    with pytest.raises(MoeError, match="--attention_backend sage has no backward pass"):
        train_stage1(cfg)
    assert not out.exists()
    with pytest.raises(ValueError, match="attention_backend"):
        Stage1Config(**(cfg.model_dump() | {"attention_backend": "nonsense"}))
