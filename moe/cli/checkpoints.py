"""Checkpoint commands: `models tiny`, `merge`, `inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from moe.cli.app import app
from moe.cli.options import OVERWRITE_HELP, TASK, CheckedCommand, number
from moe.config_types import FiniteFloat, Fraction, PretrainSteps, Seed
from moe.errors import MoeError
from moe.workflow import TINY_PRETRAIN_STEPS

models_app = typer.Typer(help="Make model sets.", no_args_is_help=True)
app.add_typer(models_app, name="models")


@models_app.command("tiny", cls=CheckedCommand)
def models_tiny(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the model set into.")],
    task: Annotated[str, typer.Option("--task", help="tiny-t2v or tiny-i2v.", **TASK)] = "tiny-t2v",
    seed: Annotated[int, typer.Option("--seed", **number(Seed))] = 0,
    pretrain_steps: Annotated[
        int,
        typer.Option(
            "--pretrain_steps",
            help=f"Pre-train both DiTs this many steps on synthetic clips of their own, as a real base is pretrained "
            f"(the demo uses {TINY_PRETRAIN_STEPS}: about 3 min on 2 cores; 0: random weights, for fast tests).",
            **number(PretrainSteps),
        ),
    ] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Write a tiny Wan2.2 model set (high/low-noise DiTs, VAE, text encoder, tokenizer): random DiTs,
    or DiTs pre-trained on synthetic surgical clips with --pretrain_steps N (the demo's: 1000)."""
    from moe.wan.model_set import write_tiny_model_set

    ms = write_tiny_model_set(out, task, seed, overwrite=overwrite, pretrain_steps=pretrain_steps, progress=not quiet)
    typer.echo(f"wrote tiny {ms.task} model set to {out}")


@app.command("merge", cls=CheckedCommand)
def merge(
    dit: Annotated[Path, typer.Option("--dit", help="Base DiT: file, sharded folder, index json or shard.")],
    lora_weight: Annotated[Path, typer.Option("--lora_weight", help="Vanilla LoRA (stage-1 output).")],
    save_merged_model: Annotated[
        Path, typer.Option("--save_merged_model", help="Output file (a folder for sharded input).")
    ],
    lora_multiplier: Annotated[float, typer.Option("--lora_multiplier", **number(FiniteFloat))] = 1.0,
    task: Annotated[str | None, typer.Option("--task", help="Validate the DiT against this task.", **TASK)] = None,
    force: Annotated[bool, typer.Option("--force", help="Merge even if this LoRA is already merged in.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Merge a vanilla LoRA into one DiT checkpoint, streaming, keeping its format."""
    from moe.merge import merge_lora_into_checkpoint

    result = merge_lora_into_checkpoint(
        dit, lora_weight, save_merged_model, lora_multiplier, task=task, force=force, progress=not quiet,
        overwrite=overwrite,
    )
    typer.echo(f"merged {result.merged_modules} modules x{lora_multiplier} into {result.output}")


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
            "--bake_sigma", help="Bake the timestep gate w_e(sigma) in at this sigma (default 0: full strength).",
            **number(Fraction),
        ),
    ] = 0.0,
    no_bake: Annotated[bool, typer.Option("--no_bake", help="Do not bake the timestep gate (w = 1).")] = False,
    alpha_expert: Annotated[float, typer.Option("--alpha_expert", **number(FiniteFloat))] = 1.0,
    save_format: Annotated[
        Literal["diffusers", "musubi", "default", "peft"],
        typer.Option("--save_format", help="diffusers (= default), musubi or peft."),
    ] = "diffusers",
    musubi_copy: Annotated[
        bool, typer.Option("--musubi_copy", help="Also write OUT_musubi.safetensors (musubi-tuner's form).")
    ] = False,
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
