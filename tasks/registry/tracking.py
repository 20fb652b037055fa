"""MLflow tracking for the pipeline: one parent run per flow run, one nested run per stage.

Everything goes through an explicit `MlflowClient` (never the fluent API's global "active
run"), so the concurrent merge tasks cannot log into each other's runs. Params are the stage
configs, metrics the trainer's per-step and per-epoch losses (mirrored from `train_log.jsonl`)
and the held-out/eval numbers; small files are logged as artifacts; merged DiTs are recorded by
URI and sha256 tags only, never copied into MLflow.

Outages surface in minutes: MLflow's own client retries a request 7 times with a backoff factor
of 2 and waits 120 s for each answer, so a dead tracking server takes about 4 minutes per request
to fail a stage (and a run makes many requests). The flow bounds its requests with
`TrackingSettings.request_*` (MLflow's MLFLOW_HTTP_REQUEST_* variables, for the run's duration);
command-line use (`lora-moe registry`, `generate --model`) gets the same defaults unless those
variables are set. A request that still fails because the server cannot be reached raises
`TrackingUnavailable`, one sentence naming the server, what went wrong and the limits used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from moe.errors import MoeError
from tasks.artifacts.refs import ArtifactRef

DEFAULT_EXPERIMENT = "wan-lora-moe"
DEFAULT_MODEL_NAME = "wan22-surgical-lora-moe"
PARAM_LIMIT = 6000  # MLflow's longest param value
BATCH_LIMITS = {"params": 100, "tags": 100, "metrics": 1000}  # MLflow's most per log_batch call
# The experiment tag MLflow 3's UI reads for an experiment's kind: "custom_model_development" is
# model training (runs, metrics, models), not GenAI (traces); the UI's kind selector writes it.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow 3.17's UI ignores that tag for the view: it follows one switch for all experiments
# ("GenAI" | "Model training", kept in the browser's local storage, GenAI at first), which a URL
# can set (`?workflowType=machine_learning`). Every link the pipeline writes carries it.
UI_VIEW = "workflowType=machine_learning"
DIGEST_CHARS = 16  # of a sha256, as a dataset digest (MLflow keeps at most 36 characters)


REQUEST_LIMITS = {  # TrackingSettings field -> MLflow's environment variable
    "request_max_retries": "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "request_backoff_factor": "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "request_timeout_s": "MLFLOW_HTTP_REQUEST_TIMEOUT",
}


class TrackingUnavailable(MoeError):
    """The MLflow tracking server cannot be reached (after the bounded retries)."""


class TrackingSettings(BaseModel):
    """Where runs and registered models go, and how long the MLflow client tries to reach them."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (http://..., sqlite:///...). Default: the worker's MLFLOW_TRACKING_URI, else "
        "sqlite:///ARTIFACT_ROOT/mlflow.db for a local artifact root, sqlite:///WORK_DIR/mlflow.db (this machine only) "
        "for an S3 root.",
    )
    experiment: str = Field(DEFAULT_EXPERIMENT, description="MLflow experiment of the pipeline runs.")
    registered_model: str = Field(DEFAULT_MODEL_NAME, description="Registered model that gets one version per run.")
    ui_url: str | None = Field(
        None,
        description="Base URL of the MLflow UI, for links in the run summary. Default: LORA_MOE_MLFLOW_UI_URL, "
        "else an http(s) tracking URI, else http://127.0.0.1:5000.",
    )
    request_max_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of each request to an MLflow tracking server (MLflow's default, 7, takes "
        "about 4 minutes per request to give up on a dead server).",
    )
    request_backoff_factor: int = Field(1, ge=0, le=10, description="Seconds before the second retry, doubling after.")
    request_timeout_s: int = Field(30, ge=1, le=600, description="Seconds to wait for each answer of the tracking server.")

    def request_environment(self) -> dict[str, str]:
        """MLflow's MLFLOW_HTTP_REQUEST_* variables for these limits."""
        return {variable: str(getattr(self, field)) for field, variable in REQUEST_LIMITS.items()}  # MLflow reads ints

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
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}?{UI_VIEW}"

    def artifact_page_url(self, run_id: str, path: str) -> str:
        """The MLflow UI page showing one of a run's artifacts."""
        return f"{self.ui_url.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}/artifacts/{path}?{UI_VIEW}"

    def version_url(self, name: str, version: str) -> str:
        """The MLflow UI page of a registered model version."""
        return f"{self.ui_url.rstrip('/')}/#/models/{name}/versions/{version}?{UI_VIEW}"


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


def bound_mlflow_requests(settings: TrackingSettings) -> Callable[[], None]:
    """Set MLflow's request limits to `settings`' until the returned function is called (the
    flow's duration; its stages run in its process)."""
    before = {variable: os.environ.get(variable) for variable in REQUEST_LIMITS.values()}
    os.environ.update(settings.request_environment())

    def restore() -> None:
        for variable, value in before.items():
            if value is None:
                os.environ.pop(variable, None)
            else:
                os.environ[variable] = value

    return restore


def default_mlflow_request_limits() -> None:
    """For command-line use: the pipeline's default limits, unless MLFLOW_HTTP_REQUEST_* are set."""
    for variable, value in TrackingSettings().request_environment().items():
        os.environ.setdefault(variable, value)


def unreachable_reason(error: BaseException) -> str | None:
    """Why the tracking server could not be reached, when `error` says it could not (an MLflow
    request that failed in transport or with repeated server errors); None for other errors."""
    message = str(error)
    if not re.match(r"API request to \S+ failed with", message):
        return None
    if "timed out" in message or "timeout" in message.lower():
        return "it did not answer in time"
    if "Connection refused" in message:
        return "connection refused"
    if "Name or service not known" in message or "nodename nor servname" in message or "getaddrinfo" in message:
        return "its host name does not resolve"
    if "too many" in message and "error responses" in message:
        return "it kept answering with server errors"
    if "Max retries exceeded" in message or "Connection" in message:
        return "the connection failed"
    return message.split(" failed with ", 1)[1][:200]


class _GuardedClient:
    """An MlflowClient whose calls raise `TrackingUnavailable` (one sentence naming the server)
    when the tracking server cannot be reached; every other error passes unchanged (the registry
    code tells "not found" from other answers by MlflowException)."""

    def __init__(self, client, tracking_uri: str):
        self._client, self._uri = client, tracking_uri

    def __getattr__(self, name: str):
        attribute = getattr(self._client, name)
        if not callable(attribute):
            return attribute

        @functools.wraps(attribute)
        def call(*args, **kwargs):
            try:
                return attribute(*args, **kwargs)
            except Exception as e:
                reason = unreachable_reason(e)
                if reason is None:
                    raise
                limits = {v: os.environ.get(v) for v in REQUEST_LIMITS.values()}
                raise TrackingUnavailable(
                    f"MLflow tracking server {self._uri} is unreachable ({reason}) after "
                    f"{limits['MLFLOW_HTTP_REQUEST_MAX_RETRIES'] or 'default'} retries with a "
                    f"{limits['MLFLOW_HTTP_REQUEST_TIMEOUT'] or 'default'} s timeout each "
                    "(tracking.request_max_retries / request_timeout_s)"
                ) from None

        return call


_clients: dict[str, object] = {}
_clients_lock = threading.Lock()


def mlflow_client(tracking_uri: str):
    """One MlflowClient per URI, tracking and registry on the same store; an unreachable
    tracking server is a `TrackingUnavailable` error. A SQLite store is created (or migrated)
    under a file lock: two processes creating one at once fail in MLflow's schema migration
    ("table ... already exists"), so the second waits for the first."""
    with _clients_lock:
        if tracking_uri not in _clients:
            from mlflow import MlflowClient

            database = sqlite_path(tracking_uri)
            if database is None:
                client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            else:
                with _file_lock(database.with_name(database.name + ".lock")):
                    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)  # creates the tables
                    client.search_registered_models(max_results=1)  # and the registry's (on first use)
            _clients[tracking_uri] = _GuardedClient(client, tracking_uri) if is_tracking_server(tracking_uri) else client
        return _clients[tracking_uri]


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///PATH` URI (None for other URIs and in-memory ones)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path).absolute() if path and path != ":memory:" else None


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (made if missing) across processes; waits for its holder."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


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


def _git_head(checkout: Path) -> str | None:
    """The commit `checkout`'s HEAD names (read from .git, no git binary needed); None when it
    is not a git checkout."""
    git = checkout / ".git"
    if git.is_file():  # a worktree: "gitdir: PATH"
        text = git.read_text().strip()
        git = (checkout / text.removeprefix("gitdir:").strip()) if text.startswith("gitdir:") else git
    try:
        head = (git / "HEAD").read_text().strip()
    except OSError:
        return None
    if not head.startswith("ref:"):
        return head if re.fullmatch(r"[0-9a-f]{40}", head) else None
    ref = head.removeprefix("ref:").strip()
    common = git
    if (git / "commondir").is_file():
        common = (git / (git / "commondir").read_text().strip()).resolve()
    for folder in (git, common):
        try:
            return (folder / ref).read_text().strip()
        except OSError:
            pass
        try:
            for line in (folder / "packed-refs").read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split(" ", 1)[0]
        except OSError:
            pass
    return None


@functools.cache
def code_version() -> dict[str, str]:
    """Tags naming the code a run used: MLflow's `mlflow.source.git.commit` when the package is a
    git checkout (the README's `pip install -e .`), and always the package version."""
    import moe

    tags = {"lora_moe.version": moe.__version__}
    commit = _git_head(Path(moe.__file__).resolve().parent.parent)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def dataset_input(name: str, sha256: str, uri: str, context: str, profile: dict | None = None):
    """An MLflow run input for a data set known by URI and content hash (the run's "Datasets"):
    digest = the hash's first DIGEST_CHARS characters, the full hash in the profile."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    source_type = "s3" if uri.startswith("s3://") else "http" if uri.startswith(("http://", "https://")) else "local"
    dataset = Dataset(
        name=name,
        digest=sha256[:DIGEST_CHARS],
        source_type=source_type,
        source=json.dumps({"uri": uri}),
        profile=json.dumps({"sha256": sha256} | (profile or {})),
    )
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])


def clip_datasets(dataset, cache: ArtifactRef | None, context: str) -> list:
    """The clips (manifest URI, data fingerprint) and their latent cache as MLflow run inputs."""
    clips = sum(1 for path in dataset.files if path.endswith(".mp4"))
    inputs = [dataset_input("clips", dataset.fingerprint, dataset.manifest.uri, context, {"clips": clips, "files": len(dataset.files) + 1})]
    if cache is not None:
        inputs.append(dataset_input("latent_cache", cache.sha256, cache.uri, context, {"bytes": cache.size}))
    return inputs


def log_datasets(tracking_uri: str, run_id: str, inputs: list) -> None:
    """Run inputs (`dataset_input`); one already logged on the run is not logged twice."""
    mlflow_client(tracking_uri).log_inputs(run_id, datasets=inputs)


# Nodes of the lineage graph: artifact name -> (logged model name, model type)
LINEAGE_MODELS = {
    "base_dit": ("base-dit-low-noise", "base DiT"),
    "base_dit_high_noise": ("base-dit-high-noise", "base DiT"),
    "vanilla_lora": ("stage1-lora", "vanilla LoRA"),
    "merged_low_noise": ("merged-dit-low-noise", "merged DiT"),
    "merged_high_noise": ("merged-dit-high-noise", "merged DiT"),
}
# Edges: the stage run that made an artifact (by its name) read these artifacts
LINEAGE_INPUTS = {
    "vanilla_lora": ("base_dit", "base_dit_high_noise"),
    "merged_low_noise": ("base_dit", "vanilla_lora"),
    "merged_high_noise": ("base_dit_high_noise", "vanilla_lora"),
    "lora_moe": ("merged_low_noise", "merged_high_noise"),
}


def record_lineage(
    tracking_uri: str,
    experiment_id: str,
    artifacts: dict[str, ArtifactRef],
    producers: dict[str, str],
    bundle_model_id: str,
    parent_run_id: str | None = None,
) -> dict[str, str]:
    """The lineage base DiTs -> stage-1 LoRA -> merged DiTs -> stage-2 LoRA-MoE as MLflow 3 logged
    models and run inputs/outputs: each stage run (`producers`: artifact name -> the run that
    wrote it) gets its inputs and its output as models, the LoRA-MoE being the registered
    bundle's logged model (also an output of the pipeline's `parent_run_id`). The big files stay
    where they are: a node holds no artifacts, only the ref (URI, sha256, size) as tags. A node
    whose sha256 an earlier registration recorded in this experiment is reused, so versions that
    share a base DiT or a stage 1 share its node. Returns artifact name -> logged model id."""
    from mlflow.entities import LoggedModelInput, LoggedModelOutput, LoggedModelStatus

    client = mlflow_client(tracking_uri)
    nodes, new = {"lora_moe": bundle_model_id}, {"lora_moe"}
    for name, (model_name, model_type) in LINEAGE_MODELS.items():
        ref = artifacts.get(name)
        if ref is None:
            continue
        found = client.search_logged_models([experiment_id], filter_string=f"tags.`lora_moe.sha256` = '{ref.sha256}'", max_results=1)
        if found:
            nodes[name] = found[0].model_id
            continue
        model = client.create_logged_model(
            experiment_id,
            name=model_name,
            source_run_id=producers.get(name),
            model_type=model_type,
            tags={"lora_moe.uri": ref.uri, "lora_moe.sha256": ref.sha256, "lora_moe.size": str(ref.size), "lora_moe.kind": ref.kind},
        )
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        nodes[name], new = model.model_id, new | {name}
    for output, inputs in LINEAGE_INPUTS.items():
        run_id = producers.get(output)
        if run_id is None or output not in new or output not in nodes:
            continue  # made by an earlier registration's stage: its edges are recorded there
        client.log_inputs(run_id, models=[LoggedModelInput(nodes[i]) for i in inputs if i in nodes])
        client.log_outputs(run_id, [LoggedModelOutput(nodes[output], step=0)])
    if producers.get("eval_report"):  # what the eval measured
        client.log_inputs(producers["eval_report"], models=[LoggedModelInput(bundle_model_id)])
    if parent_run_id:  # the pipeline run's "Logged models"
        client.log_outputs(parent_run_id, [LoggedModelOutput(bundle_model_id, step=0)])
    return nodes


def artifact_url(ui_url: str, run_id: str, path: str) -> str:
    """A file of a run's artifacts as the MLflow server serves it (`/get-artifact`): a browser
    can show it (an image in a Prefect markdown artifact) when the UI URL is a tracking server."""
    from urllib.parse import urlencode

    return f"{ui_url.rstrip('/')}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id})}"


def _start_ticks(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, Linux), None when it does not exist:
    with the pid, it names one process even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_owner() -> dict[str, str]:
    """Tags naming this process (host, pid, start time), for a later run to tell whether the
    process that opened an MLflow run still lives."""
    import socket

    return {"lora_moe.host": socket.gethostname(), "lora_moe.pid": str(os.getpid()), "lora_moe.pid_started": _start_ticks(os.getpid()) or ""}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process named by `process_owner` tags still runs; None when it ran on another
    host (or the tags are missing)."""
    import socket

    if tags.get("lora_moe.host") != socket.gethostname() or not tags.get("lora_moe.pid", "").isdigit():
        return None
    pid = int(tags["lora_moe.pid"])
    if tags.get("lora_moe.pid_started"):
        return _start_ticks(pid) == tags["lora_moe.pid_started"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_abandoned_runs(client, experiment_id: str, flow_run_ended: Callable[[str], bool | None] | None = None) -> list[str]:
    """Mark KILLED the pipeline runs of this experiment left RUNNING by a flow run that is gone (and
    their stage runs): its process ran on this host and is dead, or `flow_run_ended(flow_run_id)`
    (Prefect's view) says the flow run ended. Runs whose owner cannot be told dead stay. Returns
    the ids closed."""
    running = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000)
    gone = set()
    for run in running:
        tags = run.data.tags
        if "mlflow.parentRunId" in tags:
            continue
        alive = owner_alive(tags)
        if alive is None and flow_run_ended is not None and tags.get("prefect.flow_run_id"):
            ended = flow_run_ended(tags["prefect.flow_run_id"])
            alive = None if ended is None else not ended
        if alive is False:
            gone.add(run.info.run_id)
    closed = []
    for run in running:
        if run.info.run_id in gone or run.data.tags.get("mlflow.parentRunId") in gone:
            client.set_tag(run.info.run_id, "lora_moe.closed", "KILLED by a later run: the flow run that opened it was gone")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def start_pipeline_run(
    settings: TrackingSettings,
    tracking_uri: str,
    artifact_location: str,
    tags: dict[str, str],
    params: dict,
    ui_url: str | None = None,
    flow_run_ended: Callable[[str], bool | None] | None = None,
) -> TrackingContext:
    """The parent run of one flow run (creating the experiment on first use). A new experiment
    keeps its artifacts at `artifact_location`, except on a tracking server, which stores them
    itself (`--serve-artifacts`: clients need no credentials for its store). Runs that crashed
    flow runs left RUNNING are closed first (`close_abandoned_runs`)."""
    client = mlflow_client(tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment)
    if experiment is None:
        location = None if is_tracking_server(tracking_uri) else artifact_location
        experiment_id = _create_experiment(client, settings.experiment, location)
    else:
        experiment_id = experiment.experiment_id
        if EXPERIMENT_KIND_TAG not in experiment.tags:  # made by an older version; a kind a person chose stays
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        close_abandoned_runs(client, experiment_id, flow_run_ended)
    run = client.create_run(experiment_id, tags=tags | code_version() | process_owner(), run_name=tags.get("prefect.flow_run_name"))
    _log(client, run.info.run_id, params=flatten(params))
    return TrackingContext(
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=run.info.run_id,
        ui_url=ui_url or settings.ui_url or "http://127.0.0.1:5000",
    )


def _create_experiment(client, name: str, artifact_location: str | None) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:  # created meanwhile by a concurrent run
        return client.get_experiment_by_name(name).experiment_id


def end_run(ctx: TrackingContext, run_id: str, status: str) -> None:
    mlflow_client(ctx.tracking_uri).set_terminated(run_id, status)


def _log(client, run_id: str, params: dict[str, str] | None = None, tags: dict[str, str] | None = None, metrics: list | None = None) -> None:
    from mlflow.entities import Metric, Param, RunTag

    batches = {
        "metrics": [Metric(k, float(v), ts, step) for k, v, ts, step in metrics or ()],
        "params": [Param(k, v) for k, v in (params or {}).items()],
        "tags": [RunTag(k, v) for k, v in (tags or {}).items()],
    }
    for kind, items in batches.items():  # MLflow refuses more than BATCH_LIMITS per call
        limit = BATCH_LIMITS[kind]
        for start in range(0, len(items), limit):
            client.log_batch(run_id, **{kind: items[start : start + limit]})


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
    run = client.create_run(ctx.experiment_id, run_name=stage, tags={"mlflow.parentRunId": ctx.parent_run_id, "stage": stage} | (tags or {}))
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
    default_mlflow_request_limits()
