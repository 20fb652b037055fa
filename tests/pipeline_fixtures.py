"""Fixtures of the pipeline tests (imported by conftest.py; each starts only when a test asks):
a real Prefect API (`prefect_test_harness`), S3 over HTTP from moto's `ThreadedMotoServer`, a
TCP relay in front of it that can be cut (an S3 outage), the tiny pipeline run on S3, and the
project's entry points (CLI plugins, model URI resolvers)."""

from __future__ import annotations

import os
import secrets
import socket
import threading
import tomllib
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Small enough for CI (2 cores), big enough to train, merge, route and evaluate.
SMALL_PIPELINE = {
    "models": {"tiny_pretrain_steps": 0},  # random tiny DiTs: the pipeline's plumbing, not what they learn
    "data": {"synthetic_clips": 8, "frames": 9, "size": "32x32"},
    "stage1": {"max_train_epochs": 1, "network_dim": 4},  # the default rank, set so stage 2 must repeat it
    "stage2": {"max_train_epochs": 1},
    # No generated clips: FVD/FID of a few clips cost minutes of CPU; the eval tests measure them.
    "evaluation": {"samples": 0, "metric_clips": 0, "bootstrap_samples": 200},
}


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect server for the whole session (10-20 s to start on 2 cores)."""
    from prefect.testing.utilities import prefect_test_harness

    # Its telemetry heartbeat writes to the server's SQLite database and can meet "database is
    # locked" on 2 busy cores (a logged traceback); as `python -m flows run`, without telemetry.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory):
    """One MLflow SQLite store (tracking + registry) for the session: creating its tables takes
    about 10 s on 2 cores. Tests keep apart by experiment and registered-model names."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="session")
def aws_env():
    """Fake credentials in the standard AWS chain; the secret and token are random so a test
    can look for them anywhere they must not be."""
    values = {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": f"secret-{secrets.token_hex(12)}",
        "AWS_SESSION_TOKEN": f"token-{secrets.token_hex(12)}",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in values.items():
            mp.setenv(key, value)
        yield values


@pytest.fixture(scope="session")
def moto_server(aws_env):
    """S3 over HTTP on a free port, reachable by any process (unlike `mock_aws`)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_endpoint(moto_server, monkeypatch):
    """The moto endpoint as boto3's environment gives it to every client (AWS_ENDPOINT_URL_S3),
    and to MLflow's own S3 client, whose cache is keyed by MLFLOW_S3_ENDPOINT_URL only."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", moto_server)
    return moto_server


@pytest.fixture
def bucket(s3_endpoint):
    """A fresh bucket on the moto endpoint."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


class CuttableRelay:
    """A TCP relay to an upstream endpoint; `cut()` closes the listener and every open
    connection at once, as an endpoint that goes away mid-run does."""

    def __init__(self, upstream: str):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


@pytest.fixture(scope="session")
def s3_pipeline(prefect_api, moto_server, mlflow_uri, tmp_path_factory):
    """The tiny pipeline on an S3 artifact root, run once for the session: endpoint from
    AWS_ENDPOINT_URL_S3 (the standard chain, as a worker would have it), MLflow on SQLite."""
    import boto3

    from flows.pipeline import lora_moe_pipeline

    bucket = f"pipeline-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=bucket)
    work = tmp_path_factory.mktemp("pipeline-work")
    params = SMALL_PIPELINE | {
        "artifact_root": f"s3://{bucket}/wan",
        "tracking": {"tracking_uri": mlflow_uri, "experiment": "s3-pipeline", "registered_model": "s3-pipeline-model"},
        "storage": {"work_dir": str(work), "s3": {"multipart_chunk_mib": 5}},
    }
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL_S3", moto_server)
        summary = lora_moe_pipeline(**params)
    return {
        "summary": summary,
        "params": params,
        "bucket": bucket,
        "work": work,
        "endpoint": moto_server,
        "tracking_uri": params["tracking"]["tracking_uri"],
    }


@pytest.fixture(scope="session")
def plugins(tmp_path_factory):
    """The entry points pyproject.toml declares (`lora-moe registry`, `generate --model`), visible
    to this process and its children. `pip install -e .` installs them; an environment installed
    from an older checkout lacks them, and then they are declared here, from pyproject.toml
    itself, as a minimal distribution on sys.path and PYTHONPATH."""
    from importlib.metadata import entry_points

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    if all(entry_points(group=group, name=name) for group, eps in declared.items() for name in eps):
        yield
        return
    folder = tmp_path_factory.mktemp("plugins")
    dist = folder / "wan_lora_moe_plugins-0.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: wan-lora-moe-plugins\nVersion: 0.0\n")
    (dist / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{name} = {value}\n" for name, value in eps.items()) + "\n" for group, eps in declared.items())
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(folder))
        mp.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
        yield


def registrar(mlflow_uri: str, tmp_path: Path, name: str):
    """(client, register): `register(loss, passed=True)` registers one version of `name` from an empty
    bundle, inside a `register` stage run of a fresh pipeline run, with `loss` as the primary metric."""
    import json

    from tasks.registry.tracking import TrackingSettings, mlflow_client, stage_run, start_pipeline_run
    from tasks.registry.versions import metric_tag, register_bundle

    ctx = start_pipeline_run(
        TrackingSettings(experiment=name),
        mlflow_uri,
        str(tmp_path / "artifacts"),
        {"prefect.flow_run_id": "test", "prefect.flow_run_name": "test"},
        {"stage1": {"lr": 0.1}},
    )
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(json.dumps({"artifacts": {}}))
    client = mlflow_client(mlflow_uri)

    def register(loss: float, passed: bool = True):
        with stage_run(ctx, "register") as run:
            return register_bundle(
                client, name, ctx.experiment_id, run.run_id, bundle, {metric_tag("loss"): repr(loss)}, passed, "loss", loss, higher_is_better=False
            )

    return client, register
