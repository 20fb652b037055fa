"""`python -m flows run`: the `lora-moe-pipeline` flow from the command line.

    python -m flows run --preset tiny --artifact_root outputs/demo
    python -m flows run --params pipeline.yaml --set stage1.max_train_epochs=3 --force stage2-train

Without PREFECT_API_URL, Prefect runs the flow on its local (ephemeral) API with the database
under PREFECT_HOME; the end of the run (`last_screen`) prints what was registered (or that nothing is
new), the headline numbers and the gate, one report path that stays the same from run to run (a
local root's `latest-eval` link) and the commands that open the UIs and the registry in a new shell.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from pydantic import BaseModel
from typer.core import TyperCommand

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="Run the lora-moe-pipeline Prefect flow.")


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


LATEST_EVAL = "latest-eval"  # a local root's link to the newest run's eval folder


def headline_lines(metrics: dict[str, float], gate: dict) -> list[str]:
    """The headline numbers and the gate's checks, value against threshold."""
    from flows.surfaces import HEADLINE, headline_value
    from moe.runtime.progress import format_number

    def _number(value) -> str:
        return "n/a" if value is None else format_number(float(value))

    rows = [(words, headline_value(metrics, name, kind)) for name, words, kind in HEADLINE if name in metrics]
    width = max((len(words) for words, _ in rows), default=0)
    lines = [f"  {words.ljust(width)}  {value}" for words, value in rows]
    checks = gate.get("checks", [])
    if gate:
        verdict = "passed" if gate.get("passed") else "FAILED"
        lines.append(f"  promotion gate {verdict}: {sum(bool(c['passed']) for c in checks)}/{len(checks)} checks")
        lines += [f"    {'pass' if c['passed'] else 'FAIL'}  {c['name']} {_number(c['value'])} >= {_number(c['threshold'])}" for c in checks]
        lines += [f"    skip  {s['name']}: {s['reason']}" for s in gate.get("skipped", [])]
    return lines


def link_latest_eval(summary) -> Path | None:
    """On a local artifact root, point ROOT/latest-eval at this run's eval folder (a symlink replaced
    atomically), so that the report has one path that does not change from run to run."""
    from tasks.artifacts.local import local_path

    ref = summary.artifacts.get("eval_report")
    root = None if summary.artifact_root.startswith("s3://") else Path(local_path(summary.artifact_root))
    if ref is None or root is None:
        return None
    target = Path(local_path(ref.uri))
    link, tmp = root / LATEST_EVAL, root / f".{LATEST_EVAL}.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(target, root))
        os.replace(tmp, link)
    except OSError:  # a root on a file system without symlinks: the run's own path still works
        return target
    return link


def last_screen(summary, venv: Path | None = None) -> list[str]:
    """What `python -m flows run` prints at the end: what was registered (or that nothing is new),
    the headline numbers and the gate, where the report is, and commands that work in a fresh shell."""
    entry = summary.registered
    if summary.skipped:
        lines = [f"nothing trained: {summary.skipped}; {entry.name} v{entry.version} is still champion"]
    elif "register" in summary.cached:
        aliases = ", ".join(entry.aliases) or "no alias"
        lines = [f"nothing new: every stage was cached; {entry.name} v{entry.version} is still {aliases}"]
    else:
        lines = [f"registered {entry.name} v{entry.version}, aliases: {', '.join(entry.aliases) or 'none'}", f"  {entry.champion_decision}"]
    if summary.metrics:
        tiny = summary.task.startswith("tiny")
        lines += [
            f"headline ({int(summary.metrics.get('val_clips', 0))} held-out clips"
            + ("; tiny models: the numbers show that the pipeline works, not what a real model reaches" if tiny else "")
            + "):",
            *headline_lines(summary.metrics, summary.gate),
        ]
    report = link_latest_eval(summary)
    if report is not None:
        lines.append(f"report: {_shown(report / 'report.md')}  (samples: {_shown(report / 'samples')})")
    elif "eval_report" in summary.artifacts:
        lines.append(f"report: {summary.artifacts['eval_report'].uri}/report.md")
    if summary.report_url:
        lines.append(f"  in MLflow: {summary.report_url}")
    lines += ["look at it in a new shell:", *(f"  {c}" for c in shell_commands(summary, venv))]
    return lines


def _shown(path: Path) -> str:
    """A path relative to the current folder when it is below it (outputs/demo/...), else absolute."""
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path.absolute())


def model_uri(entry) -> str:
    """`models:/NAME@champion` when this version is the champion, else the version itself (a
    version that failed the gate is no alias's, and a champion may be another version)."""
    return f"models:/{entry.name}@champion" if "champion" in entry.aliases else f"models:/{entry.name}/{entry.version}"


def shell_commands(summary, venv: Path | None = None) -> list[str]:
    """Commands that work in a fresh shell: the venv activated, MLflow's store exported, both UIs."""
    from tasks.artifacts.local import local_path

    venv = venv if venv is not None else Path(sys.prefix)
    entry = summary.registered
    commands = []
    if sys.prefix != sys.base_prefix:  # running from a virtual environment: `prefect`, `mlflow` live there
        commands.append(f"source {_shown(venv / 'bin' / 'activate')}")
    commands.append(f"export MLFLOW_TRACKING_URI={summary.tracking_uri}")
    root = None if summary.artifact_root.startswith("s3://") else Path(local_path(summary.artifact_root))
    prefect_home = Path(os.environ.get("PREFECT_HOME", str(Path.home() / ".prefect"))).absolute()
    if root is not None and prefect_home == root / "prefect" and (Path.cwd() / "Makefile").is_file():
        out = _shown(root)
        commands.append(
            "make ui"
            + ("" if out == "outputs/demo" else f" OUT={out}")
            + "    # the Prefect and MLflow UIs on this run's stores (4200, 5000 when free)"
        )
    elif not os.environ.get("PREFECT_API_URL"):
        commands += [f"PREFECT_HOME={prefect_home} prefect server start", f"mlflow ui --backend-store-uri {summary.tracking_uri}"]
    commands += [
        "lora-moe registry list    # the registered versions, their aliases and gate verdicts",
        f"lora-moe generate --model {model_uri(entry)} --prompt '...' --save_path sample.mp4",
    ]
    return commands


def _leaf_names(model: type[BaseModel], prefix: str) -> list[str]:
    """`--set` names under `prefix` for a settings group: `prefix.{a, b}` for its own settings,
    one line per nested group (groups of one type share a line: `resources.{stage1, ...}.{gpus, ...}`)."""
    leaves, nested = [], {}
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            nested.setdefault(sub, []).append(name)
        else:
            leaves.append(name)
    lines = [f"{prefix}.{{{', '.join(leaves)}}}"] if leaves else []
    for sub, names in nested.items():
        lines += _leaf_names(sub, f"{prefix}.{names[0]}" if len(names) == 1 else f"{prefix}.{{{', '.join(names)}}}")
    return lines


def set_names() -> list[str]:
    """Every name `--set` takes, from the flow's own signature (its groups' fields), one line per
    group: what `run --help` lists."""
    import inspect

    from flows.pipeline import lora_moe_pipeline

    top, groups = [], []
    for name, parameter in inspect.signature(lora_moe_pipeline.fn, eval_str=True).parameters.items():
        annotation = parameter.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            groups += _leaf_names(annotation, name)
        else:
            top.append(name)
    return [", ".join(top), *groups]


class _RunCommand(TyperCommand):
    """`run --help` ends with the names `--set` takes (computed only for --help: the flow's
    module imports Prefect)."""

    def format_help(self, ctx, formatter) -> None:
        self.epilog = "--set takes these NAMEs (GROUP.NAME for a group's setting; --params files use the same names, nested):\n\n" + "\n\n".join(
            set_names()
        )
        super().format_help(ctx, formatter)


@app.command("run", cls=_RunCommand)
def run(
    preset: Annotated[str | None, typer.Option("--preset", help="tiny, tiny-i2v, t2v-A14B, i2v-A14B, ti2v-5B.")] = None,
    artifact_root: Annotated[str | None, typer.Option("--artifact_root", help="s3://bucket/prefix or a folder.")] = None,
    params: Annotated[Path | None, typer.Option("--params", help="YAML file of flow parameters.")] = None,
    assignments: Annotated[list[str], typer.Option("--set", help="NAME=VALUE, e.g. stage1.max_train_epochs=3 (the names are listed below).")] = [],  # noqa: B006
    force: Annotated[str | None, typer.Option("--force", help="Recompute from this stage on.")] = None,
) -> None:
    """Run the pipeline once and print what it registered."""
    from prefect.exceptions import ParameterTypeError

    from flows.params import ModelInputs, check_models
    from flows.pipeline import lora_moe_pipeline, signature_problem
    from moe.errors import MoeError
    from tasks.stages.launcher import StageFailed

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
    for line in last_screen(summary):
        typer.echo(line)


if __name__ == "__main__":
    app()
