"""`lora-moe workflow run`: the whole two-stage workflow on the embedded tiny default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moe.cli import app

workflow_app = typer.Typer(help="Run the whole workflow.", no_args_is_help=True)
app.add_typer(workflow_app, name="workflow")


@workflow_app.command("run")
def workflow_run(
    output_dir: Annotated[Path, typer.Option("--output_dir", help="Folder for every artifact.")],
    preset: Annotated[str, typer.Option("--preset", help="tiny (= tiny-t2v) or tiny-i2v.")] = "tiny",
    until: Annotated[str, typer.Option("--until", help="Stop after: data, cache, stage1, merge, stage2.")] = "stage2",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Tiny model set -> synthetic data -> cache -> stage 1 -> merge both experts -> stage 2."""
    from pydantic import ValidationError

    from moe.errors import MoeError
    from moe.workflow import WorkflowConfig, run_workflow

    try:
        cfg = WorkflowConfig(output_dir=output_dir, preset=preset, until=until, seed=seed, progress=not quiet)
    except ValidationError as e:
        raise MoeError("; ".join(f"--{err['loc'][0]}: {err['msg']}" for err in e.errors())) from None
    summary = run_workflow(cfg)
    typer.echo("summary:\n" + json.dumps(summary, indent=2))
