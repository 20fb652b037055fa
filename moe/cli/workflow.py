"""`lora-moe workflow run`: the whole two-stage workflow on the embedded tiny default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe.cli.app import app
from moe.cli.options import CheckedCommand, number
from moe.config.file_names import OVERWRITE_HELP
from moe.config.numbers import PretrainSteps, Seed
from moe.config.workflow import TINY_PRETRAIN_STEPS

workflow_app = typer.Typer(help="Run the whole workflow.", no_args_is_help=True)
app.add_typer(workflow_app, name="workflow")


@workflow_app.command("run", cls=CheckedCommand)
def workflow_run(
    output_dir: Annotated[Path, typer.Option("--output_dir", help="Folder for every artifact.")],
    preset: Annotated[str, typer.Option("--preset", help="tiny (= tiny-t2v) or tiny-i2v.")] = "tiny",
    until: Annotated[str, typer.Option("--until", help="Stop after: data, cache, stage1, merge, stage2, eval.")] = "eval",
    seed: Annotated[int, typer.Option("--seed", **number(Seed))] = 0,
    pretrain_steps: Annotated[
        int,
        typer.Option(
            "--pretrain_steps",
            help="Pre-train each tiny base DiT this many steps on synthetic clips of its own, as a "
            "real base is pretrained (about 3 min on 2 cores; 0: random DiTs, fast, but they draw no instrument).",
            **number(PretrainSteps),
        ),
    ] = TINY_PRETRAIN_STEPS,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bars.")] = False,
) -> None:
    """Tiny model set -> synthetic data -> cache -> stage 1 -> merge both experts -> stage 2 -> eval."""
    from moe.config.loader import build_config
    from moe.config.workflow import WorkflowConfig
    from moe.runtime.progress import format_number
    from moe.tiny.workflow import run_workflow

    options = dict(
        output_dir=output_dir, preset=preset, until=until, seed=seed, pretrain_steps=pretrain_steps, overwrite=overwrite, progress=not quiet
    )
    cfg = build_config(WorkflowConfig, {}, options)
    summary = run_workflow(cfg)
    typer.echo("summary:")
    width = max(map(len, summary))
    for name, value in summary.items():  # numbers with 4 significant digits, one per line
        typer.echo(f"  {name:<{width}}  {format_number(value)}")
    if "eval_report" in summary:
        typer.echo(f"eval report: {summary['eval_report']} (gate {'passed' if summary['gate_passed'] else 'FAILED'})")
