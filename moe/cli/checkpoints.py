"""Checkpoint commands: `models tiny`, `merge`, `inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from moe.cli.app import app
from moe.cli.config_command import config_command
from moe.cli.options import CheckedCommand, number
from moe.config.file_names import OVERWRITE_HELP
from moe.config.merge import MergeConfig
from moe.config.numbers import FiniteFloat, Fraction
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


@app.command("inspect", cls=CheckedCommand)
def inspect(path: Annotated[Path, typer.Argument(help="A .safetensors file or checkpoint folder.")]) -> None:
    """Say what a file is: Wan DiT (format, preset, dtype), merged DiT, vanilla LoRA or LoRA-MoE."""
    from moe.inspect import inspect_report

    typer.echo(inspect_report(path))


@app.command("export-expert", cls=CheckedCommand)
def export_expert(
    lora_moe_weights: Annotated[Path, typer.Option("--lora_moe_weights", help="Stage-2 LoRA-MoE file.")],
    expert: Annotated[str, typer.Option("--expert", help="scissors, hook, suction or other.")],
    out: Annotated[Path, typer.Option("--out", help="Output vanilla LoRA file.")],
    bake_sigma: Annotated[
        float,
        typer.Option(
            "--bake_sigma",
            help="Bake the timestep gate w_e(sigma) in at this sigma (default 0: full strength).",
            **number(Fraction),
        ),
    ] = 0.0,
    no_bake: Annotated[bool, typer.Option("--no_bake", help="Do not bake the timestep gate (w = 1).")] = False,
    alpha_expert: Annotated[float, typer.Option("--alpha_expert", **number(FiniteFloat))] = 1.0,
    save_format: Annotated[
        Literal["diffusers", "musubi", "default", "peft"],
        typer.Option("--save_format", help="diffusers (= default), musubi or peft."),
    ] = "diffusers",
    musubi_copy: Annotated[bool, typer.Option("--musubi_copy", help="Also write OUT_musubi.safetensors (musubi-tuner's form).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Export one expert as a vanilla LoRA (for diffusers, ComfyUI, `generate --lora_weight`).
    It is a delta on the MERGED DiTs the experts were trained on."""
    from moe.lora_moe.file import export_expert as export

    try:
        path = export(lora_moe_weights, expert, out, None if no_bake else bake_sigma, alpha_expert, save_format, overwrite)
    except MoeError as e:
        if str(e).startswith("unknown expert"):  # the file's own expert names: known only once it is read
            raise MoeError(f"--expert: {e}") from None
        raise
    typer.echo(f"wrote expert {expert} of {lora_moe_weights} to {path}")
    if musubi_copy:
        from moe.lora.convert import write_musubi_copy

        typer.echo(f"wrote its musubi-tuner copy to {write_musubi_copy(path, overwrite)}")
