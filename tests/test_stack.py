"""The stack for real, without docker (`deploy/stack.py`, what `make stack` runs): moto's S3
server, `mlflow server` (SQLite, S3 artifacts served through it), `prefect server start`, the
work pools script, `prefect deploy` of deploy/prefect.yaml and a process worker, each its own
process on a free loopback port. The `manual` deployment is triggered through the API with tiny
parameters and clips in S3; what it made is checked through the servers' HTTP APIs; then
`nightly-retrain`, with the same clips, trains nothing; the champion generates a video from
`models:/...@champion` (CLI and pyfunc); at the end every process is stopped by pid and none is
left. One stack for the module (about 30 s to start on 2 cores, the tiny run 2-3 minutes)."""

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import boto3
import pytest

ROOT = Path(__file__).resolve().parent.parent
MODEL = "wan22-surgical-lora-moe"
CLIPS = "s3://clips/surgical/manifest.jsonl"
# The tiny preset at the suite's small settings; the gate is lenient because one epoch on eight
# clips decides nothing (the gate itself is tested with the eval).
TINY = {
    "preset": "tiny",
    "models": {"tiny_pretrain_steps": 0},
    "data": {"manifest": CLIPS, "frames": 9, "size": "32x32"},
    "stage1": {"max_train_epochs": 1},
    "stage2": {"max_train_epochs": 1},
    "evaluation": {"samples": 0, "metric_clips": 0, "bootstrap_samples": 200},
    "gate": {
        "min_stage1_improvement_over_base": -1,
        "min_stage2_roi_improvement_over_stage1": -1,
        "min_hint_margin": -1,
        "min_routing_top1_accuracy": 0,
    },
}
TRAINED = ["resolve-inputs", "tiny-models", "prepare-data", "stage1-train", "merge-low", "merge-high", "stage2-train", "eval", "register"]


def _load_stack_module():
    spec = importlib.util.spec_from_file_location("lora_moe_stack", ROOT / "deploy" / "stack.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_api_calls_retry_what_prefect_retries():
    """A busy Prefect server on SQLite answers 503 (a CI run failed on one): the stack's REST
    calls retry it as Prefect's client does, and raise any other error status at once."""
    import http.server
    import threading

    answers = [503, 503, 200, 409]
    calls = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (the http.server API)
            calls.append(self.path)
            code = answers.pop(0)
            self.send_response(code)
            self.end_headers()
            self.wfile.write(json.dumps({"ok": code}).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api_call = _load_stack_module().api_call
        url = f"http://127.0.0.1:{server.server_address[1]}/api/x"
        assert api_call(url, "POST", {}) == {"ok": 200} and len(calls) == 3
        with pytest.raises(urllib.error.HTTPError) as e:
            api_call(url, "POST", {})
        assert e.value.code == 409 and len(calls) == 4
    finally:
        server.shutdown()


# nightly-retrain's schedule in deploy/prefect.yaml, "0 2 * * *" (test_the_deployments_hold_nothing_of_this_machine checks it)
NIGHTLY_HOUR, NIGHTLY_TZ = 2, ZoneInfo("Europe/Berlin")


def _minutes_to_the_nightly_run() -> float:
    now = datetime.now(NIGHTLY_TZ)
    next_run = now.replace(hour=NIGHTLY_HOUR, minute=0, second=0, microsecond=0)
    if next_run <= now:
        next_run += timedelta(days=1)
    return (next_run - now).total_seconds() / 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory, aws_env, plugins):
    module = _load_stack_module()
    root = tmp_path_factory.mktemp("stack")
    # A nightly-retrain run due while these tests run (a few minutes) would train on the
    # deployment's own defaults and register a version of its own: then no scheduler.
    st = module.Stack(
        root, ui=False, scheduler=_minutes_to_the_nightly_run() > 20, base_env=dict(os.environ) | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    )
    started = time.monotonic()
    try:
        st.up()
        st.startup_s = time.monotonic() - started
        _upload_clips(st, tmp_path_factory.mktemp("clips"))
        yield st
    finally:
        st.stop()


def _s3(st):
    return boto3.client("s3", endpoint_url=st.s3_url)


def _upload_clips(st, folder: Path) -> None:
    """The clips of a lab's bucket: the synthetic set, uploaded as files under a prefix."""
    from moe.tiny.synth import synthesize_dataset

    manifest = synthesize_dataset(folder, clips=8, frames=9, size=(32, 32), seed=0)
    s3 = _s3(st)
    s3.create_bucket(Bucket="clips")
    for path in sorted(p for p in manifest.parent.rglob("*") if p.is_file()):
        s3.upload_file(str(path), "clips", f"surgical/{path.relative_to(manifest.parent).as_posix()}")


def _mlflow(st, path: str, **query):
    url = f"{st.mlflow_url}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _mlflow_post(st, path: str, body: dict):
    request = urllib.request.Request(
        f"{st.mlflow_url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _deployment(st, name: str) -> dict:
    return st.api("GET", f"/deployments/name/lora-moe-pipeline/{name}")


def _trigger(st, deployment: str, parameters: dict) -> str:
    run = st.api("POST", f"/deployments/{_deployment(st, deployment)['id']}/create_flow_run", {"parameters": parameters})
    return run["id"]


def _wait(st, flow_run_id: str, timeout_s: float = 900) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = st.api("GET", f"/flow_runs/{flow_run_id}")
        if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            if run["state_type"] != "COMPLETED":
                logs = st.api("POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
                tail = "\n".join(log["message"] for log in logs[-40:])
                pytest.fail(f"flow run {run['state_name']}: {run['state']['message']}\n{tail}\n{st.services['worker'].tail(40)}")
            return run
        time.sleep(1)
    pytest.fail(f"flow run {flow_run_id} did not finish within {timeout_s:.0f} s:\n{st.services['worker'].tail(40)}")


def _task_runs(st, flow_run_id: str) -> dict[str, str]:
    runs = st.api("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    return {run["name"]: run["state_name"] for run in runs}


@pytest.fixture(scope="module")
def manual_run(stack):
    started = time.monotonic()
    flow_run_id = _trigger(stack, "manual", TINY)
    run = _wait(stack, flow_run_id)
    run["wall_s"] = time.monotonic() - started
    return run


def test_the_deployments_hold_nothing_of_this_machine(stack):
    home, stack_root = str(Path.home()), str(stack.root)
    for name in ("manual", "nightly-retrain"):
        deployment = _deployment(stack, name)
        text = json.dumps(deployment)
        assert str(ROOT) not in text and stack_root not in text and f'"{home}' not in text and "/tmp/" not in text
        assert deployment["entrypoint"] == "flows.pipeline.lora_moe_pipeline" and deployment["path"] is None
        assert deployment["pull_steps"] == [{"flows.worker_steps.check_installed": {"package_version": "0.1.0"}}]
        assert deployment["enforce_parameter_schema"] is True and deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["work_pool_name"] == "lora-moe-process"
    [schedule] = _deployment(stack, "nightly-retrain")["schedules"]
    assert schedule["schedule"] == {"cron": "0 2 * * *", "timezone": "Europe/Berlin", "day_or": True} and schedule["active"]
    pools = {p["name"]: p for p in stack.api("POST", "/work_pools/filter", {})}
    assert {n: (p["type"], p["concurrency_limit"]) for n, p in pools.items()} == {
        "lora-moe-process": ("process", 1),
        "lora-moe-docker": ("docker", 1),
        "lora-moe-kubernetes": ("kubernetes", 1),
    }
    k8s = pools["lora-moe-kubernetes"]["base_job_template"]
    assert "gpus" in k8s["variables"]["properties"]  # the server accepted the GPU job variable


def _runs_of(st, deployment: str, **flow_run_filter) -> list[dict]:
    """Flow runs of one deployment (the server's scheduler adds nightly-retrain runs of its own)."""
    body = {"deployments": {"id": {"any_": [_deployment(st, deployment)["id"]]}}}
    return st.api("POST", "/flow_runs/filter", body | ({"flow_runs": flow_run_filter} if flow_run_filter else {}))


def test_an_invalid_parameter_is_refused_by_the_schema(stack):
    before = {run["id"] for run in _runs_of(stack, "manual")}
    for bad in ({"stage1": {"learning_rate": -1}}, {"preset": "t3v"}, {"stage2": {"learning_rat": 1e-3}}):
        with pytest.raises(urllib.error.HTTPError) as e:
            _trigger(stack, "manual", TINY | bad)
        assert e.value.code == 409 and "Validation failed" in e.value.read().decode()
    assert {run["id"] for run in _runs_of(stack, "manual")} == before  # nothing was queued


def test_a_form_cannot_send_the_workers_credentials_to_another_host(stack):
    """Issue 22, item 1: a tracking URI or an S3 endpoint in the form of a deployment run would
    have the worker send its MLflow token, or SigV4-signed requests, to that host. The run fails
    in one line naming the field, and the host named in the form hears nothing."""
    import http.server
    import threading

    heard: list[str] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            heard.append(f"{self.command} {self.path} {self.headers.get('Authorization', '')}")
            self.send_response(500)
            self.end_headers()

        do_GET = do_POST = do_PUT = do_HEAD = _answer  # noqa: N815 (the http.server API)

        def log_message(self, *args):
            pass

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{collector.server_address[1]}"
    try:
        for field, parameters in (
            ("tracking.tracking_uri", {"tracking": {"tracking_uri": url}}),
            ("storage.s3.endpoint_url", {"storage": {"s3": {"endpoint_url": url}}}),
        ):
            flow_run_id = _trigger(stack, "manual", TINY | parameters)
            deadline = time.monotonic() + 300
            while (run := stack.api("GET", f"/flow_runs/{flow_run_id}"))["state_type"] not in ("COMPLETED", "FAILED", "CRASHED"):
                assert time.monotonic() < deadline, f"still {run['state_name']}:\n{stack.services['worker'].tail(40)}"
                time.sleep(1)
            assert run["state_type"] == "FAILED", run["state"]
            assert f"{field}='{url}' is refused" in run["state"]["message"], run["state"]["message"]
    finally:
        collector.shutdown()
    assert heard == []


def test_manual_run_trains_stores_and_registers(stack, manual_run):
    flow_run_id = manual_run["id"]
    assert _task_runs(stack, flow_run_id) == {name: "Completed" for name in TRAINED}
    # S3: every stored object of the run under the artifact root, sha256 tags matching the bytes
    s3 = _s3(stack)
    prefix = f"pipeline/runs/{flow_run_id}/"
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="lora-moe", Prefix=prefix) for o in page.get("Contents", [])]
    stages = {key.removeprefix(prefix).split("/")[0] for key in keys}
    assert stages == {"tiny-models", "prepare-data", "stage1-train", "merge-low", "merge-high", "stage2-train", "eval"}
    lora_key = f"{prefix}stage2-train/lora_moe_stage2.safetensors"
    body = s3.get_object(Bucket="lora-moe", Key=lora_key)["Body"].read()
    tags = {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket="lora-moe", Key=lora_key)["TagSet"]}
    assert tags["sha256"] == hashlib.sha256(body).hexdigest()
    # MLflow: the registry version and its aliases, through the server's REST API
    champion = _mlflow(stack, "registered-models/alias", name=MODEL, alias="champion")["model_version"]
    version_tags = {t["key"]: t["value"] for t in champion["tags"]}
    assert champion["version"] == "1" and sorted(champion["aliases"]) == ["candidate", "champion"]
    assert version_tags["lora_moe.sha256"] == hashlib.sha256(body).hexdigest()  # the refs: artifacts.json
    assert version_tags["prefect.flow_run_id"] == flow_run_id and version_tags["gate.passed"] == "true"
    # the runs: one parent per flow run, one nested run per stage that ran
    experiment = _mlflow(stack, "experiments/get-by-name", experiment_name="wan-lora-moe")["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")  # stored by the server, proxied
    runs = _mlflow_post(stack, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
    parent = [
        r
        for r in runs
        if {"key": "prefect.flow_run_id", "value": flow_run_id} in r["data"]["tags"]
        and not any(t["key"] == "mlflow.parentRunId" for t in r["data"]["tags"])
    ]
    assert len(parent) == 1
    nested = [r["info"]["run_name"] for r in runs if {"key": "mlflow.parentRunId", "value": parent[0]["info"]["run_id"]} in r["data"]["tags"]]
    assert sorted(nested) == sorted(TRAINED[1:])  # resolve-inputs logs no run of its own
    # the MLflow artifacts (the bundle and the stage files) went through the server into its bucket
    mlflow_objects = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow") for o in page.get("Contents", [])]
    assert any(k.endswith("artifacts/bundle/bundle.json") for k in mlflow_objects)
    assert any(k.endswith("/artifacts.json") for k in mlflow_objects) and any(k.endswith("MODEL_CARD.md") for k in mlflow_objects)
    assert any(k.endswith("MLmodel") for k in mlflow_objects)


def test_the_promotion_triggers_export_champion(stack, manual_run):
    """The manual run moved `champion` (its gate is lenient): the server's automation, made by
    `prefect deploy` from the deployment's `triggers:`, ran `export-champion` for that version on
    the worker; its files are in S3 and the version names them."""
    deployment = stack.api("GET", "/deployments/name/export-champion/export-champion")
    deadline = time.monotonic() + 120
    while not (runs := stack.api("POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployment["id"]]}}})):
        assert time.monotonic() < deadline, "the promotion event triggered no export-champion run"
        time.sleep(1)
    [run] = runs
    assert run["parameters"] == {"model": MODEL, "version": "1"}  # from the event's resource
    _wait(stack, run["id"], timeout_s=600)
    champion = _mlflow(stack, "registered-models/alias", name=MODEL, alias="champion")["model_version"]
    exported = {t["key"]: t["value"] for t in champion["tags"]}["exported_to"]
    assert exported.startswith("s3://lora-moe/pipeline/exports/wan22-surgical-lora-moe/v1/")
    keys = [o["Key"] for o in _s3(stack).list_objects_v2(Bucket="lora-moe", Prefix=exported.removeprefix("s3://lora-moe/"))["Contents"]]
    assert any(k.endswith("experts/hook_musubi.safetensors") for k in keys) and any(k.endswith("README.md") for k in keys)


def test_nightly_retrain_with_the_same_clips_trains_nothing(stack, manual_run):
    flow_run_id = _trigger(stack, "nightly-retrain", TINY)  # the scheduled deployment, same data
    run = _wait(stack, flow_run_id, timeout_s=300)
    assert run["state_name"] == "Completed" and run["parameters"]["only_new_data"] is True
    assert _task_runs(stack, flow_run_id) == {"resolve-inputs": "Completed", "check-new-data": "Completed"}
    artifacts = stack.api("POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    [note] = [a for a in artifacts if a["key"] == "lora-moe-pipeline-summary"]
    assert "no new clips since version 1" in note["data"]
    versions = _mlflow(stack, "registered-models/get", name=MODEL)["registered_model"]["latest_versions"]
    assert [v["version"] for v in versions] == ["1"]  # nothing registered


def test_the_scheduler_queues_nightly_runs_at_two_in_berlin(stack, manual_run):
    """The server's scheduler service (the real one, every 60 s) turned the cron into scheduled
    flow runs of nightly-retrain, each at 02:00 Europe/Berlin, with the deployment's parameters."""
    if not stack.scheduler:
        pytest.skip("02:00 Europe/Berlin falls within this test run: the stack runs without its scheduler")
    deadline = time.monotonic() + 180
    while not (runs := _runs_of(stack, "nightly-retrain", state={"type": {"any_": ["SCHEDULED"]}})):
        assert time.monotonic() < deadline, "the scheduler made no nightly-retrain runs"
        time.sleep(2)
    starts = sorted(datetime.fromisoformat(run["expected_start_time"]).astimezone(NIGHTLY_TZ) for run in runs)
    assert all((t.hour, t.minute, t.second) == (NIGHTLY_HOUR, 0, 0) for t in starts), starts
    assert len({t.date() for t in starts}) == len(starts) >= 3  # one a night, several nights ahead
    assert all(run["parameters"] == {"only_new_data": True} for run in runs)


def test_generate_from_the_champion(stack, manual_run, tmp_path):
    """`lora-moe generate --model models:/...@champion` as a user runs it against the stack: the
    bundle through MLflow, every ref from S3 into the worker's download cache (already there
    from the run: nothing is downloaded again), then `registry show`."""
    cache = stack.root / "worker" / "downloads" / "sha256"
    before = sorted(p.name for p in cache.glob("*/*"))
    save = tmp_path / "champion.mp4"
    env = stack.client_env | {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "moe",
            "generate",
            "--model",
            f"models:/{MODEL}@champion",
            "--prompt",
            "laparoscopic view, a hook cauterizing tissue",
            "--instrument_hint",
            "hook",
            "--video_size",
            "32x32",
            "--video_length",
            "5",
            "--infer_steps",
            "2",
            "--save_path",
            str(save),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert save.is_file() and done.stdout.startswith(f"wrote {save} (5 frames, 32x32)")
    assert sorted(p.name for p in cache.glob("*/*")) == before and before
    shown = subprocess.run(
        [sys.executable, "-m", "moe", "registry", "show", f"{MODEL}@champion", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["version"] == "1" and info["gate_passed"] is True and "stage2_learned_roi_loss" in info["metrics"]
    assert info["artifacts"]["merged_low_noise"]["uri"].startswith("s3://lora-moe/pipeline/runs/")


def test_pyfunc_from_the_champion(stack, manual_run, tmp_path, monkeypatch):
    import mlflow

    from moe.data.video import read_video

    for key in ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "LORA_MOE_WORK_DIR"):
        monkeypatch.setenv(key, stack.client_env[key])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    [path] = model.predict(
        [
            {
                "prompt": "a suction cannula clears the field",
                "instrument_hint": "suction",
                "video_size": "32x32",
                "video_length": 5,
                "infer_steps": 2,
                "device": "cpu",
                "output_dir": str(tmp_path),
            }
        ]
    )
    assert Path(path).parent == tmp_path and read_video(path).shape == (5, 32, 32, 3)


def _stage_commands(st, stage: str) -> list[int]:
    """Pids of this stack's live `lora-moe STAGE` commands (children of a flow run)."""
    found = []
    for pid in st.processes():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"moe" in argv and stage.encode() in argv:
            found.append(pid)
    return found


def test_a_run_cancelled_from_the_ui_stops_its_stage_commands(stack, manual_run):
    """Cancel as the UI does (the flow run set to Cancelling): the worker ends the flow run, whose
    stage command (its own process group) is killed with it; nothing is registered."""
    long_stage1 = TINY | {"stage1": {"max_train_epochs": 500, "learning_rate": 0.005}}  # a new cache key: stage 1 runs
    flow_run_id = _trigger(stack, "manual", long_stage1)
    deadline = time.monotonic() + 300
    while not (pids := _stage_commands(stack, "stage1")):
        assert time.monotonic() < deadline, f"stage 1 never started:\n{stack.services['worker'].tail(40)}"
        time.sleep(0.5)
    stack.api("POST", f"/flow_runs/{flow_run_id}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
    deadline = time.monotonic() + 120
    while (run := stack.api("GET", f"/flow_runs/{flow_run_id}"))["state_type"] != "CANCELLED":
        assert time.monotonic() < deadline, f"still {run['state_name']}:\n{stack.services['worker'].tail(40)}"
        time.sleep(0.5)
    alive = sys.modules[type(stack).__module__]._alive  # the stack's own liveness check (zombies are dead)
    deadline = time.monotonic() + 30  # the flow run's process kills its stage groups on the way out
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in pids if alive(pid)] and not _stage_commands(stack, "stage1")
    versions = _mlflow(stack, "registered-models/get", name=MODEL)["registered_model"]["latest_versions"]
    assert [v["version"] for v in versions] == ["1"]  # nothing registered


def test_every_process_is_stopped_by_pid(stack, manual_run):
    running = stack.processes()
    assert {s.process.pid for s in stack.services.values()} <= set(running)  # all five still up
    stopped = stack.stop()
    assert set(running) <= set(stopped) and stack.leftovers() == []
    print(f"stack start-up {stack.startup_s:.1f} s, manual tiny run {manual_run['wall_s']:.1f} s")
