"""Scheduled retraining on the tiny S3 pipeline (`s3_pipeline`): with `only_new_data` the flow
compares the data fingerprint with the champion's before any training stage and trains nothing
when they are equal; with new clips and `stage2_from_champion` it trains stage 2 on the
champion's merged DiTs and registers a version that says so."""

import json

import pytest
from test_pipeline import _run, task_runs

from tasks.registry.tracking import mlflow_client
from tasks.registry.versions import CHAMPION, current_version

TRAINING = {"prepare-data", "stage1-train", "merge-low", "merge-high", "stage2-train", "eval", "register"}


@pytest.fixture
def champion(s3_pipeline):
    """The s3 pipeline's version as champion (the tiny settings may fail the default gate)."""
    client = mlflow_client(s3_pipeline["tracking_uri"])
    name = s3_pipeline["summary"].registered.name
    if current_version(client, name, CHAMPION) is None:
        client.set_registered_model_alias(name, CHAMPION, s3_pipeline["summary"].registered.version)
    version = current_version(client, name, CHAMPION)
    assert version.tags["data_fingerprint"] == s3_pipeline["summary"].data_fingerprint
    return client, name, str(version.version)


def _artifacts(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))


def test_the_same_clips_train_nothing(s3_pipeline, champion, monkeypatch):
    client, name, version = champion
    before = len(client.search_model_versions(f"name = '{name}'"))
    summary = _run(s3_pipeline, monkeypatch, only_new_data=True)
    assert summary.skipped == f"no new clips since version {version}"
    assert summary.registered.version == version and summary.data_fingerprint == s3_pipeline["summary"].data_fingerprint
    runs = task_runs(summary.flow_run_id)
    assert set(runs) == {"synth-data", "check-new-data"} and not TRAINING & set(runs)
    assert runs["synth-data"].state.name == "Cached" and runs["check-new-data"].state.name == "Completed"
    [note] = [a for a in _artifacts(summary.flow_run_id) if a.key == "lora-moe-pipeline-summary"]
    assert f"no new clips since version {version}" in note.data and summary.data_fingerprint[:16] in note.data
    assert len(client.search_model_versions(f"name = '{name}'")) == before
    experiment = client.get_experiment_by_name(s3_pipeline["params"]["tracking"]["experiment"])
    [parent] = client.search_runs([experiment.experiment_id], f"tags.`prefect.flow_run_id` = '{summary.flow_run_id}'")
    assert parent.data.tags["skipped"] == summary.skipped and parent.info.status == "FINISHED"


def test_new_clips_retrain_stage2_from_the_champion(s3_pipeline, champion, monkeypatch, tmp_path):
    import mlflow

    client, name, version = champion
    summary = _run(s3_pipeline, monkeypatch, data={"synthetic_seed": 1}, only_new_data=True, stage2_from_champion=True)
    assert summary.skipped is None and summary.data_fingerprint != s3_pipeline["summary"].data_fingerprint
    states = {s.name: s.state for s in summary.stages}
    assert states == {
        "synth-data": "Completed",
        "check-new-data": "Completed",
        "tiny-models": "Cached",
        "prepare-data": "Completed",
        "champion-stage1": "Completed",
        "stage2-train": "Completed",
        "eval": "Completed",
        "register": "Completed",
    }  # no stage1-train, no merges
    first = s3_pipeline["summary"].artifacts
    for reused in ("vanilla_lora", "merged_low_noise", "merged_high_noise"):
        assert summary.artifacts[reused] == first[reused], reused
    assert summary.artifacts["lora_moe"].sha256 != first["lora_moe"].sha256
    assert summary.stage1_from_version == version
    new = client.get_model_version(name, summary.registered.version)
    assert new.tags["stage1_from_version"] == version and new.tags["data_fingerprint"] == summary.data_fingerprint
    monkeypatch.setenv("MLFLOW_TRACKING_URI", s3_pipeline["tracking_uri"])
    model_dir = mlflow.artifacts.download_artifacts(f"models:/{name}/{summary.registered.version}", dst_path=str(tmp_path))
    bundle = json.loads((tmp_path / "artifacts" / "bundle" / "bundle.json").read_text()) if model_dir else {}
    assert bundle["based_on"] == {"version": version, "reused": ["vanilla_lora", "merged_low_noise", "merged_high_noise"]}
