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


def _register_commands() -> None:
    # Imported for their side effect of adding commands to `app`; kept lazy so that
    # `import moe.cli` stays cheap and the heavy modules load only for the command that runs.
    from moe.cli import checkpoints, data  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    _register_commands()
    try:
        rv = app(args=argv, standalone_mode=False)
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
