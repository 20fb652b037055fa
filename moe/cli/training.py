"""Training commands: `lora-moe stage1` (and, later, `stage2`), with options from the configs."""

from __future__ import annotations

import typer

from moe.cli.app import app
from moe.cli.config_command import config_command
from moe.config.generate import GenerateConfig
from moe.config.train import Stage1Config, Stage2Config


def _run_stage1(cfg: Stage1Config) -> None:
    from moe.train.stage1 import VANILLA_LORA_FILE, train_stage1

    metrics = train_stage1(cfg)
    if not metrics:  # not the main process of a multi-process run
        return
    typer.echo(
        f"stage 1 done: {cfg.output_dir / VANILLA_LORA_FILE}; held-out loss "
        f"{metrics['val_loss_base']:.4f} (base) -> {metrics['val_loss_final']:.4f} (with LoRA)"
    )


config_command(
    app,
    "stage1",
    Stage1Config,
    _run_stage1,
    help="Stage 1: train one vanilla LoRA across both Wan2.2 experts on a latent cache.",
)


def _run_stage2(cfg) -> None:
    from moe.train.stage2 import LORA_MOE_FILE, stage2_summary, train_stage2

    metrics = train_stage2(cfg)
    if not metrics:  # not the main process of a multi-process run
        return
    typer.echo(f"stage 2 done: {cfg.output_dir / LORA_MOE_FILE}; held-out {stage2_summary(metrics)}")


config_command(
    app,
    "stage2",
    Stage2Config,
    _run_stage2,
    help="Stage 2: train LoRA-MoE experts, router and timestep gates on the merged DiTs.",
    aliases={"network_dim": ("lora_dim",), "network_alpha": ("lora_alpha",)},
)


def _run_generate(cfg) -> None:
    from moe.inference import generate_video

    frames, routing = generate_video(cfg, log=lambda line: typer.echo(line, err=True))
    typer.echo(f"wrote {cfg.save_path} ({frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]})")


config_command(
    app,
    "generate",
    GenerateConfig,
    _run_generate,
    help="Generate a video: stage 1 (--lora_weight on base DiTs) or stage 2 (--lora_moe_weights on merged DiTs).",
)
