"""MLflow tracking for the pipeline: one parent run per flow run, one nested run per stage.

Everything goes through an explicit `MlflowClient` (never the fluent API's global "active
run"), so the concurrent merge tasks cannot log into each other's runs. Params are the stage
configs, metrics the trainer's per-step and per-epoch losses (mirrored from `train_log.jsonl`)
and the held-out/eval numbers; small files are logged as artifacts; merged DiTs are recorded by
URI and sha256 tags only, never copied into MLflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tasks.artifacts.refs import ArtifactRef

DEFAULT_EXPERIMENT = "wan-lora-moe"
DEFAULT_MODEL_NAME = "wan22-surgical-lora-moe"
PARAM_LIMIT = 6000  # MLflow's longest param value


class TrackingSettings(BaseModel):
    """Where runs and registered models go."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://..., sqlite:///...). Default: the worker's MLFLOW_TRACKING_URI, else "
        "sqlite:///ARTIFACT_ROOT/mlflow.db for a local artifact root, sqlite:///WORK_DIR/mlflow.db (this machine only) "
        "for an S3 root.",
    )
    experiment: str = Field(DEFAULT_EXPERIMENT, description="MLflow experiment of the pipeline runs.")
    registered_model: str = Field(DEFAULT_MODEL_NAME, description="Registered model that gets one version per run.")
    ui_url: str | None = Field(
        None, description="Base URL of the MLflow UI, for links in the run summary. Default: LORA_MOE_MLFLOW_UI_URL, "
        "else an http(s) tracking URI, else http://127.0.0.1:5000.",
    )

    def resolved_ui_url(self, tracking_uri: str, environ: dict[str, str]) -> str:
        if self.ui_url:
            return self.ui_url
        if environ.get("LORA_MOE_MLFLOW_UI_URL"):
            return environ["LORA_MOE_MLFLOW_UI_URL"]
        return tracking_uri if is_tracking_server(tracking_uri) else "http://127.0.0.1:5000"


def is_tracking_server(tracking_uri: str) -> bool:
    """An MLflow tracking server (which stores artifacts itself, proxied), not a database file."""
    return tracking_uri.startswith(("http://", "https://"))


class TrackingContext(BaseModel):
    """What a stage needs to log into the flow run's MLflow run (not part of any cache key)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    ui_url: str

    def run_url(self, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}"


def pin_mlflow_s3_endpoint(endpoint: str | None):
    """Point MLflow's own S3 client at the artifact store's endpoint until the returned
    function is called.

    MLflow caches its boto3 client for five minutes keyed by MLFLOW_S3_ENDPOINT_URL, not by
    boto3's AWS_ENDPOINT_URL_S3: a client made while only the latter was set (or nothing was)
    would be reused against the wrong endpoint. An MLFLOW_S3_ENDPOINT_URL the user set wins."""
    if endpoint is None or os.environ.get("MLFLOW_S3_ENDPOINT_URL"):
        return lambda: None
    os.environ["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    return lambda: os.environ.pop("MLFLOW_S3_ENDPOINT_URL", None)


_clients: dict[str, object] = {}
_clients_lock = threading.Lock()


def mlflow_client(tracking_uri: str):
    """One MlflowClient per URI, tracking and registry on the same store."""
    with _clients_lock:
        if tracking_uri not in _clients:
            from mlflow import MlflowClient

            _clients[tracking_uri] = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        return _clients[tracking_uri]


def flatten(values: dict, prefix: str = "") -> dict[str, str]:
    """Nested config dicts -> {"stage1.learning_rate": "0.01", ...}, values as MLflow params."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat |= flatten(value, f"{name}.")
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            flat[name] = text[:PARAM_LIMIT]
    return flat


def ref_tags(name: str, ref: ArtifactRef) -> dict[str, str]:
    return {f"artifact.{name}.uri": ref.uri, f"artifact.{name}.sha256": ref.sha256, f"artifact.{name}.size": str(ref.size)}


def start_pipeline_run(settings: TrackingSettings, tracking_uri: str, artifact_location: str, tags: dict[str, str],
                       params: dict, ui_url: str | None = None) -> TrackingContext:
    """The parent run of one flow run (creating the experiment on first use). A new experiment
    keeps its artifacts at `artifact_location`, except on a tracking server, which stores them
    itself (`--serve-artifacts`: clients need no credentials for its store)."""
    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        location = None if is_tracking_server(tracking_uri) else artifact_location
        experiment_id = _create_experiment(client, settings.experiment, location)
    else:
        experiment_id = experiment.experiment_id
    run = client.create_run(experiment_id, tags=tags, run_name=tags.get("prefect.flow_run_name"))
    _log(client, run.info.run_id, params=flatten(params))
    return TrackingContext(tracking_uri=tracking_uri, experiment_id=experiment_id, parent_run_id=run.info.run_id,
                           ui_url=ui_url or settings.ui_url or "http://127.0.0.1:5000")


def _create_experiment(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # created meanwhile by a concurrent run
        return client.get_experiment_by_name(name).experiment_id


def end_run(ctx: TrackingContext, run_id: str, status: str) -> None:
    mlflow_client(ctx.tracking_uri).set_terminated(run_id, status)


def _log(client, run_id: str, params: dict[str, str] | None = None, tags: dict[str, str] | None = None,
         metrics: list | None = None) -> None:
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), ts, step) for k, v, ts, step in metrics or ()],
        params=[Param(k, v) for k, v in (params or {}).items()],
        tags=[RunTag(k, v) for k, v in (tags or {}).items()],
    )


class StageRun:
    """A nested MLflow run of one stage."""

    def __init__(self, ctx: TrackingContext, run_id: str):
        self.ctx, self.run_id = ctx, run_id
        self.client = mlflow_client(ctx.tracking_uri)

    @property
    def url(self) -> str:
        return self.ctx.run_url(self.run_id)

    def log_params(self, params: dict) -> None:
        _log(self.client, self.run_id, params=flatten(params))

    def set_tags(self, tags: dict[str, str]) -> None:
        _log(self.client, self.run_id, tags=tags)

    def log_metrics(self, metrics: dict, step: int = 0, prefix: str = "") -> None:
        now = int(time.time() * 1000)
        numbers = [(f"{prefix}{k}", v, now, step) for k, v in metrics.items() if _is_number(v)]
        _log(self.client, self.run_id, metrics=numbers)

    def log_train_log(self, path: Path) -> dict[str, float]:
        """Mirror `train_log.jsonl`: every logged step's numbers at their step, and per epoch
        `epoch/loss` at the epoch number. Returns the last epoch's numbers."""
        series, last = [], {}
        for line in path.read_text().splitlines() if path.is_file() else ():
            record = json.loads(line)
            ts = int(record["time"] * 1000)
            if record["event"] == "step":
                series += [(k, v, ts, record["step"]) for k, v in record.items() if k.startswith("train/") and _is_number(v)]
            elif record["event"] == "epoch":
                series.append(("epoch/loss", record["loss"], ts, record["epoch"]))
                last = {"epoch": record["epoch"], "epoch/loss": record["loss"]}
        _log(self.client, self.run_id, metrics=series)
        return last

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@contextlib.contextmanager
def stage_run(ctx: TrackingContext, stage: str, tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """A nested run under the flow's parent run; FINISHED or FAILED when the block ends."""
    client = mlflow_client(ctx.tracking_uri)
    run = client.create_run(
        ctx.experiment_id, run_name=stage, tags={"mlflow.parentRunId": ctx.parent_run_id, "stage": stage} | (tags or {})
    )
    stage_run = StageRun(ctx, run.info.run_id)
    try:
        yield stage_run
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")


def quiet_mlflow_output() -> None:
    """For command-line use (`lora-moe registry`, `generate --model`): no MLflow progress bars or
    INFO lines on stderr, where the CLI promises one `error:` line for a failure."""
    import logging
    import os

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
