"""Promotion as an event: `register` emits `lora-moe.champion.promoted` exactly when `champion`
moves (not when it stays), and the `export-champion` deployment's trigger in deploy/prefect.yaml
validates as `prefect deploy` reads it, matches that event (name and resource) and renders
parameters the export flow accepts. The pipeline's own run (`s3_pipeline`) is checked against the
events the Prefect API received."""

import asyncio
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import registrar

from tasks.registry.tracking import mlflow_client
from tasks.registry.versions import PROMOTED_EVENT, promotion_event, resource_id

ROOT = Path(__file__).resolve().parent.parent
GATE = {
    "passed": True,
    "primary_metric": "loss",
    "primary_value": 0.9,
    "higher_is_better": False,
    "checks": [{"name": "routing_top1_accuracy", "value": 0.9, "threshold": 0.8, "passed": True, "description": "d"}],
}


@pytest.fixture
def registry(mlflow_uri, tmp_path):
    name = f"promoted-{uuid.uuid4().hex[:8]}"
    _, register_version = registrar(mlflow_uri, tmp_path, name)

    def register(loss: float, passed: bool = True):
        entry = register_version(loss, passed)
        gate = GATE | {"passed": passed, "primary_value": loss}
        return entry, promotion_event(
            entry, gate=gate, metrics={"loss": loss, "routing_top1_accuracy": 0.9}, data_fingerprint="ab" * 32, task="tiny-t2v"
        )

    return name, register


def test_an_event_exactly_when_champion_moves(registry):
    name, register = registry
    moves = [register(loss, passed) for loss, passed in ((1.0, True), (1.2, True), (0.5, False), (0.9, True), (0.9, True))]
    assert [event is not None for _, event in moves] == [True, False, False, True, True]
    assert [entry.champion_moved for entry, _ in moves] == [True, False, False, True, True]
    entry, event = moves[3]
    assert event["event"] == PROMOTED_EVENT
    assert event["resource"] == {
        "prefect.resource.id": f"lora-moe.model-version.{name}.4",
        "prefect.resource.name": f"{name} v4",
        "lora-moe.model": name,
        "lora-moe.version": "4",
        "lora-moe.alias": "champion",
    }
    payload = event["payload"]
    assert payload["previous_champion"] == "1" and payload["model_uri"] == f"models:/{name}/4"
    assert payload["gate"]["passed"] is True and payload["gate"]["checks"][0]["threshold"] == 0.8
    assert payload["metrics"] == {"loss": 0.9, "routing_top1_accuracy": 0.9} and payload["data_fingerprint"] == "ab" * 32
    assert moves[4][1]["payload"]["previous_champion"] == "4"  # not worse: champion moves on to v5
    json.dumps(event["payload"])  # an event payload is JSON


def _trigger(deployment_id):
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    [deployment] = [d for d in spec["deployments"] if d["name"] == "export-champion"]
    [trigger] = _initialize_deployment_triggers(deployment["name"], deployment["triggers"])  # as `prefect deploy` does
    trigger.set_deployment_id(deployment_id)
    return deployment, trigger.as_automation()


def _received(event: dict):
    from prefect.events import Event
    from prefect.server.events.schemas.events import ReceivedEvent

    sent = Event(**event)
    return ReceivedEvent.model_validate(sent.model_dump(mode="json") | {"received": datetime.now(UTC).isoformat()})


def test_the_export_deployment_is_triggered_by_the_event_with_its_version(registry):
    from prefect.server.events.schemas.automations import Automation, TriggeredAction

    from flows.export import export_champion

    name, register = registry
    entry, event = register(1.0)
    deployment, automation = _trigger(uuid.uuid4())
    assert deployment["entrypoint"] == "flows.export.export_champion" and deployment["enforce_parameter_schema"] is True
    server = Automation.model_validate(automation.model_dump(mode="json") | {"id": str(uuid.uuid4())})
    received = _received(event)
    assert server.trigger.covers(received)
    assert not server.trigger.covers(_received(event | {"event": "lora-moe.champion.kept"}))
    assert not server.trigger.covers(_received(event | {"resource": event["resource"] | {"prefect.resource.id": f"prefect.flow-run.{uuid.uuid4()}"}}))
    [action] = server.actions
    fired = TriggeredAction(automation=server, triggered=datetime.now(UTC), triggering_labels={}, triggering_event=received, action=action)
    parameters = asyncio.run(action.render_parameters(fired))  # what the server passes to the deployment
    assert parameters == {"model": name, "version": entry.version}
    export_champion.validate_parameters(parameters)


def _events(resource: str, timeout_s: float = 30) -> list[dict]:
    """The promotion events the Prefect API stored for `resource` (waiting for the events worker)."""
    from prefect import get_client
    from prefect.events.worker import EventsWorker

    EventsWorker.drain_all(timeout=10)
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            found = client._client.post(
                "/events/filter", json={"filter": {"event": {"name": [PROMOTED_EVENT]}, "resource": {"id": [resource]}}, "limit": 50}
            ).json()["events"]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(1)


def test_the_pipeline_run_emitted_it_when_champion_moved(s3_pipeline):
    entry = s3_pipeline["summary"].registered
    events = _events(resource_id(entry.name, entry.version), timeout_s=30 if entry.champion_moved else 5)
    assert len(events) == (1 if entry.champion_moved else 0)
    if events:
        [event] = events
        assert event["payload"]["decision"] == entry.champion_decision
        related = {r["prefect.resource.id"] for r in event["related"]}
        assert f"prefect.flow-run.{s3_pipeline['summary'].flow_run_id}" in related  # the run that promoted it


def test_export_champion_writes_each_form_with_a_readme(s3_pipeline, s3_endpoint, tmp_path):
    """The export flow on the pipeline's version (by number, as the trigger passes it), one expert
    to keep it short: the stage-1 LoRA and the expert in the default and musubi forms."""
    from flows.export import export_champion
    from moe.files.hashing import sha256_file
    from tasks.artifacts.local import local_path

    entry = s3_pipeline["summary"].registered
    summary = export_champion(
        model=entry.name,
        version=entry.version,
        experts=["hook"],
        artifact_root=str(tmp_path / "root"),
        tracking_uri=s3_pipeline["tracking_uri"],
        work_dir=str(tmp_path / "work"),
    )
    assert summary.version == entry.version
    assert set(summary.files) == {
        "stage1/vanilla_lora.safetensors",
        "stage1/vanilla_lora_musubi.safetensors",
        "experts/hook.safetensors",
        "experts/hook_musubi.safetensors",
    }
    assert summary.files["stage1/vanilla_lora.safetensors"] == s3_pipeline["summary"].artifacts["vanilla_lora"].sha256
    folder = local_path(summary.export.uri)
    assert summary.export.uri.endswith(f"/exports/{entry.name}/v{entry.version}/{summary.export.producer.split('@')[1]}")
    for path, sha256 in summary.files.items():
        assert sha256_file(folder / path) == sha256
    readme = (folder / "README.md").read_text()
    assert "**base** DiTs" in readme and "**merged** DiTs" in readme and "experts/hook_musubi.safetensors" in readme
    assert s3_pipeline["summary"].artifacts["merged_low_noise"].uri in readme
    assert json.loads((folder / "export.json").read_text())["files"] == summary.files
    version = mlflow_client(s3_pipeline["tracking_uri"]).get_model_version(entry.name, entry.version)
    assert version.tags["exported_to"] == summary.export.uri


def test_a_pipeline_run_that_moves_champion_emits_the_event_once(s3_pipeline, monkeypatch):
    """The s3 run again with a gate every model passes, into a registered model of its own (so the
    other tests' aliases stay): eval and register run again (the gate is an eval input), there is
    no champion yet, so `champion` moves to the new version and exactly one event names it; the
    flow run is tagged `champion`."""
    from test_pipeline import _run

    lenient = {
        "min_stage1_improvement_over_base": -1,
        "min_stage2_roi_improvement_over_stage1": -1,
        "min_hint_margin": -1,
        "min_routing_top1_accuracy": 0,
    }
    summary = _run(s3_pipeline, monkeypatch, gate=lenient, tracking={"registered_model": f"promoted-{uuid.uuid4().hex[:8]}"})
    entry = summary.registered
    assert summary.gate["passed"] and entry.champion_moved and "champion" in entry.aliases
    assert entry.previous_champion is None and entry.version == "1"
    assert {s.name: s.state for s in summary.stages}["register"] == "Completed"
    [event] = _events(resource_id(entry.name, entry.version))
    assert event["payload"]["model_uri"] == f"models:/{entry.name}/{entry.version}"
    assert event["payload"]["previous_champion"] == entry.previous_champion
    assert event["resource"]["lora-moe.version"] == entry.version
    from prefect import get_client

    with get_client(sync_client=True) as client:
        assert "champion" in client.read_flow_run(summary.flow_run_id).tags
