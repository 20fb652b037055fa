"""DiT placement benchmark (issue 10): swaps per epoch of the tiny dual-DiT pair under each
`--offload_inactive_dit` policy, with the training loop's own epoch plan and DualDiT's counter.

The plan (sigma per position shared by all processes, each accumulation window ordered by expert)
is replayed through `DualDiT.get` without training, over several epochs, on the CPU (a swap is
then a logical move, counted as on a GPU). For comparison: the swaps of the same sigmas in draw
order, as the loop ran before (each window unordered). Target: at most one swap per window with
offloading, none with both experts resident.

    python bench/placement_bench.py [--clips 64] [--epochs 10] [--shift 5]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from moe.config.presets import get_preset
from moe.config.train import Stage1Config
from moe.data.cache import build_cache
from moe.data.cache_index import CacheIndex
from moe.dit.dual_dit import DualDiT, GiB
from moe.tiny.model_set import write_tiny_model_set
from moe.tiny.synth import synthesize_dataset
from moe.train.epoch_plan import plan_epoch


def replay(dits: DualDiT, cfg: Stage1Config, entries: list, epochs: int, reorder: bool = True) -> tuple[int, int, int]:
    """(swaps, windows, micro-batches) over `epochs` epochs of one process's plan."""
    start, windows, micro = None, 0, 0
    for epoch in range(epochs):
        plan_cfg = cfg if reorder else cfg.model_copy(update={"gradient_accumulation_steps": 1})
        plan, start = plan_epoch(entries, plan_cfg, epoch, 1, 0, dits.expert_for, start)
        for mb in plan:
            dits.get(mb.expert)
        micro += len(plan)
        windows += -(-len(plan) // cfg.gradient_accumulation_steps)
    return dits.swaps, windows, micro


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--shift", type=float, default=5.0)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="placement_bench_"))
    models = write_tiny_model_set(root / "models", "tiny-t2v", seed=0)
    manifest = synthesize_dataset(root / "data", clips=args.clips, frames=5, size=(32, 32), seed=0)
    build_cache(manifest, root / "cache", "tiny-t2v", model_set=root / "models", size=(32, 32), frames=5, progress=False)
    entries = [c for c in CacheIndex.load(root / "cache").clips if c.split == "train"]
    preset = get_preset("tiny-t2v")
    print(f"tiny-t2v pair, {len(entries)} training clips, batch 1, shift {args.shift}, boundary {preset.boundary}, {args.epochs} epochs")
    policies = [("always", None), ("never", None), ("auto, both fit", 64 * GiB), ("auto, no room", 100_000)]
    for accum in (1, 4, 8):
        cfg = Stage1Config(
            dit=models.low_noise,
            dit_high_noise=models.high_noise,
            dataset=root / "cache",
            output_dir=root,
            gradient_accumulation_steps=accum,
            discrete_flow_shift=args.shift,
            placement_headroom_gib=0,
        )
        print(f"\naccumulation {accum}:")
        for name, free in policies:
            dits = DualDiT.load(
                preset, models.low_noise, models.high_noise, preset.boundary, None, "cpu", "auto" if name.startswith("auto") else name, 0, free
            )
            swaps, windows, micro = replay(dits, cfg, entries, args.epochs)
            print(
                f"  {name:15s} offload {str(dits.offload):5s} {swaps / args.epochs:6.1f} swaps/epoch, "
                f"{swaps / windows:.2f} per window ({windows / args.epochs:.0f} windows, {micro / args.epochs:.0f} micro-batches)"
            )
        unordered = DualDiT.load(preset, models.low_noise, models.high_noise, preset.boundary, None, "cpu", "always")
        swaps, windows, micro = replay(unordered, cfg, entries, args.epochs, reorder=False)
        print(
            f"  {'before (draw order)':15s} offload True  {swaps / args.epochs:6.1f} swaps/epoch, {swaps / windows:.2f} per window, "
            f"{swaps / micro:.2f} per micro-batch"
        )


if __name__ == "__main__":
    main()
