"""Evaluation (SPEC section 8): base vs stage 1 vs stage 2 on held-out clips, a report people
read, plots, sample videos, numbers on generated clips and a promotion gate (`lora-moe eval`).

    inputs.py    every input checked before anything runs  variants.py the model variants
    metrics.py   losses by region/class/sigma, bootstrap    routing.py  routing quality
    report.py    EvalReport, report.md (torch-free)         plots.py    matplotlib PNGs
    samples.py   clips generated per variant, MP4 samples   sweep.py    multiplier sweep
    generated.py FVD/KVD/FID/KID, instrument accuracy and VAE PSNR of the generated clips
    run.py       evaluate(EvalConfig) -> EvalReport
    video_metrics/ (FVD/KVD/FID/KID), instrument_classifier.py (which instruments a clip shows)

Its options (EvalConfig, SweepConfig) and the promotion gate are in `moe.config` (torch-free).
Importing `moe.eval` is cheap: torch, diffusers and matplotlib load only when a function runs.
"""

from __future__ import annotations

from moe.config.eval import EvalConfig, SweepConfig
from moe.config.gate import PromotionGate
from moe.eval.report import EvalReport

__all__ = ["EvalConfig", "EvalReport", "PromotionGate", "SweepConfig", "evaluate", "multiplier_sweep"]


def evaluate(cfg: EvalConfig) -> EvalReport:
    from moe.eval.run import evaluate as run

    return run(cfg)


def multiplier_sweep(cfg: SweepConfig):
    from moe.eval.sweep import multiplier_sweep as run

    return run(cfg)
