"""The `lora-moe` application object that every command module registers on.

Spelling: every option is accepted as `--snake_case` (musubi-tuner's habit, the spelling `--help`
shows) and as `--kebab-case` (click's), and `--out` / `--output_dir` name the same option
wherever one of them exists: click normalizes each option name, the declared ones and the typed
ones alike, with `normalize_token` (its `token_normalize_func`, inherited by every subcommand).
A command name may be typed with underscores too (`export_expert`). `--help` lists the commands
in the order a workflow runs them (`COMMAND_ORDER`), not alphabetically.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

# Option names that mean the same thing across commands (after dashes became underscores): the
# left one is read as the right one.
OPTION_ALIASES = {"output_dir": "out"}

# `lora-moe --help` lists commands in this order (the workflow's), then any others (plugins).
COMMAND_ORDER = (
    "workflow",
    "models",
    "data",
    "cache",
    "stage1",
    "merge",
    "stage2",
    "eval",
    "generate",
    "registry",
    "export-expert",
    "convert-lora",
    "inspect",
)


def normalize_token(token: str) -> str:
    """An option name (without its leading dashes) as click matches it: `lora-dim` -> `lora_dim`,
    `output-dir` -> `out`. Click also applies it to choice values (on both sides, so `tiny_t2v`
    picks `tiny-t2v`)."""
    name = token.replace("-", "_")
    return OPTION_ALIASES.get(name, name)


class WorkflowOrderGroup(TyperGroup):
    """A command group that lists its commands in `COMMAND_ORDER` and finds `export_expert` as
    `export-expert`."""

    def list_commands(self, ctx) -> list[str]:
        names = list(super().list_commands(ctx))
        rank = {name: i for i, name in enumerate(COMMAND_ORDER)}
        return sorted(names, key=lambda n: (rank.get(n, len(rank)), names.index(n)))

    def get_command(self, ctx, cmd_name: str):
        command = super().get_command(ctx, cmd_name)
        if command is None and "_" in cmd_name:
            command = super().get_command(ctx, cmd_name.replace("_", "-"))
        return command


CONTEXT_SETTINGS = {"token_normalize_func": normalize_token}

app = typer.Typer(
    name="lora-moe",
    help="Two-stage LoRA-MoE fine-tuning of WAN2.2 video DiTs.",
    cls=WorkflowOrderGroup,
    context_settings=CONTEXT_SETTINGS,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click output: usage errors read as click's own ("Error: No such option: --x (Possible
    # options: ...)"), one grep-able line in a log instead of a drawn box.
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        from moe import __version__

        typer.echo(f"lora-moe (wan-lora-moe) {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True, callback=_print_version),
) -> None:
    pass
