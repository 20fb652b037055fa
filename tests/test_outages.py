"""Outages surface in minutes, not quarter-hours (issue 22, item 6): the MLflow client's retries
and timeouts are bounded (TrackingSettings.request_*), and a dead tracking server is one sentence
naming it, in the error and in the failed run's state message."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tasks.registry.tracking import TrackingSettings, TrackingUnavailable, bound_mlflow_requests, start_pipeline_run


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A server that accepts connections and never answers (a hung tracking server)."""
    listener = socket.create_server(("127.0.0.1", 0))
    held = []
    stop = threading.Event()

    def accept():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    listener.close()


def _start(uri: str, settings: TrackingSettings, deadline_s: float):
    """start_pipeline_run against `uri` under `settings`' limits: (error, seconds), or a failure
    when it has not given up within `deadline_s` (MLflow's defaults take minutes)."""
    outcome = {}

    def call():
        started = time.monotonic()
        try:
            start_pipeline_run(settings, uri, "file:///tmp/unused", tags={}, params={})
        except Exception as e:  # noqa: BLE001
            outcome["error"] = e
        outcome["seconds"] = time.monotonic() - started

    restore = bound_mlflow_requests(settings)
    try:
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(deadline_s)
    finally:
        restore()
    assert "seconds" in outcome, f"the MLflow client had not given up on {uri} after {deadline_s} s"
    return outcome["error"], outcome["seconds"]


def test_a_dead_tracking_server_fails_in_seconds_and_is_named():
    uri = f"http://127.0.0.1:{_closed_port()}"
    error, seconds = _start(uri, TrackingSettings(experiment="dead", request_max_retries=1, request_backoff_factor=0), 60)
    assert isinstance(error, TrackingUnavailable) and seconds < 30
    message = str(error)
    assert message.startswith(f"MLflow tracking server {uri} is unreachable (connection refused) after 1 retries")
    assert "\n" not in message


def test_a_hung_tracking_server_times_out(silent_server):
    settings = TrackingSettings(experiment="hung", request_max_retries=0, request_timeout_s=1)
    error, seconds = _start(silent_server, settings, 60)
    assert isinstance(error, TrackingUnavailable) and seconds < 30
    assert f"MLflow tracking server {silent_server} is unreachable (it did not answer in time)" in str(error)


def test_the_limits_are_parameters_and_apply_only_during_the_run(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    restore = bound_mlflow_requests(TrackingSettings(request_max_retries=3, request_timeout_s=12))
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "12"
    restore()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9" and "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ
    with pytest.raises(ValueError):
        TrackingSettings(request_timeout_s=10**6)


def test_the_failed_run_says_which_service_is_down(prefect_api, tmp_path):
    from flows.pipeline import lora_moe_pipeline

    uri = f"http://127.0.0.1:{_closed_port()}"
    started = time.monotonic()
    state = lora_moe_pipeline(
        artifact_root=str(tmp_path / "root"),
        return_state=True,
        tracking={"tracking_uri": uri, "experiment": "down", "request_max_retries": 1, "request_backoff_factor": 0},
    )
    assert state.is_failed() and time.monotonic() - started < 60
    assert f"TrackingUnavailable: MLflow tracking server {uri} is unreachable (connection refused)" in state.message
    assert not (tmp_path / "root" / "runs").exists()
