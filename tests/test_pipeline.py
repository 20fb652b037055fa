"""The tiny pipeline end to end on real parts: S3 over HTTP (moto's ThreadedMotoServer, reached
through AWS_ENDPOINT_URL_S3), a real Prefect API (prefect_test_harness), MLflow on SQLite with
the registry. One completed run (`s3_pipeline`) is shared; the fault tests start from it."""

import hashlib
import json
import os
import signal
import threading
import time
from pathlib import Path

import boto3
import pytest
from pipeline_fixtures import CuttableRelay

import moe
from tasks.artifacts.interface import StoreError
from tasks.artifacts.refs import FOLDER_MANIFEST
from tasks.registry.tracking import mlflow_client
from tasks.registry.versions import BUNDLE_PATH
from tasks.stages import launcher
from tasks.stages.launcher import StageFailed

# In the order they run: the clips first, whose fingerprint `only_new_data` checks before anything else.
STAGES = ["synth-data", "tiny-models", "prepare-data", "stage1-train", "merge-low", "merge-high", "stage2-train", "eval", "register"]


def _prefect():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def task_runs(flow_run_id: str) -> dict:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _prefect() as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {run.name: run for run in runs}


def flow_logs(flow_run_id: str) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    messages, offset = [], 0
    with _prefect() as client:
        while page := client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=offset):
            messages += [log.message for log in page]
            offset += len(page)
    return messages


def latest_flow_run():
    from prefect.client.schemas.sorting import FlowRunSort

    with _prefect() as client:
        return client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]


def _run(s3_pipeline, monkeypatch, endpoint=None, **changes):
    from flows.pipeline import lora_moe_pipeline

    params = json.loads(json.dumps(s3_pipeline["params"]))
    for group, values in changes.items():
        params[group] = params.get(group, {}) | values if isinstance(values, dict) else values
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint or s3_pipeline["endpoint"])
    return lora_moe_pipeline(**params)


def _when(condition, then) -> threading.Event:
    """A watcher thread that runs `then()` once `condition()` holds (polled every 20 ms)."""
    done = threading.Event()

    def watch():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if condition():
                then()
                done.set()
                return
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return done


def _sigkill(stage: str):
    """SIGKILL the running command of `stage`, as the OOM killer would."""
    for pid, name in dict(launcher._live).items():
        if name == stage:
            os.kill(pid, signal.SIGKILL)


def test_every_stored_object_is_verified(s3_pipeline):
    summary, bucket = s3_pipeline["summary"], s3_pipeline["bucket"]
    assert [s.name for s in summary.stages] == STAGES and all(s.state == "Completed" for s in summary.stages)
    s3 = boto3.client("s3", endpoint_url=s3_pipeline["endpoint"])
    prefix = f"wan/runs/{summary.flow_run_id}/"
    objects = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix) for o in page.get("Contents", [])]
    assert len(objects) > 20
    checked = 0
    for key in objects:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        if key.endswith(FOLDER_MANIFEST):
            folder = key.removesuffix(FOLDER_MANIFEST)
            for entry in json.loads(body)["files"]:
                data = s3.get_object(Bucket=bucket, Key=folder + entry["path"])["Body"].read()
                assert hashlib.sha256(data).hexdigest() == entry["sha256"], key
            continue
        tags = {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=key)["TagSet"]}
        assert tags["sha256"] == hashlib.sha256(body).hexdigest(), key
        checked += 1
    assert checked == len(objects) - sum(k.endswith(FOLDER_MANIFEST) for k in objects)
    for name, ref in summary.artifacts.items():
        assert ref.uri.startswith(f"s3://{bucket}/wan/runs/{summary.flow_run_id}/"), name
        if ref.layout == "file":
            body = s3.get_object(Bucket=bucket, Key=ref.uri.removeprefix(f"s3://{bucket}/"))["Body"].read()
            assert hashlib.sha256(body).hexdigest() == ref.sha256, name
    assert summary.artifacts["merged_low_noise"].kind == "merged_dit" and summary.artifacts["latent_cache"].layout == "folder"


def test_merges_ran_concurrently(s3_pipeline):
    summary = s3_pipeline["summary"]
    runs = task_runs(summary.flow_run_id)
    assert set(runs) == set(STAGES)
    low, high = runs["merge-low"], runs["merge-high"]
    assert low.start_time < high.end_time and high.start_time < low.end_time  # the intervals overlap
    by_name = {s.name: s for s in summary.stages}
    low_cmd, high_cmd = by_name["merge-low"], by_name["merge-high"]
    assert low_cmd.started < high_cmd.ended and high_cmd.started < low_cmd.ended


def test_registry_version_records_every_artifact(s3_pipeline, s3_endpoint, tmp_path, monkeypatch):
    import mlflow

    summary = s3_pipeline["summary"]
    client = mlflow_client(s3_pipeline["tracking_uri"])
    entry = summary.registered
    version = client.get_model_version(entry.name, entry.version)
    assert {
        "base_dit",
        "base_dit_high_noise",
        "base_vae",
        "vanilla_lora",
        "merged_low_noise",
        "merged_high_noise",
        "lora_moe",
        "eval_report",
        "latent_cache",
    } <= set(summary.artifacts)
    assert version.tags["data_fingerprint"] == summary.data_fingerprint
    assert version.tags["package_version"] == moe.__version__
    assert version.tags["lora_moe.sha256"] == summary.artifacts["lora_moe"].sha256  # every ref: artifacts.json
    primary = summary.gate["primary_metric"]
    assert float(version.tags[f"metric.{primary}"]) == pytest.approx(summary.metrics[primary])
    expected = ["candidate", "champion"] if summary.gate["passed"] else ["candidate"]
    assert sorted(version.aliases) == expected == entry.aliases
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s3_pipeline["tracking_uri"])
    model_dir = mlflow.artifacts.download_artifacts(f"models:/{entry.name}/{entry.version}", dst_path=str(tmp_path))
    bundle_dir = Path(model_dir) / BUNDLE_PATH
    bundle = json.loads((bundle_dir / "bundle.json").read_text())
    assert bundle["artifacts"]["merged_high_noise"]["sha256"] == summary.artifacts["merged_high_noise"].sha256
    refs = json.loads((Path(model_dir) / "artifacts.json").read_text())
    for name, ref in summary.artifacts.items():
        assert refs[name]["uri"] == ref.uri and refs[name]["sha256"] == ref.sha256, name
    assert bundle["task"] == "tiny-t2v" and version.tags["task"] == "tiny-t2v"
    lora = bundle_dir / "lora_moe_stage2.safetensors"
    assert hashlib.sha256(lora.read_bytes()).hexdigest() == summary.artifacts["lora_moe"].sha256
    assert not list(Path(model_dir).rglob("merged_*"))  # merged DiTs are referenced, never copied


def test_mlflow_runs_mirror_the_stages(s3_pipeline, s3_endpoint):
    summary = s3_pipeline["summary"]
    client = mlflow_client(s3_pipeline["tracking_uri"])
    experiment = client.get_experiment_by_name("s3-pipeline")
    runs = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{summary.flow_run_id}'")
    assert len(runs) == 1
    parent = runs[0]
    nested = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(nested) == set(STAGES)
    stage1 = nested["stage1-train"]
    assert float(stage1.data.params["learning_rate"]) == 1e-2 and stage1.data.params["max_train_epochs"] == "1"
    assert parent.data.params["stage2.network_dim"] == parent.data.params["stage1.network_dim"] == "4"  # stage 2 repeats stage 1's targets
    # Per-epoch and per-step losses are what the trainer logged (train_log.jsonl, stored in S3).
    s3 = boto3.client("s3", endpoint_url=s3_pipeline["endpoint"])
    key = f"wan/runs/{summary.flow_run_id}/stage1-train/train_log.jsonl"
    log = [json.loads(line) for line in s3.get_object(Bucket=s3_pipeline["bucket"], Key=key)["Body"].read().splitlines()]
    epochs = [r["loss"] for r in log if r["event"] == "epoch"]
    steps = [r["train/loss"] for r in log if r["event"] == "step"]
    assert [m.value for m in client.get_metric_history(stage1.info.run_id, "epoch/loss")] == pytest.approx(epochs)
    assert [m.value for m in client.get_metric_history(stage1.info.run_id, "train/loss")] == pytest.approx(steps)
    assert stage1.data.metrics["val/val_loss_final"] == pytest.approx(summary.metrics["stage1/val_loss_final"])
    files = {f.path for f in client.list_artifacts(stage1.info.run_id)}
    assert {"vanilla_lora.safetensors", "metrics.json", "tensorboard"} <= files
    merge = nested["merge-low"]
    assert client.list_artifacts(merge.info.run_id) == []  # referenced by URI and sha256 tags only
    assert merge.data.tags["artifact.merged_dit.sha256"] == summary.artifacts["merged_low_noise"].sha256
    assert parent.data.tags["registered_version"] == summary.registered.version


def test_prefect_artifacts(s3_pipeline):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    summary = s3_pipeline["summary"]
    with _prefect() as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[summary.flow_run_id])))
    by_type = {}
    for artifact in artifacts:
        by_type.setdefault(artifact.type, []).append(artifact)
    markdown = next(a.data for a in by_type["markdown"] if a.key == "lora-moe-pipeline-summary")
    assert f"v{summary.registered.version}" in markdown and summary.mlflow_run_url in markdown
    assert summary.artifacts["merged_low_noise"].uri in markdown
    assert {row["metric"] for row in json.loads(by_type["table"][0].data)} == set(summary.metrics)
    progress = {a.key: a.data for a in by_type["progress"]}
    assert progress["stage1-train-progress"] == 100.0 and progress["stage2-train-progress"] == 100.0


def test_secrets_appear_in_no_param_tag_or_log(s3_pipeline, aws_env):
    summary = s3_pipeline["summary"]
    client = mlflow_client(s3_pipeline["tracking_uri"])
    experiment = client.get_experiment_by_name("s3-pipeline")
    texts = []
    for run in client.search_runs([experiment.experiment_id]):
        texts += [*run.data.params.items(), *run.data.tags.items()]
    for version in client.search_model_versions(f"name = '{summary.registered.name}'"):
        texts += version.tags.items()
    logs = flow_logs(summary.flow_run_id)
    assert len(logs) > 50 and any("stage 1 done" in line for line in logs)  # the children's lines are there
    everything = "\n".join(map(str, texts + logs))
    for secret in (aws_env["AWS_SECRET_ACCESS_KEY"], aws_env["AWS_SESSION_TOKEN"]):
        assert secret not in everything
    with _prefect() as prefect:
        assert aws_env["AWS_SECRET_ACCESS_KEY"] not in json.dumps(prefect.read_flow_run(summary.flow_run_id).parameters)


def test_a_rerun_with_nothing_changed_is_all_cached(s3_pipeline, monkeypatch):
    client = mlflow_client(s3_pipeline["tracking_uri"])
    before = len(client.search_model_versions(f"name = '{s3_pipeline['summary'].registered.name}'"))
    again = _run(s3_pipeline, monkeypatch)  # its wall time is a bench figure (bench/pipeline_bench.py), not asserted
    runs = task_runs(again.flow_run_id)
    assert set(runs) == set(STAGES) and {r.state.name for r in runs.values()} == {"Cached"}
    assert again.cached == STAGES and again.registered == s3_pipeline["summary"].registered
    assert again.artifacts == s3_pipeline["summary"].artifacts
    assert len(client.search_model_versions(f"name = '{again.registered.name}'")) == before  # nothing new to register
    s3 = boto3.client("s3", endpoint_url=s3_pipeline["endpoint"])
    records = s3.list_objects_v2(Bucket=s3_pipeline["bucket"], Prefix="wan/prefect-results/")["Contents"]
    assert {r["Key"].rsplit("/", 1)[1].rsplit("-", 1)[0] for r in records} >= set(STAGES)  # the cache lives in the store


@pytest.fixture
def stale_mlflow_s3_client(monkeypatch):
    """MLflow's cached S3 client made before the endpoint was known (so: for AWS itself), as a
    worker's can be. MLflow keys that cache by MLFLOW_S3_ENDPOINT_URL only (for 5 minutes), not
    by boto3's AWS_ENDPOINT_URL_S3, so a run must pin the former (CI failed on this once)."""
    from mlflow.store.artifact import s3_artifact_repo

    s3_artifact_repo._cached_get_s3_client.cache_clear()
    with monkeypatch.context() as mp:
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
        assert "amazonaws.com" in s3_artifact_repo._get_s3_client().meta.endpoint_url
    yield
    s3_artifact_repo._cached_get_s3_client.cache_clear()


def test_force_recomputes_from_the_named_stage(s3_pipeline, stale_mlflow_s3_client, monkeypatch):
    from flows.pipeline import lora_moe_pipeline

    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_pipeline["endpoint"])
    forced = lora_moe_pipeline(**s3_pipeline["params"], force="register")
    assert {s.name: s.state for s in forced.stages} == {name: "Cached" for name in STAGES[:-1]} | {"register": "Completed"}
    assert int(forced.registered.version) > int(s3_pipeline["summary"].registered.version)  # registered again


def test_stage2_killed_then_rerun_resumes_at_stage2(s3_pipeline, monkeypatch):
    """A training child killed with SIGKILL fails its task with a clear message; the re-run
    reuses every earlier stage and continues stage 2 from its last saved state."""
    stage2 = {"max_train_epochs": 20, "save_every_n_epochs": 1}
    no_retry = {"stage2": {"retries": 0}}  # the flow-level re-run is what is tested here
    work = Path(s3_pipeline["work"])
    earlier = set(work.glob("stages/stage2-train/*/out/state-epoch-1"))  # the first run's stage 2
    saved = lambda: bool(set(work.glob("stages/stage2-train/*/out/state-epoch-1")) - earlier)  # noqa: E731
    killed = _when(saved, lambda: _sigkill("stage2-train"))
    with pytest.raises(StageFailed, match=r"stage2-train \(pid \d+\) was killed by SIGKILL"):
        _run(s3_pipeline, monkeypatch, stage2=stage2, resources=no_retry)
    assert killed.is_set()
    failed = latest_flow_run()
    assert failed.state.is_failed()
    assert task_runs(failed.id)["stage2-train"].state.is_failed()

    rerun = _run(s3_pipeline, monkeypatch, stage2=stage2, resources=no_retry)
    states = {s.name: s.state for s in rerun.stages}
    assert {states[n] for n in STAGES[:6]} == {"Cached"}
    assert states["stage2-train"] == "Completed" and states["register"] == "Completed"
    logs = flow_logs(rerun.flow_run_id)
    resumed = [line for line in logs if line.startswith("resuming from state-epoch-")]
    assert resumed and any(line.startswith("resumed from state-epoch-") for line in logs)  # the trainer says so too
    s3 = boto3.client("s3", endpoint_url=s3_pipeline["endpoint"])
    key = f"wan/runs/{rerun.flow_run_id}/stage2-train/train_log.jsonl"
    starts = [r for r in map(json.loads, s3.get_object(Bucket=s3_pipeline["bucket"], Key=key)["Body"].read().splitlines()) if r["event"] == "start"]
    assert len(starts) == 2 and 1 <= starts[1]["epoch"] < 20 and starts[1]["step"] > 0
    assert int(rerun.registered.version) > int(s3_pipeline["summary"].registered.version)


def test_s3_outage_mid_run_fails_clearly_and_registers_nothing(s3_pipeline, monkeypatch):
    relay = CuttableRelay(s3_pipeline["endpoint"])
    client = mlflow_client(s3_pipeline["tracking_uri"])
    name = s3_pipeline["summary"].registered.name
    before = len(client.search_model_versions(f"name = '{name}'"))
    cut = _when(lambda: "stage2-train" in launcher._live.values(), relay.cut)
    storage = s3_pipeline["params"]["storage"] | {"s3": {"multipart_chunk_mib": 5, "max_attempts": 2, "connect_timeout_s": 2, "read_timeout_s": 5}}
    started = time.monotonic()
    with pytest.raises(StoreError) as e:
        _run(s3_pipeline, monkeypatch, endpoint=relay.url, stage2={"learning_rate": 0.02}, storage=storage, resources={"stage2": {"retries": 0}})
    assert cut.is_set() and time.monotonic() - started < 240
    message = str(e.value)
    assert relay.url in message and f"'{s3_pipeline['bucket']}'" in message and "after 2 attempts" in message
    assert len(client.search_model_versions(f"name = '{name}'")) == before
