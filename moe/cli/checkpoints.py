"""Checkpoint commands: `models tiny`, `merge`, `inspect`."""

from __future__ import annotations

import typer

from moe.cli.app import app
from moe.cli.config_command import config_command
from moe.config.lora import ExportExpertConfig, InspectConfig
from moe.config.merge import MergeConfig
from moe.config.tiny import TinyModelsConfig
from moe.errors import MoeError

models_app = typer.Typer(help="Make model sets.", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _run_models_tiny(cfg: TinyModelsConfig) -> None:
    from moe.tiny.model_set import write_tiny_model_set

    ms = write_tiny_model_set(cfg.output_dir, cfg.task, cfg.seed, overwrite=cfg.overwrite, pretrain_steps=cfg.pretrain_steps, progress=not cfg.quiet)
    typer.echo(f"wrote tiny {ms.task} model set to {cfg.output_dir}")


config_command(
    models_app,
    "tiny",
    TinyModelsConfig,
    _run_models_tiny,
    help="Write a tiny Wan2.2 model set (high/low-noise DiTs, VAE, text encoder, tokenizer): random DiTs, or "
    "DiTs pre-trained on synthetic surgical clips with --pretrain_steps N (the demo's: 1000).",
)


def _run_merge(cfg: MergeConfig) -> None:
    from moe.merge import merge_lora_into_checkpoint

    result = merge_lora_into_checkpoint(
        cfg.dit,
        cfg.lora_weight,
        cfg.save_merged_model,
        cfg.lora_multiplier,
        task=cfg.task,
        force=cfg.force,
        progress=not cfg.quiet,
        overwrite=cfg.overwrite,
    )
    typer.echo(f"merged {result.merged_modules} modules x{cfg.lora_multiplier} into {result.output}")


config_command(app, "merge", MergeConfig, _run_merge, help="Merge a vanilla LoRA into one DiT checkpoint, streaming, keeping its format.")


def _run_inspect(cfg: InspectConfig) -> None:
    from moe.inspect import inspect_report

    typer.echo(inspect_report(cfg.path))


config_command(
    app, "inspect", InspectConfig, _run_inspect, help="Say what a file is: Wan DiT (format, preset, dtype), merged DiT, vanilla LoRA or LoRA-MoE."
)


def _run_export_expert(cfg: ExportExpertConfig) -> None:
    from moe.lora_moe.file import export_expert

    try:
        path = export_expert(
            cfg.lora_moe_weights, cfg.expert, cfg.out, cfg.bake_sigma if cfg.bake else None, cfg.alpha_expert, cfg.save_format, cfg.overwrite
        )
    except MoeError as e:
        if str(e).startswith("unknown expert"):  # the file's own expert names: known only once it is read
            raise MoeError(f"--expert: {e}") from None
        raise
    typer.echo(f"wrote expert {cfg.expert} of {cfg.lora_moe_weights} to {path}")
    if cfg.musubi_copy:
        from moe.lora.convert import write_musubi_copy

        typer.echo(f"wrote its musubi-tuner copy to {write_musubi_copy(path, cfg.overwrite)}")


config_command(
    app,
    "export-expert",
    ExportExpertConfig,
    _run_export_expert,
    help="Export one expert as a vanilla LoRA (for diffusers, ComfyUI, `generate --lora_weight`). It is a delta "
    "on the MERGED DiTs the experts were trained on.",
)
