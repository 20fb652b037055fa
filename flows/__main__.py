"""`python -m flows run`: the `lora-moe-pipeline` flow from the command line.

    python -m flows run --preset tiny --artifact_root outputs/demo
    python -m flows run --params pipeline.yaml --set stage1.max_train_epochs=3 --force stage2-train

Without PREFECT_API_URL, Prefect runs the flow on its local (ephemeral) API with the database
under PREFECT_HOME; the end of the run prints the registered version, its aliases and the two
commands that open the Prefect and MLflow UIs on what the run wrote.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Run the lora-moe-pipeline Prefect flow.")


@app.callback()
def main() -> None:
    """Run the lora-moe-pipeline Prefect flow (`run`)."""
    if os.environ.get("PREFECT_HOME"):  # Prefect makes only its last component (make demo's is outputs/demo/prefect)
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    if not os.environ.get("PREFECT_API_URL"):
        # The embedded default: Prefect's local API, started for this run. On a busy 2-core
        # machine it needs more than Prefect's 20 s to come up; its telemetry is off.
        os.environ.setdefault("PREFECT_SERVER_ALLOW_EPHEMERAL_MODE", "true")
        os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
        os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _set(params: dict, assignment: str) -> None:
    """`a.b.c=value` (value parsed as YAML) into nested dicts."""
    path, sep, value = assignment.partition("=")
    if not sep or not path:
        raise typer.BadParameter(f"--set needs NAME=VALUE (e.g. stage1.max_train_epochs=3), got {assignment!r}")
    *parents, leaf = path.split(".")
    node = params
    for name in parents:
        node = node.setdefault(name, {})
        if not isinstance(node, dict):
            raise typer.BadParameter(f"--set {assignment}: {name} is not a group of settings")
    node[leaf] = yaml.safe_load(value)


def pipeline_parameters(params_file: Path | None, assignments: list[str], **given) -> dict:
    params = {}
    if params_file is not None:
        try:
            params = yaml.safe_load(params_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise typer.BadParameter(f"cannot read --params {params_file}: {e}") from None
        if not isinstance(params, dict):
            raise typer.BadParameter(f"--params {params_file} must hold a mapping of parameter names to values")
    params |= {k: v for k, v in given.items() if v is not None}
    for assignment in assignments:
        _set(params, assignment)
    return params


def ui_commands(summary) -> list[str]:
    prefect_home = os.environ.get("PREFECT_HOME", str(Path.home() / ".prefect"))
    return [
        f"PREFECT_HOME={Path(prefect_home).absolute()} prefect server start",
        f"mlflow ui --backend-store-uri {summary.tracking_uri}",
    ]


@app.command("run")
def run(
    preset: Annotated[str | None, typer.Option("--preset", help="tiny, tiny-i2v, t2v-A14B, i2v-A14B, ti2v-5B.")] = None,
    artifact_root: Annotated[str | None, typer.Option("--artifact_root", help="s3://bucket/prefix or a folder.")] = None,
    params: Annotated[Path | None, typer.Option("--params", help="YAML file of flow parameters.")] = None,
    assignments: Annotated[list[str], typer.Option("--set", help="NAME=VALUE, e.g. stage1.max_train_epochs=3.")] = [],  # noqa: B006
    force: Annotated[str | None, typer.Option("--force", help="Recompute from this stage on.")] = None,
) -> None:
    """Run the pipeline once and print what it registered."""
    from prefect.exceptions import ParameterTypeError

    from flows.params import ModelInputs
    from flows.pipeline import check_models, lora_moe_pipeline, signature_problem
    from moe.errors import MoeError
    from tasks.launcher import StageFailed

    values = pipeline_parameters(params, assignments, preset=preset, artifact_root=artifact_root, force=force)
    if (problem := signature_problem(values)) is not None:
        typer.echo(f"error: invalid parameters: {problem}", err=True)
        sys.exit(2)
    try:  # bad parameters fail here, before any Prefect API or stage is started
        validation_log = logging.getLogger("prefect.flows")
        validation_log.disabled = True  # it would print the same errors as a multi-line dump
        try:
            checked = lora_moe_pipeline.validate_parameters(values)
        finally:
            validation_log.disabled = False
        check_models(checked.get("preset", "tiny"), checked.get("models") or ModelInputs())
    except ParameterTypeError as e:
        typer.echo("error: invalid parameters: " + " ".join(str(e).split()), err=True)
        sys.exit(2)
    except MoeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    try:
        summary = lora_moe_pipeline(**values)
    except StageFailed as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2 if e.user_error else 1)
    except MoeError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except Exception as e:  # parameter validation and other Prefect errors: one line, no traceback
        typer.echo(f"error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", err=True)
        sys.exit(1)
    entry = summary.registered
    if summary.skipped:
        typer.echo(f"nothing trained: {summary.skipped}; {entry.name} champion stays version {entry.version}")
        return
    typer.echo(f"registered {entry.name} version {entry.version}, aliases: {', '.join(entry.aliases) or 'none'}")
    typer.echo(f"  {entry.champion_decision}")
    typer.echo(f"  cached stages: {', '.join(summary.cached) or 'none'}")
    typer.echo("open the UIs on this run:")
    for command in ui_commands(summary):
        typer.echo(f"  {command}")


if __name__ == "__main__":
    app()
