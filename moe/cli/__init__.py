"""The `lora-moe` command line. Each sub-module registers its commands on `app`."""

from __future__ import annotations

import sys

import click
import typer

from moe.errors import MoeError

app = typer.Typer(
    name="lora-moe",
    help="Two-stage LoRA-MoE fine-tuning of WAN2.2 video DiTs.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


# Commands generated from pydantic configs (plain click commands; see config_command.py).
config_commands: list[click.Command] = []


def _register_commands() -> None:
    # Imported for their side effect of adding commands to `app` or `config_commands`; each
    # module imports its heavy dependencies inside the command, so start-up stays cheap.
    from moe.cli import cache, checkpoints, data, training, workflow  # noqa: F401


def build_cli() -> click.Group:
    _register_commands()
    group = typer.main.get_command(app)
    for command in config_commands:
        group.add_command(command)
    return group


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        rv = build_cli().main(args=argv, prog_name="lora-moe", standalone_mode=False)
    except MoeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)
