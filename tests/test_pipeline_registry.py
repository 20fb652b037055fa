"""Registry entries through MlflowClient on SQLite: one version per registration, the bundle as
an MLflow logged model, `candidate` always, `champion` only for a passing, not-worse model."""

import json
import uuid
from pathlib import Path

import pytest
from pipeline_fixtures import registrar

from tasks.registry.versions import BUNDLE_PATH, CANDIDATE, CHAMPION, metric_tag


@pytest.fixture
def registry(mlflow_uri, tmp_path):
    name = f"model-{uuid.uuid4().hex[:8]}"
    client, register = registrar(mlflow_uri, tmp_path, name)
    return client, name, register


def test_champion_moves_only_to_passing_models_that_are_not_worse(registry):
    client, name, register = registry
    first = register(1.0)
    assert first.version == "1" and first.aliases == [CANDIDATE, CHAMPION]
    assert first.champion_moved and first.previous_champion is None
    worse = register(1.2)
    assert worse.aliases == [CANDIDATE] and "worse than champion v1" in worse.champion_decision
    assert not worse.champion_moved and worse.previous_champion == "1"
    failed = register(0.5, passed=False)
    assert failed.aliases == [CANDIDATE] and failed.champion_decision.startswith("eval gate failed")
    better = register(0.9)
    assert better.aliases == [CANDIDATE, CHAMPION] and better.version == "4"
    assert better.champion_moved and better.previous_champion == "1"
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == "4"
    assert client.get_model_version(name, "1").aliases == []  # aliases moved, versions kept


def test_the_version_holds_the_bundle_as_a_logged_model(registry, tmp_path, monkeypatch):
    import mlflow

    client, name, register = registry
    monkeypatch.setenv("MLFLOW_TRACKING_URI", client.tracking_uri)  # as a consumer of the registry sets it
    entry = register(1.0)
    version = client.get_model_version(name, entry.version)
    logged = client.get_logged_model(entry.model_id)
    assert version.source == logged.artifact_location and version.tags["logged_model_id"] == entry.model_id
    assert version.tags[metric_tag("loss")] == "1.0" and logged.source_run_id == version.run_id
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": name, "version": entry.version}]  # its UI page
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{CHAMPION}", dst_path=str(tmp_path / "got")))
    assert json.loads((local / BUNDLE_PATH / "bundle.json").read_text()) == {"artifacts": {}}
    # a pyfunc model from code: MLmodel names the code file MLflow runs, no pickle is stored
    assert (local / "video_model_code.py").is_file() and not list(local.rglob("*.pkl"))
    assert "loader_module: mlflow.pyfunc.loaders.code_model" in (local / "MLmodel").read_text()
