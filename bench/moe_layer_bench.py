"""LoRA-MoE layer benchmark (issues 4 and 10): fused layer vs the base Linear alone vs a
per-expert loop, in fp32 and on the bf16 path.

fp32: forward + backward of one Linear D x D (frozen) on N tokens with E = 4 experts, top-2 gates
and timestep gates, on the CPU, medians of interleaved runs. Also the peak memory of the tensors
each variant allocates during forward + backward (tracked op by op), and the largest single
intermediate, to show that the fused layer never forms an [E, tokens, out] tensor. Targets: fused
<= 1.10x the base Linear, and the time the fused layer adds over the base at most a quarter of
what the per-expert loop adds.

bf16 (issue 10): a bf16 base Linear with fp32 adapter weights, without and with bf16 autocast.
Bytes saved for backward (`moe.runtime.profiling`: distinct storages, parameters excluded) of the fused
layer against the minimum any LoRA keeps (the input x, which dA needs; the frozen base Linear
itself keeps none), target <= 1.10x; also the old unfused path (an fp32 copy of x per layer),
and the issue's own measure (parameters included) for comparison. Time vs the bf16 base Linear,
target <= 1.15x on the CPU.

    python bench/moe_layer_bench.py [--dim 1536] [--tokens 4096] [--repeats 15]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from moe.lora_moe.layer import LoRAMoEAdapter, LoRAMoELinear
from moe.lora_moe.router import top_k_gates
from moe.lora_moe.routing import RoutingState
from moe.runtime.profiling import saved_activation_bytes


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensors created inside the block that are alive at once, and the largest one."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.largest = 0
        self.seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    n = storage.nbytes()
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    self.largest = max(self.largest, n)
                    weakref.finalize(storage, self._free, key, n)
        return out

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.discard(key)


class PerExpertLoop(nn.Module):
    """The naive reference: one [tokens, out] update per expert, summed."""

    def __init__(self, base: nn.Linear, adapter: LoRAMoEAdapter, state: RoutingState):
        super().__init__()
        self.base, self.adapter, self.state = base, adapter, state

    def forward(self, x):
        a, r = self.adapter, self.adapter.rank
        y = self.base(x)
        for e in range(a.num_experts):
            down = a.lora_down[e * r : (e + 1) * r]
            up = a.lora_up[:, e * r : (e + 1) * r]
            y = y + self.state.mix[:, e, None, None] * a.scale * ((x @ down.T) @ up.T)
        return y


class UnfusedMixedDtype(nn.Module):
    """The bf16 path before issue 10: the update as plain ops in the adapters' fp32, on an fp32
    copy of x (kept for backward), added to the bf16 base output."""

    def __init__(self, base: nn.Linear, adapter: LoRAMoEAdapter, state: RoutingState):
        super().__init__()
        self.base, self.adapter, self.state = base, adapter, state

    def forward(self, x):
        a = self.adapter
        h = torch.nn.functional.linear(x.to(a.lora_down.dtype), a.lora_down)
        s = (self.state.mix.to(h.dtype) * a.scale).repeat_interleave(a.rank, dim=-1)
        y = self.base(x)
        return y + torch.nn.functional.linear(h * s[:, None, :], a.lora_up).to(y.dtype)


def make_variants(dim: int, rank: int, experts: int, seed: int, base_dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    base = nn.Linear(dim, dim).to(base_dtype).requires_grad_(False)
    adapter = LoRAMoEAdapter(dim, dim, rank, 1.0, experts)
    with torch.no_grad():
        adapter.lora_up.normal_(0, 0.02)
    state = RoutingState()
    p = torch.softmax(torch.randn(1, experts), -1)
    sigma = torch.tensor([0.4])
    state.set(top_k_gates(p, 2), sigma, torch.sigmoid(10 * (0.9 - sigma)).expand(1, experts))
    fused = LoRAMoELinear(base, adapter, state)
    if base_dtype != torch.float32:
        return {"base": base, "fused": fused, "unfused": UnfusedMixedDtype(base, adapter, state)}
    return {"base": base, "fused": fused, "loop": PerExpertLoop(base, adapter, state)}


def step(layer: nn.Module, x: torch.Tensor) -> None:
    layer(x).float().sum().backward()


def timed(layers: dict, x: torch.Tensor, repeats: int, autocast: bool = False) -> dict[str, float]:
    """Median seconds of forward + backward per variant, interleaved (drift hits every variant alike)."""
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if autocast else contextlib.nullcontext
    times: dict[str, list[float]] = {k: [] for k in layers}
    for layer in layers.values():  # warm-up
        with ctx():
            step(layer, x)
    for _ in range(repeats):
        for name, layer in layers.items():
            t0 = time.perf_counter()
            with ctx():
                step(layer, x)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bf16_rows(dim: int, tokens: int, experts: int, repeats: int) -> None:
    print(f"\nbf16 base Linear, fp32 adapters (rank 8, E={experts}, top-2); D={dim}, tokens={tokens}")
    for autocast in (False, True):
        layers = make_variants(dim, 8, experts, seed=8, base_dtype=torch.bfloat16)
        x = torch.randn(1, tokens, dim, dtype=torch.bfloat16, requires_grad=True)
        params = [p for layer in layers.values() for p in layer.parameters()]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            saved = {name: saved_activation_bytes(lambda layer=layer: layer(x), params)[0] for name, layer in layers.items()}
            with_params = {name: saved_activation_bytes(lambda layer=layer: layer(x))[0] for name, layer in layers.items()}
        med = timed(layers, x, repeats, autocast)
        minimum = x.numel() * x.element_size()  # x itself: what dL/dA needs
        print(f"  {'with' if autocast else 'without'} autocast:")
        for name in layers:
            print(
                f"    {name:8s} {med[name] * 1e3:8.2f} ms ({med[name] / med['base']:.3f}x base)  saved for backward "
                f"{saved[name] / 2**20:6.2f} MiB without parameters, {with_params[name] / 2**20:6.2f} MiB with"
            )
        print(
            f"    fused saves {(saved['fused'] - saved['base']) / minimum:.3f}x the input x (target <= 1.10; "
            f"unfused {(saved['unfused'] - saved['base']) / minimum:.3f}x); fused / bf16 base time "
            f"{med['fused'] / med['base']:.3f}x (target <= 1.15)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    print(f"D={args.dim}, tokens={args.tokens}, E={args.experts}, top-2, fp32, {torch.get_num_threads()} threads")
    for rank in (4, 8):
        layers = make_variants(args.dim, rank, args.experts, seed=rank)
        x = torch.randn(1, args.tokens, args.dim, requires_grad=True)
        med = timed(layers, x, args.repeats)
        memory = {}
        for name, layer in layers.items():
            with LiveTensorBytes() as tracker:
                step(layer, x)
            memory[name] = (tracker.peak, tracker.largest)
        added_fused, added_loop = med["fused"] - med["base"], med["loop"] - med["base"]
        print(f"\nrank {rank}:")
        for name in layers:
            peak, largest = memory[name]
            print(
                f"  {name:5s} {med[name] * 1e3:8.2f} ms  ({med[name] / med['base']:.3f}x base)  "
                f"peak {peak / 2**20:7.1f} MiB, largest tensor {largest / 2**20:6.1f} MiB"
            )
        print(f"  fused / base: {med['fused'] / med['base']:.3f}x (target <= 1.10)")
        print(
            f"  added over base: fused {added_fused * 1e3:.2f} ms vs loop {added_loop * 1e3:.2f} ms "
            f"= {added_fused / added_loop:.2f} of the loop's (target <= 0.25)"
        )
        print(f"  an [E, tokens, out] tensor would be {args.experts * args.tokens * args.dim * 4 / 2**20:.1f} MiB")
    bf16_rows(args.dim, args.tokens, args.experts, args.repeats)


if __name__ == "__main__":
    main()
