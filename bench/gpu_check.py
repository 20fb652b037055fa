"""One short check for a lent GPU (H100/H200), as ONE script in under 8 minutes, printing figures.

1. One A14B-shaped Wan block (dim 5120, 40 heads, ffn 13824, random bf16 weights, 32,760 tokens =
   81 frames at 480x832, 512 text tokens) forward + backward with gradient checkpointing: the plain
   block, with the stage-1 LoRA (q r8, k/v/o r4, ffn.0 r4) and with LoRA-MoE (4 experts, top-2,
   timestep gates): time, ratio to the plain block (target: LoRA-MoE <= 1.03x), peak memory,
   tokens/s, and the bytes each saves for backward without checkpointing.
2. The fused bf16 layer on the GPU against a float64 reference (relative error).
3. Host -> device bandwidth of the block's weights from pinned and from pageable memory, the
   implied time of one A14B expert swap (28.6 GB bf16, 14.6 GB fp8), and the `auto` placement
   decision here for bf16 and fp8 experts.
4. A14B experts at full depth (40 blocks; built on the meta device and filled on the GPU with
   random weights, never on the host), input 81x480x832 (latent 16x21x60x104, 32,760 tokens,
   512 text tokens), one stage-1 step (`Stage1Module`: LoRA) and one stage-2 step
   (`Stage2Module`: LoRA-MoE, router, gates), each with gradient checkpointing, bf16 autocast,
   AdamW and gradient clipping as the training loop does, for: bf16, fp8, fp8_scaled, fp8 +
   `--blocks_to_swap` 10/20/30, and both fp8 experts resident (the step runs on the high-noise
   one); eager, then compiled (`moe.dit.compile.compile_blocks`, when it exists; stage 1 only
   unless `--compile-stage2`) for bf16, fp8_scaled and fp8_scaled + swap 20, as time allows.
   Per row and stage: s/step (one step, after a warm-up step of a 1-block model), model FLOP
   utilisation (the FLOP count is printed; dense bf16 peak 989 TFLOP/s for an H100 SXM), peak
   device memory
   (`torch.cuda.max_memory_allocated`, weights included), compile time (first compiled step
   minus the next one). An out-of-memory row prints OOM and the script goes on; rows that would
   not fit in the time budget (`--budget-s`) print "skipped".
5. If time is left: a tiny two-expert stage-1 run on the GPU with `--offload_inactive_dit always`
   (pinned-memory swaps, bf16 autocast by default) and `never`: swap counts and finite losses.

    python bench/gpu_check.py [--repeats 3] [--budget-s 400] [--skip-train] [--no-compile] [--compile-stage2]
    python bench/gpu_check.py --cpu    # the same code at a toy size on the CPU (8 blocks, dim 256;
                                       # about 1 min; one compiled row, aot_eager backend)
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moe.config.instruments import INSTRUMENT_CLASSES
from moe.config.presets import get_preset
from moe.dit.dual_dit import GiB, should_offload
from moe.lora.inject import build_adapters, inject_lora
from moe.lora_moe.gates import TimestepGate
from moe.lora_moe.layer import LoRAMoEAdapter, LoRAMoELinear
from moe.lora_moe.model import inject_lora_moe
from moe.lora_moe.router import top_k_gates
from moe.lora_moe.routing import RoutingState
from moe.runtime.profiling import saved_activation_bytes
from moe.wan.checkpoint import cast_keeping_fp32_modules

A14B_EXPERT_BYTES = 28.6e9
STAGE1_TARGETS = {"blocks.0.self_attn.q": 8, "blocks.0.self_attn.k": 4, "blocks.0.self_attn.v": 4, "blocks.0.self_attn.o": 4, "blocks.0.ffn.0": 4}


def one_block_model(device, heads: int = 40):
    """A 1-block WanTransformer3DModel with the A14B dims (fewer heads, and a proportional ffn, for
    a smoke run), random bf16 weights, built on the device."""
    from diffusers import WanTransformer3DModel

    kwargs = get_preset("t2v-A14B").dit.diffusers_kwargs() | {"num_layers": 1}
    if heads != 40:
        kwargs |= {"num_attention_heads": heads, "ffn_dim": 13824 * heads // 40}
    with torch.device(device):
        model = WanTransformer3DModel(**kwargs)
    cast_keeping_fp32_modules(model, torch.bfloat16)  # as training loads a bf16 checkpoint
    return model.requires_grad_(False).eval()


def block_inputs(model, tokens: int, device):
    """The block's own inputs (hidden states, text, timestep projection, rotary embedding),
    captured from one forward of the embedding layers."""
    t, h, w = 21, 60, 104  # 81 frames at 480x832 -> 21 x 30 x 52 = 32,760 tokens after 1x2x2 patches
    if tokens != 32760:
        t, h, w = 1, 20, 2 * -(-tokens // 10)  # one latent frame of 10 x (tokens / 10) patches
    captured = {}

    class Captured(Exception):
        pass

    def grab(module, args):
        captured["args"] = args
        raise Captured

    handle = model.blocks[0].register_forward_pre_hook(grab)
    latents = torch.randn(1, 16, t, h, w, device=device, dtype=torch.bfloat16)
    text = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    try:
        with torch.no_grad():
            model(hidden_states=latents, timestep=torch.tensor([500.0], device=device), encoder_hidden_states=text)
    except Captured:
        pass
    handle.remove()
    hidden, text_states, temb, rope = captured["args"]
    return hidden.detach(), text_states.detach(), temb.detach(), rope


def variants(device, heads: int):
    plain = one_block_model(device, heads)
    lora = one_block_model(device, heads)
    adapters = build_adapters(lora, STAGE1_TARGETS, 1.0).to(device)
    for a in adapters.values():
        torch.nn.init.normal_(a.lora_up, std=1e-3)
    inject_lora(lora, adapters)
    moe = one_block_model(device, heads)
    state = RoutingState()
    moe_adapters = inject_lora_moe(moe, STAGE1_TARGETS, 1.0, INSTRUMENT_CLASSES, state).to(device)
    for a in moe_adapters.values():
        torch.nn.init.normal_(a.lora_up, std=1e-3)
    sigma = torch.tensor([0.5], device=device)
    gate = TimestepGate(len(INSTRUMENT_CLASSES)).to(device)
    state.set(top_k_gates(torch.tensor([[0.5, 0.3, 0.15, 0.05]], device=device), 2), sigma, gate(sigma).detach())
    return {"plain": plain, "stage1 LoRA": lora, "LoRA-MoE": moe}


def block_step(model, inputs, checkpoint: bool = True) -> None:
    from torch.utils.checkpoint import checkpoint as ckpt

    hidden, text, temb, rope = inputs
    x = hidden.clone().requires_grad_(True)  # a block behind an adapted one: gradients flow through
    block = model.blocks[0]
    out = ckpt(block, x, text, temb, rope, use_reentrant=False) if checkpoint else block(x, text, temb, rope)
    out.float().square().mean().backward()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def block_rows(device, repeats: int, tokens: int, heads: int) -> None:
    cuda = device.type == "cuda"
    models = variants(device, heads)
    inputs = block_inputs(models["plain"], tokens, device)
    n = inputs[0].shape[1]
    where = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"\n1. one A14B-shaped block ({heads} heads), {n} tokens, bf16, gradient checkpointing, {where}")
    times: dict[str, list[float]] = {k: [] for k in models}
    peaks = {}
    for name, model in models.items():  # warm-up and peak memory
        _sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if cuda else 0
        block_step(model, inputs)
        _sync(device)
        peaks[name] = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
    for _ in range(repeats):  # interleaved
        for name, model in models.items():
            _sync(device)
            t0 = time.perf_counter()
            block_step(model, inputs)
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in models:
        print(
            f"   {name:12s} {med[name] * 1e3:8.1f} ms  {med[name] / med['plain']:.3f}x plain  "
            f"peak +{peaks[name] / 2**30:6.2f} GiB  {n / med[name]:,.0f} tokens/s"
        )
    print(
        f"   LoRA-MoE / plain {med['LoRA-MoE'] / med['plain']:.3f}x (target <= 1.03); stage-1 LoRA / plain {med['stage1 LoRA'] / med['plain']:.3f}x"
    )
    saved = {}
    for name, model in models.items():
        params = list(model.parameters())
        hidden, text, temb, rope = inputs
        x = hidden.clone().requires_grad_(True)
        saved[name], out = saved_activation_bytes(lambda m=model, x=x: m.blocks[0](x, text, temb, rope), params)
        del out
        if cuda:
            torch.cuda.empty_cache()
    print(
        "   saved for backward without checkpointing (parameters excluded): "
        + ", ".join(f"{k} {v / 2**30:.2f} GiB ({v / saved['plain']:.3f}x)" for k, v in saved.items())
    )
    del models, inputs
    if cuda:
        torch.cuda.empty_cache()


def numerics_row(device, width: int = 5120, tokens: int = 4096) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(width, width, device=device).to(torch.bfloat16).requires_grad_(False)
    adapter = LoRAMoEAdapter(width, width, 8, 1.0, 4).to(device)
    torch.nn.init.normal_(adapter.lora_up, std=0.02)
    state = RoutingState()
    state.set(torch.tensor([[0.5019, 0.4981, 0.0, 0.0]], device=device))
    layer = LoRAMoELinear(base, adapter, state)
    x = torch.randn(1, tokens, width, device=device).to(torch.bfloat16).requires_grad_(True)
    y = layer(x)
    y.float().sum().backward()
    y = y.detach().double()
    x64, a64, b64 = x.detach().double(), adapter.lora_down.detach().double(), adapter.lora_up.detach().double()
    s = (state.mix.double() * adapter.scale).repeat_interleave(8, -1)
    update_ref = ((x64 @ a64.T) * s[:, None, :]) @ b64.T
    base_ref = x64 @ base.weight.double().T + base.bias.double()
    rel = float((y - base_ref - update_ref).norm() / (base_ref + update_ref).norm())
    base_rel = float((base(x.detach()).double() - base_ref).norm() / base_ref.norm())
    with torch.no_grad():  # the update alone (zero base): its scale shows whether the gates were rounded
        base.weight.zero_()
        base.bias.zero_()
        update = layer(x.detach()).double()
    ratio = float((update * update_ref).sum() / update_ref.square().sum())
    print(
        f"\n2. fused bf16 layer [{width}, {width}], {tokens} tokens, on {device.type} vs float64: relative error {rel:.2e} (bf16 base alone {base_rel:.2e}); "
        f"update scale ratio {ratio:.5f} (1 = the fp32 gate mix is kept)"
    )


def bandwidth_row() -> None:
    device = torch.device("cuda")
    weights = [p.detach().cpu() for p in one_block_model("cpu").parameters()]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    rows = {}
    for kind, host in (("pinned", [w.pin_memory() for w in weights]), ("pageable", weights)):
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            moved = [w.to(device, non_blocking=True) for w in host]
            torch.cuda.synchronize()
            rows[kind] = nbytes / (time.perf_counter() - t0)
            del moved
    free, total = torch.cuda.mem_get_info()
    a14b = get_preset("t2v-A14B")
    fp8_bytes = layout_bytes(a14b.dit, "fp8_scaled")
    print(
        f"\n3. host -> device, one block's weights ({nbytes / 1e9:.2f} GB): pinned {rows['pinned'] / 1e9:.1f} GB/s, "
        f"pageable {rows['pageable'] / 1e9:.1f} GB/s; one A14B expert swap from pinned memory: bf16 (28.6 GB) "
        f"~{A14B_EXPERT_BYTES / rows['pinned']:.1f} s, fp8 ({fp8_bytes / 1e9:.1f} GB) ~{fp8_bytes / rows['pinned']:.1f} s; "
        f"one fp8 block (0.35 GB, what --blocks_to_swap moves per block) ~{0.351e9 / rows['pinned'] * 1e3:.0f} ms"
    )
    for name, need in (("bf16", int(2 * A14B_EXPERT_BYTES)), ("fp8_scaled", 2 * fp8_bytes)):
        offload = should_offload("auto", device, need, free, 32 * GiB)
        print(
            f"   free {free / GiB:.1f} of {total / GiB:.1f} GiB: --offload_inactive_dit auto with {name} experts would "
            f"{'offload' if offload else 'keep both A14B experts resident'} ({need / 1e9:.1f} GB + 32 GiB headroom)"
        )


# ---------------------------------------------------------------------------------------------
# 4. A14B experts at full depth: stage-1 and stage-2 steps per memory option.

H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s of an H100 SXM (H200: the same)
A14B_LATENT = (21, 60, 104)  # 81 frames at 480x832: 21 latent frames of 60 x 104 -> 32,760 tokens
TEXT_TOKENS = 512


def toy_preset():
    """t2v-A14B's layout (head dim 128, text 4096) at a toy size for the CPU run: 8 blocks (the
    stage-1 targets' attention blocks are the last 8), 2 heads (dim 256), ffn 512."""
    from moe.config.presets import PRESETS

    base = PRESETS["t2v-A14B"]
    preset = base.model_copy(
        update={"task": "t2v-A14B-toy", "dit": base.dit.model_copy(update={"num_layers": 8, "num_attention_heads": 2, "ffn_dim": 512})}
    )
    PRESETS[preset.task] = preset
    return preset


def layout_bytes(dit, fp8: str) -> int:
    """Bytes of one expert as loaded in bf16 (fp32 modules kept) with the block Linears in `fp8`,
    from a meta-device model (bench/fp8_bench.py part a)."""
    from diffusers import WanTransformer3DModel

    from moe.wan.fp8 import convert_to_fp8

    with torch.device("meta"):
        model = WanTransformer3DModel(**dit.diffusers_kwargs())
    cast_keeping_fp32_modules(model, torch.bfloat16)
    if fp8 != "none":
        convert_to_fp8(model, fp8 == "fp8_scaled", torch.bfloat16)
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def block_forward_flops(dit, tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one block's forward (2 per multiply-add): self-attention q/k/v/o and
    cross-attention q/o on the video tokens, cross-attention k/v on the text tokens, the FFN, and
    the two attentions (QK^T and PV: 4 N M d). Norms, modulation and elementwise work left out."""
    d, f = dit.dim, dit.ffn_dim
    linear = 2 * tokens * (6 * d * d + 2 * d * f) + 2 * text_tokens * 2 * d * d
    attention = 4 * tokens * tokens * d + 4 * tokens * text_tokens * d
    return float(linear + attention)


def adapted_blocks(num_layers: int) -> list[int]:
    from moe.config.targets import TargetSpec

    return sorted({int(m.split(".")[1]) for m in TargetSpec.from_flags().resolve(num_layers)})


def build_expert(dit, device, fp8: str, seed: int):
    """A WanTransformer3DModel with random weights, built on the meta device and filled where it
    lives: the layout `load_transformer(dtype=bf16, fp8=...)` gives (fp32 modules kept, block
    Linear weights in fp8 with their row scales), without a checkpoint or a host copy."""
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from moe.wan.fp8 import Fp8Linear, convert_to_fp8, quantize_weight

    with torch.device("meta"):
        model = WanTransformer3DModel(**dit.diffusers_kwargs())
    cast_keeping_fp32_modules(model, torch.bfloat16)
    if fp8 != "none":
        convert_to_fp8(model, fp8 == "fp8_scaled", torch.bfloat16)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Fp8Linear):
                w = torch.empty(module.out_features, module.in_features, device=device, dtype=torch.bfloat16)
                module.set_weight(*quantize_weight(w.normal_(0.0, 0.02, generator=g), fp8 == "fp8_scaled"))
        fp8_weights = {id(m.weight) for m in model.modules() if isinstance(m, Fp8Linear)}
        for name, p in model.named_parameters():
            if id(p) in fp8_weights:
                continue
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)
    fresh = WanRotaryPosEmbed(dit.attention_head_dim, dit.patch_size, dit.rope_max_seq_len)
    for name, buf in fresh.named_buffers():  # to_empty left them uninitialised
        model.rope.register_buffer(name, buf.to(device), persistent=False)
    return model.requires_grad_(False).eval()


def strip_adapters(model) -> None:
    """Put the frozen Linear back where an adapter layer wraps it (stage 2 after stage 1)."""
    from moe.lora.layer import AdaptedLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, AdaptedLinear):
            model.set_submodule(name, module.base)


def expert_batch(dit, latent: tuple[int, int, int], text_tokens: int, device):
    g = torch.Generator(device=device).manual_seed(0)
    t, h, w = latent
    return {
        "latents": torch.randn(1, dit.in_channels, t, h, w, device=device, generator=g),
        "text_embeds": 0.1 * torch.randn(1, text_tokens, dit.text_dim, device=device, generator=g),
        "text_mask": torch.ones(1, text_tokens, dtype=torch.long, device=device),
        "roi": (torch.rand(1, t, h, w, device=device, generator=g) > 0.8).float(),
        "labels": torch.tensor([[1.0, 0.0, 0.0, 0.0]], device=device),
    }


def train_step(module, batch, sigma: float, expert: str, device) -> float:
    """One optimizer step as `moe.train.loop` takes it (bf16 autocast on a GPU, AdamW, clipping)."""
    from moe.train.loop import build_optimizer

    optimizer, _ = build_optimizer(module.cfg, module)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    sig = torch.full((1,), sigma, device=device)
    noise = torch.randn_like(batch["latents"])
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        loss = module(batch, sig, noise, expert)["loss"]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, module.cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


class ExpertRows:
    """The rows of part 4, sharing one preset, input and time budget."""

    def __init__(self, device, preset, latent, text_tokens: int, budget_s: float, started: float, cpu_compile_backend=None):
        from moe.config.train import Stage1Config, Stage2Config

        self.device, self.preset, self.dit = device, preset, preset.dit
        self.latent, self.text_tokens = latent, text_tokens
        self.tokens = latent[0] * (latent[1] // 2) * (latent[2] // 2)
        self.budget_s, self.started = budget_s, started
        self.backend = cpu_compile_backend
        self.batch = expert_batch(self.dit, latent, text_tokens, device)
        tmp = Path(tempfile.gettempdir()) / "gpu_check_unused"  # the configs need paths; nothing is read or written
        common = dict(task=preset.task, dit=tmp / "unused", dataset=tmp / "unused", output_dir=tmp, gradient_checkpointing=True, progress=False)
        self.cfg1, self.cfg2 = Stage1Config(**common), Stage2Config(**common)
        layers = self.dit.num_layers
        adapted = adapted_blocks(layers)
        f = block_forward_flops(self.dit, self.tokens, text_tokens)
        # Model FLOPs: forward of every block, plus backward (2x forward) of the adapted blocks
        # and of the blocks between them (blocks 32-39 of 40); the recomputation of gradient
        # checkpointing is not counted. Stage 2 adapts the same blocks (router: negligible).
        first = min(adapted)
        self.flops = f * (layers + 2 * (layers - first))
        self.flop_note = (
            f"one block forward {f / 1e12:.2f} TFLOP at {self.tokens:,} tokens + {text_tokens} text tokens; "
            f"a step = forward of blocks 0-{layers - 1} + backward (2x forward) of blocks {first}-{layers - 1} "
            f"= {layers + 2 * (layers - first)} block forwards = {self.flops / 1e15:.3f} PFLOP "
            "(checkpoint recomputation not counted)"
        )
        self.results: list[tuple] = []
        self.last_row_s = {"eager": 0.0, "compiled": 0.0}

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def warm_up(self) -> None:
        """A stage-1 step of a 1-block model first (CUDA context, cuBLAS/cuDNN handles, attention
        kernels at this token count, AdamW), so the first row does not pay for them."""
        from moe.config.presets import PRESETS
        from moe.config.train import Stage1Config
        from moe.dit.dual_dit import DualDiT
        from moe.train.stage1 import Stage1Module

        one = self.preset.model_copy(update={"task": f"{self.preset.task}-1-block", "dit": self.dit.model_copy(update={"num_layers": 1})})
        PRESETS[one.task] = one
        model = build_expert(one.dit, self.device, "none", seed=0)
        dits = DualDiT(model, None, None, self.device)
        dits.enable_gradient_checkpointing()
        module = Stage1Module(Stage1Config(**(self.cfg1.model_dump() | {"task": one.task})), dits).to(self.device)
        for _ in range(2):
            train_step(module, self.batch, 0.5, "low", self.device)
        _sync(self.device)
        del module, dits, model
        gc.collect()

    def run(
        self, name: str, fp8: str, swap: int = 0, both: bool = False, compiled: bool = False, stages: tuple[str, ...] = ("stage 1", "stage 2")
    ) -> None:
        kind = "compiled" if compiled else "eager"
        need = self.last_row_s[kind] * 1.3 if self.last_row_s[kind] else (150.0 if compiled else 60.0)
        if self.device.type == "cuda" and self.elapsed() + need > self.budget_s:
            self.results.append((name, kind, "skipped (time budget)"))
            print(f"   {name} ({kind}): skipped, {self.elapsed():.0f} s used of the {self.budget_s:.0f} s budget")
            return
        t_row = time.monotonic()
        cuda = self.device.type == "cuda"
        dits = models = None
        try:
            from moe.config.instruments import INSTRUMENT_CLASSES
            from moe.dit.block_swap import enable_block_swap
            from moe.dit.dual_dit import DualDiT
            from moe.dit.expert import resident_bytes
            from moe.train.stage1 import Stage1Module
            from moe.train.stage2 import Stage2Module

            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.monotonic()
            models = [build_expert(self.dit, self.device, fp8, seed=s) for s in ((0, 1) if both else (0,))]
            if swap:
                for m in models:
                    m.block_swap = enable_block_swap(m, swap, self.device)
            dits = DualDiT(models[0], models[1] if both else None, self.preset.boundary if both else None, self.device)
            dits.enable_gradient_checkpointing()
            resident = sum(resident_bytes(m) for m in models)
            build_s = time.monotonic() - t0
            if compiled:
                from moe.dit.compile import compile_blocks

                for m in models:
                    compile_blocks(m, backend=self.backend)
            expert, sigma = ("high", 0.95) if both else ("low", 0.5)
            for stage in stages:
                if stage == "stage 1":
                    module = Stage1Module(self.cfg1, dits).to(self.device)
                else:
                    for m in models:
                        strip_adapters(m)
                    module = Stage2Module(self.cfg2, dits, {}, INSTRUMENT_CLASSES).to(self.device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                copies_before = sum(m.block_swap.transfers for m in models if getattr(m, "block_swap", None) is not None)
                times, losses = [], []
                for _ in range(2 if compiled else 1):  # compiled: the first step compiles
                    _sync(self.device)
                    t0 = time.monotonic()
                    losses.append(train_step(module, self.batch, sigma, expert, self.device))
                    _sync(self.device)
                    times.append(time.monotonic() - t0)
                step = times[-1]
                peak = torch.cuda.max_memory_allocated() if cuda else None
                compile_s = times[0] - times[1] if compiled else None
                transfers = sum(m.block_swap.transfers for m in models if getattr(m, "block_swap", None) is not None) - copies_before
                self.results.append(
                    (
                        name,
                        kind,
                        stage,
                        step,
                        self.flops / step / H100_BF16_PEAK,
                        peak,
                        compile_s,
                        resident,
                        transfers,
                        all(map(lambda v: v == v and abs(v) != float("inf"), losses)),
                    )
                )
                print(
                    f"   {name:22s} {kind:8s} {stage}: {step:7.2f} s/step  MFU {self.flops / step / H100_BF16_PEAK:6.1%}  "
                    f"peak {'-' if peak is None else f'{peak / GiB:6.2f} GiB'}  resident {resident / GiB:.2f} GiB"
                    + (f"  compile {compile_s:.0f} s" if compiled else "")
                    + (f"  block copies {transfers}" if swap else "")
                    + f"  loss {losses[-1]:.4f}  (built in {build_s:.1f} s)"
                )
                del module
                gc.collect()
        except torch.OutOfMemoryError as e:
            self.results.append((name, kind, "OOM"))
            print(f"   {name} ({kind}): OOM ({str(e).splitlines()[0][:160]})")
        except Exception as e:  # a row that fails is reported, the others still run
            self.results.append((name, kind, f"error: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
            print(f"   {name} ({kind}): {type(e).__name__}: {e}")
        finally:
            for m in models or []:
                swap_obj = getattr(m, "block_swap", None)
                if swap_obj is not None:
                    swap_obj.remove()
            del dits, models
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
            self.last_row_s[kind] = time.monotonic() - t_row

    def table(self, device_name: str) -> None:
        print(
            f"\n4. A14B expert steps on {device_name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
            f"{self.dit.num_layers} blocks, dim {self.dit.dim}, {self.tokens:,} tokens; MFU against 989 TFLOP/s (dense bf16, H100 SXM)"
        )
        print(f"   FLOP count: {self.flop_note}")
        head = ("option", "mode", "stage", "s/step", "MFU", "peak GiB", "resident GiB", "compile s", "block copies", "finite")
        rows = []
        for r in self.results:
            if len(r) == 3:
                rows.append((r[0], r[1], r[2], "", "", "", "", "", "", ""))
                continue
            name, kind, stage, step, mfu, peak, compile_s, resident, transfers, finite = r
            rows.append(
                (
                    name,
                    kind,
                    stage,
                    f"{step:.2f}",
                    f"{mfu:.1%}",
                    "-" if peak is None else f"{peak / GiB:.2f}",
                    f"{resident / GiB:.2f}",
                    "" if compile_s is None else f"{compile_s:.0f}",
                    str(transfers) if transfers else "",
                    "yes" if finite else "NO",
                )
            )
        widths = [max(len(str(x[i])) for x in rows + [head]) for i in range(len(head))]
        for r in [head] + rows:
            print("   " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def expert_rows(device, args, started: float) -> None:
    cuda = device.type == "cuda"
    preset = get_preset("t2v-A14B") if cuda else toy_preset()
    latent = A14B_LATENT if cuda else (1, 4, 8)
    text_tokens = TEXT_TOKENS if cuda else 16
    rows = ExpertRows(device, preset, latent, text_tokens, args.budget_s, started, cpu_compile_backend=None if cuda else "aot_eager")
    print(
        f"\n4. A14B experts at full depth ({preset.dit.num_layers} blocks, dim {preset.dit.dim}), "
        f"{rows.tokens:,} tokens: one stage-1 and one stage-2 step per option (table at the end)"
    )
    print(f"   FLOP count: {rows.flop_note}")
    rows.warm_up()
    swaps = [n * preset.dit.num_layers // 40 for n in (10, 20, 30)]  # 10/20/30 of 40 (2/4/6 of the toy's 8)
    options = [
        ("bf16", "none", 0, False),
        ("fp8", "fp8", 0, False),
        ("fp8_scaled", "fp8_scaled", 0, False),
        *[(f"fp8 + swap {n}", "fp8", n, False) for n in swaps],
        ("2 fp8 experts resident", "fp8", 0, True),
    ]
    for name, fp8, swap, both in options:
        rows.run(name, fp8, swap, both)
    try:
        import moe.dit.compile  # noqa: F401

        have_compile = True
    except ImportError:
        have_compile = False
    if args.no_compile or not have_compile:
        print(f"   compiled rows: not run ({'--no-compile' if args.no_compile else 'moe.dit.compile does not exist'})")
    else:
        compiled = [("bf16", "none", 0), ("fp8_scaled", "fp8_scaled", 0), (f"fp8_scaled + swap {swaps[1]}", "fp8_scaled", swaps[1])]
        # Stage 1 only unless asked: a compiled row compiles a graph per block variant (no
        # adapter, first adapted block, the rest; forward and backward), minutes on a GPU host.
        stages = ("stage 1", "stage 2") if args.compile_stage2 else ("stage 1",)
        for name, fp8, swap in compiled if cuda else compiled[:1]:  # the CPU run: one row, the code path
            rows.run(name, fp8, swap, compiled=True, stages=stages)
    rows.table(torch.cuda.get_device_name() if cuda else "CPU (toy size: 8 blocks, dim 256, ffn 512; compiled with aot_eager)")


def training_row() -> None:
    from moe.config.train import Stage1Config
    from moe.data.cache import build_cache
    from moe.tiny.model_set import write_tiny_model_set
    from moe.tiny.synth import synthesize_dataset
    from moe.train.stage1 import train_stage1

    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    models = write_tiny_model_set(root / "models", "tiny-t2v", seed=0)
    manifest = synthesize_dataset(root / "data", clips=12, frames=17, size=(64, 64), seed=0)
    build_cache(manifest, root / "cache", "tiny-t2v", model_set=root / "models", size=(64, 64), frames=17, progress=False)
    print("\n5. tiny two-expert stage 1 on the GPU (bf16 by default), accumulation 4:")
    for policy in ("always", "never"):
        cfg = Stage1Config(
            dit=models.low_noise,
            dit_high_noise=models.high_noise,
            dataset=root / "cache",
            output_dir=root / policy,
            max_train_epochs=2,
            gradient_accumulation_steps=4,
            learning_rate=1e-2,
            offload_inactive_dit=policy,
            progress=False,
        )
        m = train_stage1(cfg)
        print(
            f"   {policy:6s}: {m['train_steps']} steps, {m['dit_swaps_this_run']} swaps, offload {m['dit_offload']}, "
            f"held-out loss {m['val_loss_base']:.3f} -> {m['val_loss_final']:.3f}, {m['train_seconds_this_run']} s"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--skip-train", action="store_true", help="skip part 5 (the tiny training run)")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled rows of part 4")
    ap.add_argument("--skip-block", action="store_true", help="skip parts 1-3")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=400.0,
        help="part 4 starts no row expected to end after this many seconds (GPU; the script then ends within ~8 min)",
    )
    ap.add_argument("--compile-stage2", action="store_true", help="compiled rows: also a stage-2 step (more compile time)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--heads", type=int, default=40, help="fewer heads (and a proportional ffn) for a smoke run")
    ap.add_argument("--cpu", action="store_true", help="the same code at a toy size on the CPU (< 1 min)")
    args = ap.parse_args()
    if args.cpu:
        args.device, args.heads, args.tokens, args.repeats, args.skip_train = "cpu", 2, 120, 1, True
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; this check runs on a lent GPU (or pass --cpu for a smoke run)")
    started = time.monotonic()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"gpu_check on {name}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}")
    if not args.skip_block:
        numerics_row(device, *((5120, 4096) if device.type == "cuda" else (512, 256)))  # bf16 matmuls crawl on a small CPU
        block_rows(device, args.repeats, args.tokens, args.heads)
        if device.type == "cuda":
            bandwidth_row()
    expert_rows(device, args, started)
    if device.type == "cuda" and not args.skip_train:
        if time.monotonic() - started < args.budget_s - 60:
            training_row()
        else:
            print("\n5. tiny training run: skipped (time budget)")
    print(f"\ndone in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
