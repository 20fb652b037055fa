"""The `lora-moe` application object that every command module registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="lora-moe",
    help="Two-stage LoRA-MoE fine-tuning of WAN2.2 video DiTs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click output: usage errors read as click's own ("Error: No such option: --x (Possible
    # options: ...)"), one grep-able line in a log instead of a drawn box.
    rich_markup_mode=None,
)
