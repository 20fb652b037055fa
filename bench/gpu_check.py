"""One short check for a lent GPU (H100/H200; about 2-4 minutes), printing figures.

1. One A14B-shaped Wan block (dim 5120, 40 heads, ffn 13824, random bf16 weights, 32,760 tokens =
   81 frames at 480x832, 512 text tokens) forward + backward with gradient checkpointing: the plain
   block, with the stage-1 LoRA (q r8, k/v/o r4, ffn.0 r4) and with LoRA-MoE (4 experts, top-2,
   timestep gates): time, ratio to the plain block (target: LoRA-MoE <= 1.03x), peak memory,
   tokens/s, and the bytes each saves for backward without checkpointing.
2. The fused bf16 layer on the GPU against a float64 reference (relative error).
3. Host -> device bandwidth of the block's weights from pinned and from pageable memory, the
   implied time of one A14B expert swap (28.6 GB), and the `auto` placement decision here.
4. A tiny two-expert stage-1 run on the GPU with `--offload_inactive_dit always` (pinned-memory
   swaps, bf16 autocast by default) and `never`: swap counts and finite losses.

    python bench/gpu_check.py [--repeats 5] [--tokens 32760] [--skip-train]
    python bench/gpu_check.py --device cpu --heads 2 --tokens 520 --repeats 1   # a smoke run of parts 1-2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moe.lora.inject import build_adapters, inject_lora
from moe.lora_moe.experts import EXPERTS
from moe.lora_moe.gates import TimestepGate
from moe.lora_moe.layer import LoRAMoEAdapter, LoRAMoELinear
from moe.lora_moe.model import inject_lora_moe
from moe.lora_moe.router import top_k_gates
from moe.lora_moe.routing import RoutingState
from moe.profiling import saved_activation_bytes
from moe.train.dual_dit import GiB, should_offload
from moe.wan.checkpoint import cast_keeping_fp32_modules
from moe.wan.presets import get_preset

A14B_EXPERT_BYTES = 28.6e9
STAGE1_TARGETS = {"blocks.0.self_attn.q": 8, "blocks.0.self_attn.k": 4, "blocks.0.self_attn.v": 4,
                  "blocks.0.self_attn.o": 4, "blocks.0.ffn.0": 4}


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
    moe_adapters = inject_lora_moe(moe, STAGE1_TARGETS, 1.0, EXPERTS, state).to(device)
    for a in moe_adapters.values():
        torch.nn.init.normal_(a.lora_up, std=1e-3)
    sigma = torch.tensor([0.5], device=device)
    gate = TimestepGate(len(EXPERTS)).to(device)
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
        print(f"   {name:12s} {med[name] * 1e3:8.1f} ms  {med[name] / med['plain']:.3f}x plain  "
              f"peak +{peaks[name] / 2**30:6.2f} GiB  {n / med[name]:,.0f} tokens/s")
    print(f"   LoRA-MoE / plain {med['LoRA-MoE'] / med['plain']:.3f}x (target <= 1.03); "
          f"stage-1 LoRA / plain {med['stage1 LoRA'] / med['plain']:.3f}x")
    saved = {}
    for name, model in models.items():
        params = list(model.parameters())
        hidden, text, temb, rope = inputs
        x = hidden.clone().requires_grad_(True)
        saved[name], out = saved_activation_bytes(lambda m=model, x=x: m.blocks[0](x, text, temb, rope), params)
        del out
        if cuda:
            torch.cuda.empty_cache()
    print("   saved for backward without checkpointing (parameters excluded): "
          + ", ".join(f"{k} {v / 2**30:.2f} GiB ({v / saved['plain']:.3f}x)" for k, v in saved.items()))
    del models, inputs
    if cuda:
        torch.cuda.empty_cache()


def numerics_row(device) -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(5120, 5120, device=device).to(torch.bfloat16).requires_grad_(False)
    adapter = LoRAMoEAdapter(5120, 5120, 8, 1.0, 4).to(device)
    torch.nn.init.normal_(adapter.lora_up, std=0.02)
    state = RoutingState()
    state.set(torch.tensor([[0.5019, 0.4981, 0.0, 0.0]], device=device))
    layer = LoRAMoELinear(base, adapter, state)
    x = torch.randn(1, 4096, 5120, device=device).to(torch.bfloat16).requires_grad_(True)
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
    print(f"\n2. fused bf16 layer on {device.type} vs float64: relative error {rel:.2e} (bf16 base alone {base_rel:.2e}); "
          f"update scale ratio {ratio:.5f} (1 = the fp32 gate mix is kept)")


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
    offload = should_offload("auto", device, int(2 * A14B_EXPERT_BYTES), free, 32 * GiB)
    print(f"\n3. host -> device, one block's weights ({nbytes / 1e9:.2f} GB): pinned {rows['pinned'] / 1e9:.1f} GB/s, "
          f"pageable {rows['pageable'] / 1e9:.1f} GB/s; one A14B expert swap (28.6 GB) from pinned memory "
          f"~{A14B_EXPERT_BYTES / rows['pinned']:.1f} s")
    print(f"   free {free / GiB:.1f} of {total / GiB:.1f} GiB: --offload_inactive_dit auto would "
          f"{'offload' if offload else 'keep both A14B experts resident'} (57.2 GB + 32 GiB headroom)")


def training_row() -> None:
    from moe.data.cache import build_cache
    from moe.data.synth import synthesize_dataset
    from moe.train.config import Stage1Config
    from moe.train.stage1 import train_stage1
    from moe.wan.model_set import write_tiny_model_set

    root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    models = write_tiny_model_set(root / "models", "tiny-t2v", seed=0)
    manifest = synthesize_dataset(root / "data", clips=12, frames=17, size=(64, 64), seed=0)
    build_cache(manifest, root / "cache", "tiny-t2v", model_set=root / "models", size=(64, 64), frames=17, progress=False)
    print("\n4. tiny two-expert stage 1 on the GPU (bf16 by default), accumulation 4:")
    for policy in ("always", "never"):
        cfg = Stage1Config(dit=models.low_noise, dit_high_noise=models.high_noise, dataset=root / "cache",
                           output_dir=root / policy, max_train_epochs=2, gradient_accumulation_steps=4,
                           learning_rate=1e-2, offload_inactive_dit=policy, progress=False)
        m = train_stage1(cfg)
        print(f"   {policy:6s}: {m['train_steps']} steps, {m['dit_swaps_this_run']} swaps, offload {m['dit_offload']}, "
              f"held-out loss {m['val_loss_base']:.3f} -> {m['val_loss_final']:.3f}, {m['train_seconds_this_run']} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--heads", type=int, default=40, help="fewer heads (and a proportional ffn) for a smoke run")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device; this check runs on a lent GPU (or pass --device cpu for a smoke run)")
    started = time.monotonic()
    block_rows(device, args.repeats, args.tokens, args.heads)
    numerics_row(device)
    if device.type == "cuda":
        bandwidth_row()
        if not args.skip_train:
            training_row()
    print(f"\ndone in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
