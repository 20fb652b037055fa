"""`lora-moe registry list|show|promote`: the registered LoRA-MoE models, from the command line.

A plugin command group (entry point `lora_moe.cli: registry`), so the core `moe` CLI never
imports MLflow. The registry is `--tracking_uri`'s, else MLFLOW_TRACKING_URI's.

    lora-moe registry list
    lora-moe registry show wan22-surgical-lora-moe@champion
    lora-moe registry promote wan22-surgical-lora-moe 3 --alias champion [--force]
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Annotated

import typer

from moe.errors import MoeError

app = typer.Typer(help="Registered LoRA-MoE models (MLflow registry): list, show, promote.", no_args_is_help=True)

TrackingOption = Annotated[str | None, typer.Option("--tracking_uri", help="MLflow tracking/registry URI [default: MLFLOW_TRACKING_URI].")]


def _client(tracking_uri: str | None):
    from tasks.registry.tracking import mlflow_client, quiet_mlflow_output

    quiet_mlflow_output()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise MoeError("no registry given: pass --tracking_uri URI or set MLFLOW_TRACKING_URI (http://mlflow:5000, sqlite:///mlflow.db)")
    return mlflow_client(uri)


def _mlflow_errors(action: str):
    """MLflow's exceptions (an unreachable server, a bad request) as one MoeError line."""
    import contextlib

    from mlflow.exceptions import MlflowException

    @contextlib.contextmanager
    def guard():
        try:
            yield
        except MlflowException as e:
            raise MoeError(f"{action}: {str(e.message).splitlines()[0]}") from None

    return guard()


def _when(millis: int | None) -> str:
    return datetime.fromtimestamp(millis / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC") if millis else "?"


def describe(version, artifacts: dict[str, dict] | None = None) -> dict:
    """What `show` prints, as a mapping (also its `--json` output). `artifacts`: the version's
    refs (`tasks.registry.versions.version_artifacts`); without them, only those its tags name (the
    `artifact.*` tags of versions registered before artifacts.json)."""
    tags = dict(version.tags)
    if artifacts is None:
        artifacts = {}
        for key, value in tags.items():
            if key.startswith("artifact."):
                name, _, field = key.removeprefix("artifact.").rpartition(".")
                artifacts.setdefault(name, {})[field] = value
    return {
        "name": version.name,
        "version": str(version.version),
        "aliases": sorted(version.aliases),
        "created": _when(version.creation_timestamp),
        "gate_passed": {"true": True, "false": False}.get(tags.get("gate.passed")),
        "champion_decision": tags.get("champion_decision", ""),
        "metrics": {k.removeprefix("metric."): float(v) for k, v in sorted(tags.items()) if k.startswith("metric.")},
        "data_fingerprint": tags.get("data_fingerprint"),
        "package_version": tags.get("package_version"),
        "prefect_flow_run_id": tags.get("prefect.flow_run_id"),
        "run_id": version.run_id,
        "source": version.source,
        "artifacts": {k: {f: str(v) for f, v in ref.items() if f in ("uri", "sha256", "size")} for k, ref in sorted(artifacts.items())},
        "promoted": {k.removeprefix("promoted."): v for k, v in tags.items() if k.startswith("promoted.")},
    }


@app.command("list")
def list_models(
    name: Annotated[str | None, typer.Option("--name", help="Only this registered model.")] = None,
    tracking_uri: TrackingOption = None,
) -> None:
    """Every version of every registered model (or of --name): aliases, gate, primary metric."""
    client = _client(tracking_uri)
    with _mlflow_errors(f"cannot list the registry at {client.tracking_uri}"):
        names = [name] if name else sorted(m.name for m in client.search_registered_models())
        if not names:
            typer.echo(f"no registered models at {client.tracking_uri}")
            return
        for model_name in names:
            versions = sorted(client.search_model_versions(f"name = '{model_name}'"), key=lambda v: -int(v.version))
            if not versions:
                raise MoeError(f"no registered model {model_name!r} at {client.tracking_uri}")
            aliases_of: dict[str, list[str]] = {}  # search results carry no aliases; the model does
            for alias, number in client.get_registered_model(model_name).aliases.items():
                aliases_of.setdefault(str(number), []).append(alias)
            typer.echo(f"{model_name} ({len(versions)} versions)")
            for v in versions:
                info = describe(v) | {"aliases": sorted(aliases_of.get(str(v.version), []))}
                gate = {True: "passed", False: "FAILED", None: "-"}[info["gate_passed"]]
                primary = next(iter(k for k in info["metrics"] if k == "stage2_learned_roi_loss"), None)
                figure = f"stage2_learned_roi_loss {info['metrics'][primary]:.4g}" if primary else ""
                aliases = ",".join(info["aliases"]) or "-"
                typer.echo(
                    f"  v{info['version']:<4} {aliases:<20} gate {gate:<7} {info['created']}  "
                    f"data {str(info['data_fingerprint'])[:12]}  {figure}".rstrip()
                )


@app.command("show")
def show(
    model: Annotated[str, typer.Argument(help="NAME@ALIAS, NAME/VERSION or models:/NAME@ALIAS.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print it as JSON.")] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """One version: aliases, eval metrics, gate verdict, data fingerprint and every artifact URI."""
    from tasks.registry.versions import get_version, parse_model_ref, version_artifacts

    client = _client(tracking_uri)
    name, which = parse_model_ref(model)
    with _mlflow_errors(f"cannot read {model} from {client.tracking_uri}"):
        version = get_version(client, name, which)
        info = describe(version, version_artifacts(version, client.tracking_uri))
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    gate = {True: "passed", False: "FAILED", None: "not recorded"}[info["gate_passed"]]
    typer.echo(f"{info['name']} version {info['version']}  aliases: {', '.join(info['aliases']) or 'none'}  ({info['created']})")
    typer.echo(f"gate: {gate}; {info['champion_decision']}")
    for alias, note in info["promoted"].items():
        typer.echo(f"promoted to {alias} {note}")
    typer.echo(
        f"data fingerprint {info['data_fingerprint']}, package {info['package_version']}, "
        f"Prefect flow run {info['prefect_flow_run_id']}, MLflow run {info['run_id']}"
    )
    typer.echo(f"bundle: {info['source']}")
    typer.echo("metrics:")
    for metric, value in info["metrics"].items():
        typer.echo(f"  {metric:<48} {value:.6g}")
    typer.echo("artifacts:")
    for artifact, fields in info["artifacts"].items():
        typer.echo(f"  {artifact:<20} {fields.get('uri', '?')}  sha256 {fields.get('sha256', '?')[:16]}")


@app.command("promote")
def promote(
    name: Annotated[str, typer.Argument(help="Registered model name.")],
    version: Annotated[str, typer.Argument(help="Version number.")],
    alias: Annotated[str, typer.Option("--alias", help="Alias to move to the version.")] = "champion",
    force: Annotated[bool, typer.Option("--force", help="Make it champion although its eval gate failed.")] = False,
    tracking_uri: TrackingOption = None,
) -> None:
    """Move an alias (champion by default) to a version; champion needs a passed gate unless --force."""
    from tasks.registry.versions import promote as move

    if not version.isdigit():
        raise MoeError(f"VERSION must be a version number, got {version!r} (see `lora-moe registry list`)")
    client = _client(tracking_uri)
    with _mlflow_errors(f"cannot promote {name} v{version} at {client.tracking_uri}"):
        typer.echo(move(client, name, version, alias, force))
