"""Training-step benchmark (issues 3 and 4) on a mid-size Wan DiT, fp32 on the CPU.

One step = forward + backward (+ AdamW step for trainable weights) on one micro-batch.
Contenders, timed interleaved on the same model and inputs, medians reported:
  frozen   the DiT's own forward + backward (input gradients only, nothing to update)
  stage1   our vanilla LoRA (`Stage1Module`, reference targets)
  peft     peft's LoRA with the same targets and ranks (diffusers' `add_adapter`)
  stage2   our LoRA-MoE (`Stage2Module`: 4 experts, router, timestep gates, routing losses)
Targets: stage1 no slower than peft; stage2 at most 1.15x stage1.

    python bench/train_step_bench.py [--dim 256] [--layers 8] [--latent 5x32x32] [--repeats 9]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from moe.lora.targets import TargetSpec
from moe.train.config import Stage1Config, Stage2Config
from moe.train.dual_dit import DualDiT
from moe.train.stage1 import Stage1Module
from moe.train.stage2 import Stage2Module
from moe.wan import presets
from moe.wan.checkpoint import build_random_transformer
from moe.wan.keys import module_to_diffusers
from moe.wan.presets import DiTConfig


def register_bench_preset(dim: int, layers: int) -> str:
    """A mid-size preset (not a real Wan size) so the stage modules can be built as usual."""
    tiny = presets.PRESETS["tiny-t2v"]
    dit = DiTConfig(num_layers=layers, num_attention_heads=dim // 64, attention_head_dim=64, ffn_dim=4 * dim,
                    in_channels=16, out_channels=16, text_dim=32, freq_dim=32)
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
    args = ap.parse_args()
    latent = tuple(int(v) for v in args.latent.split("x"))
    task = register_bench_preset(args.dim, args.layers)
    tokens = latent[0] * latent[1] * latent[2] // 4
    print(f"DiT dim {args.dim}, {args.layers} layers, {tokens} tokens, fp32, {torch.get_num_threads()} threads")

    paths = dict(dit=Path("unused"), dataset=Path("unused"), output_dir=Path("unused"))
    batch = batch_for(latent)
    noise = torch.randn_like(batch["latents"])
    sigma = torch.tensor([0.5])

    def dits(seed: int) -> DualDiT:
        return DualDiT(build_random_transformer(presets.PRESETS[task], seed), None, None)

    stage1 = Stage1Module(Stage1Config(task=task, **paths), dits(0))
    stage2 = Stage2Module(Stage2Config(task=task, **paths), dits(0), merged_dits={})
    stage2.on_step(10**6, 10**6)  # past teacher forcing: the steady-state path

    frozen = build_random_transformer(presets.PRESETS[task], 0).requires_grad_(False)
    peft_model = build_random_transformer(presets.PRESETS[task], 0)
    ranks = TargetSpec().resolve(args.layers)
    from peft import LoraConfig

    names = {module_to_diffusers(m): r for m, r in ranks.items()}
    peft_model.add_adapter(LoraConfig(r=4, lora_alpha=1, target_modules=list(names), rank_pattern=names,
                                      alpha_pattern=dict.fromkeys(names, 1)))
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

    steps = {"frozen": frozen_step, "stage1": our_step(stage1), "peft": peft_step, "stage2": our_step(stage2)}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for run in steps.values():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in steps.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"  {name:7s} {t * 1e3:8.1f} ms  ({t / med['frozen']:.3f}x frozen)")
    print(f"stage1 / peft:   {med['stage1'] / med['peft']:.3f}x (target <= 1.0)")
    print(f"stage2 / stage1: {med['stage2'] / med['stage1']:.3f}x (target <= 1.15)")
    print(f"trainable parameters: stage1 {sum(p.numel() for p in stage1.parameters() if p.requires_grad):,}, "
          f"peft {sum(p.numel() for p in peft_trainable):,}, "
          f"stage2 {sum(p.numel() for p in stage2.parameters() if p.requires_grad):,}")


if __name__ == "__main__":
    main()
