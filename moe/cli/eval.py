"""`lora-moe eval` (base vs stage 1 vs stage 2, a report and a promotion gate) and
`lora-moe eval multiplier-sweep` (held-out loss per stage-1 merge strength), with options from
`moe.config.eval`. The exit code is 0 whether the gate passes or not: the verdict is in the report."""

from __future__ import annotations

import typer

from moe.cli.app import app
from moe.cli.config_command import config_command
from moe.config.eval import EvalConfig, SweepConfig


def _run_eval(cfg: EvalConfig) -> None:
    from moe.eval import evaluate

    report = evaluate(cfg)
    for warning in report.warnings:
        typer.echo(f"warning: {warning}", err=True)
    verdict = "passed" if report.gate.passed else "FAILED (" + ", ".join(c.name for c in report.gate.failed) + ")"
    primary = report.gate.primary_value
    typer.echo(f"eval done: gate {verdict}; {report.gate.primary_metric} = " + ("not measured" if primary is None else f"{primary:.4f}"))
    typer.echo(f"report: {cfg.output_dir / 'report.md'} (numbers: {cfg.output_dir / 'eval_report.json'})")


def _run_sweep(cfg: SweepConfig) -> None:
    from moe.eval import multiplier_sweep

    result = multiplier_sweep(cfg)
    typer.echo(result.table())
    if cfg.output_dir is not None:
        typer.echo(f"wrote {cfg.output_dir}")


eval_app = config_command(
    app,
    "eval",
    EvalConfig,
    _run_eval,
    help="Evaluate base vs stage 1 vs stage 2 on held-out clips: eval_report.json, report.md, plots, samples and the promotion gate's verdict.",
    group=True,
)
config_command(
    eval_app,
    "multiplier-sweep",
    SweepConfig,
    _run_sweep,
    help="Held-out loss of the base DiTs with the stage-1 LoRA merged in memory at each --multipliers strength; recommends one.",
)
