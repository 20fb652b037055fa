"""LoRA file commands: `convert-lora`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from moe.cli.app import app
from moe.cli.options import CheckedCommand
from moe.config.file_names import OVERWRITE_HELP


@app.command("convert-lora", cls=CheckedCommand)
def convert_lora(
    src: Annotated[Path, typer.Argument(metavar="IN", help="A vanilla LoRA in any form lora-moe reads.")],
    to: Annotated[
        Literal["default", "musubi", "peft"],
        typer.Option("--to", help="default (diffusers, ComfyUI), musubi (musubi-tuner, ComfyUI) or peft (diffusers' own)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Output .safetensors file (a new path).")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
) -> None:
    """Rewrite a vanilla LoRA in another form, losslessly (same tensors, alphas and header)."""
    from moe.lora.convert import convert_lora_file

    result = convert_lora_file(src, to, out, overwrite)
    typer.echo(f"wrote {result.output} ({result.form} form, {result.modules} modules, from {result.source_form} form)")
    typer.echo(f"  {result.support}")
