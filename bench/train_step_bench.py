"""Training-step benchmark (issues 3, 4 and 18) on a mid-size Wan DiT, fp32 on the CPU.

One step = forward + backward (+ AdamW step for trainable weights) on one micro-batch.
Contenders, timed on the same inputs, each on its own copy of the model:
  frozen    the DiT's own forward + backward (input gradients only, nothing to update)
  stage1    our vanilla LoRA (`Stage1Module`, reference targets)
  peft      peft's LoRA with the same targets and ranks (diffusers' `add_adapter`)
  stage2    our LoRA-MoE (`Stage2Module`: 4 experts, router, timestep gates, routing losses)
  stage1_compiled, stage2_compiled   the same with `--compile` (`moe.dit.compile`, inductor);
            their first step compiles (minutes on a small CPU, seconds once inductor's cache
            in /tmp/torchinductor_$USER is warm) and is timed apart
Targets: stage1 no slower than peft; stage2 at most 1.15x stage1; compiled / eager printed.

The order of the contenders rotates every repeat, so each follows every other one equally
often: with a fixed order a contender's time depends on the step before it (stage 1 always ran
right after the frozen step, whose full backward keeps about twice the activations, and paid
about 2% for it; see README). Medians are reported, with the minimum (the least disturbed run
on a shared machine) beside them.

    python bench/train_step_bench.py [--dim 256] [--layers 8] [--latent 5x32x32] [--repeats 9]
                                     [--threads N] [--no_compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from moe.config import presets
from moe.config.presets import DiTConfig
from moe.config.targets import TargetSpec
from moe.config.train import Stage1Config, Stage2Config
from moe.dit.compile import compile_blocks
from moe.dit.dual_dit import DualDiT
from moe.train.stage1 import Stage1Module
from moe.train.stage2 import Stage2Module
from moe.wan.checkpoint import build_random_transformer
from moe.wan.keys import module_to_diffusers


def register_bench_preset(dim: int, layers: int) -> str:
    """A mid-size preset (not a real Wan size) so the stage modules can be built as usual."""
    tiny = presets.PRESETS["tiny-t2v"]
    dit = DiTConfig(
        num_layers=layers,
        num_attention_heads=dim // 64,
        attention_head_dim=64,
        ffn_dim=4 * dim,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
    )
    presets.PRESETS["bench-mid"] = tiny.model_copy(update={"task": "bench-mid", "dit": dit})
    return "bench-mid"


def batch_for(latent: tuple[int, int, int], text_len: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t, h, w = latent
    return {
        "latents": torch.randn(1, 16, t, h, w, generator=g),
        "text_embeds": torch.randn(1, text_len, 32, generator=g),
        "text_mask": torch.ones(1, text_len, dtype=torch.long),
        "roi": (torch.rand(1, t, h, w, generator=g) > 0.9).float(),
        "labels": torch.tensor([[0.0, 1.0, 0.0, 0.0]]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--latent", default="5x32x32", help="latent frames x height x width")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no_compile", action="store_true", help="skip the compiled contenders")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    latent = tuple(int(v) for v in args.latent.split("x"))
    task = register_bench_preset(args.dim, args.layers)
    tokens = latent[0] * latent[1] * latent[2] // 4
    print(f"DiT dim {args.dim}, {args.layers} layers, {tokens} tokens, fp32, {torch.get_num_threads()} threads")

    paths = dict(dit=Path("unused"), dataset=Path("unused"), output_dir=Path("unused"))
    batch = batch_for(latent)
    noise = torch.randn_like(batch["latents"])
    sigma = torch.tensor([0.5])

    def dits(seed: int, compiled: bool = False) -> DualDiT:
        model = build_random_transformer(presets.PRESETS[task], seed)
        if compiled:
            compile_blocks(model, dynamic=False)  # as load_expert does, before the adapters are injected
        return DualDiT(model, None, None)

    def stage1_module(compiled: bool = False) -> Stage1Module:
        torch.manual_seed(0)
        return Stage1Module(Stage1Config(task=task, **paths), dits(0, compiled))

    def stage2_module(compiled: bool = False) -> Stage2Module:
        torch.manual_seed(0)
        module = Stage2Module(Stage2Config(task=task, **paths), dits(0, compiled), merged_dits={})
        module.on_step(10**6, 10**6)  # past teacher forcing: the steady-state path
        return module

    frozen = build_random_transformer(presets.PRESETS[task], 0).requires_grad_(False)
    peft_model = build_random_transformer(presets.PRESETS[task], 0)
    ranks = TargetSpec().resolve(args.layers)
    from peft import LoraConfig

    names = {module_to_diffusers(m): r for m, r in ranks.items()}
    peft_model.add_adapter(LoraConfig(r=4, lora_alpha=1, target_modules=list(names), rank_pattern=names, alpha_pattern=dict.fromkeys(names, 1)))
    peft_trainable = [p for p in peft_model.parameters() if p.requires_grad]

    def our_step(module):
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def run():
            module(batch, sigma, noise, "low")["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return run

    def frozen_step():
        x = torch.cat([batch["latents"]], 1).requires_grad_(True)
        frozen(x, sigma * 1000, batch["text_embeds"], return_dict=False)[0].float().pow(2).mean().backward()

    peft_opt = torch.optim.AdamW(peft_trainable, lr=1e-4)

    def peft_step():
        x = (1 - sigma) * batch["latents"] + sigma * noise
        pred = peft_model(x, sigma * 1000, batch["text_embeds"], return_dict=False)[0]
        ((pred - (noise - batch["latents"])) ** 2).mean().backward()
        peft_opt.step()
        peft_opt.zero_grad(set_to_none=True)

    stage1, stage2 = stage1_module(), stage2_module()
    steps = {"frozen": frozen_step, "stage1": our_step(stage1), "peft": peft_step, "stage2": our_step(stage2)}
    if not args.no_compile:
        steps |= {"stage1_compiled": our_step(stage1_module(compiled=True)), "stage2_compiled": our_step(stage2_module(compiled=True))}
    first: dict[str, float] = {}
    for name, run in steps.items():  # warm-up (the compiled contenders compile here)
        t0 = time.perf_counter()
        run()
        first[name] = time.perf_counter() - t0
        run()
    times: dict[str, list[float]] = {k: [] for k in steps}
    order = list(steps)
    for r in range(args.repeats):
        for name in order[r % len(order) :] + order[: r % len(order)]:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"  {name:16s} {t * 1e3:8.1f} ms median, {low[name] * 1e3:8.1f} ms min  ({t / med['frozen']:.3f}x frozen)")

    def ratio(a: str, b: str) -> str:
        return f"{med[a] / med[b]:.3f}x (min {low[a] / low[b]:.3f}x)"

    print(f"stage1 / peft:   {ratio('stage1', 'peft')} (target <= 1.0)")
    print(f"stage2 / stage1: {ratio('stage2', 'stage1')} (target <= 1.15)")
    if not args.no_compile:
        for stage in ("stage1", "stage2"):
            print(
                f"{stage} compiled / eager: {ratio(stage + '_compiled', stage)}; first compiled step (compiling) {first[stage + '_compiled']:.1f} s"
            )
    print(
        f"trainable parameters: stage1 {sum(p.numel() for p in stage1.parameters() if p.requires_grad):,}, "
        f"peft {sum(p.numel() for p in peft_trainable):,}, "
        f"stage2 {sum(p.numel() for p in stage2.parameters() if p.requires_grad):,}"
    )


if __name__ == "__main__":
    main()
