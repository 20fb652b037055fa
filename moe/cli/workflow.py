"""`lora-moe workflow run`: the whole two-stage workflow on the embedded tiny default."""

from __future__ import annotations

import typer

from moe.cli.app import app
from moe.cli.config_command import config_command
from moe.config.workflow import WorkflowConfig

workflow_app = typer.Typer(help="Run the whole workflow.", no_args_is_help=True)
app.add_typer(workflow_app, name="workflow")


def _run_workflow(cfg: WorkflowConfig) -> None:
    from moe.runtime.progress import format_number
    from moe.tiny.workflow import run_workflow

    summary = run_workflow(cfg)
    typer.echo("summary:")
    width = max(map(len, summary))
    for name, value in summary.items():  # numbers with 4 significant digits, one per line
        typer.echo(f"  {name:<{width}}  {format_number(value)}")
    if "eval_report" in summary:
        typer.echo(f"eval report: {summary['eval_report']} (gate {'passed' if summary['gate_passed'] else 'FAILED'})")


config_command(
    workflow_app,
    "run",
    WorkflowConfig,
    _run_workflow,
    help="Tiny model set -> synthetic data -> cache -> stage 1 -> merge both experts -> stage 2 -> eval.",
)
