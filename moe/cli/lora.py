"""LoRA file commands: `convert-lora`."""

from __future__ import annotations

import typer

from moe.cli.app import app
from moe.cli.config_command import config_command
from moe.config.lora import ConvertLoRAConfig


def _run_convert_lora(cfg: ConvertLoRAConfig) -> None:
    from moe.lora.convert import convert_lora_file

    result = convert_lora_file(cfg.src, cfg.to, cfg.out, cfg.overwrite)
    typer.echo(f"wrote {result.output} ({result.form} form, {result.modules} modules, from {result.source_form} form)")
    typer.echo(f"  {result.support}")


config_command(
    app,
    "convert-lora",
    ConvertLoRAConfig,
    _run_convert_lora,
    help="Rewrite a vanilla LoRA in another form, losslessly (same tensors, alphas and header).",
)
