"""One stage work folder, one run at a time (issue 22, items 2 and 4): a run that meets another
run's stage lock waits, then takes the holder's cached result (a retryable failure whose retry
reads the cache), or takes the folder over when the holder died, or gives up naming the holder;
and the lock lives on in a stage command whose flow process was killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from processes import is_running

from tasks.stages.lock import StageBusy, StageLock

ROOT = Path(__file__).resolve().parent.parent

# A flow process stand-in: takes the lock of argv[1], starts a stage command that inherits it
# (the command takes 3 s to save its state on SIGTERM, as training does), then either finishes
# the stage after argv[2] seconds or is killed by the test.
HOLDER = """
import sys, threading, time
from pathlib import Path
from tasks.stages.launcher import run_command
from tasks.stages.lock import StageLock
lock = StageLock(Path(sys.argv[1]), {"flow_run_id": "f-first"})
lock.acquire(None, print)
code = ("import os, signal, sys, time\\n"
        "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(3), sys.exit(143)))\\n"
        "print('child', os.getpid(), flush=True)\\n"
        "time.sleep(float(sys.argv[1]))\\n")
run_command([sys.executable, "-c", code, sys.argv[2]], "stage1-train", lambda line: print(line, flush=True),
            keep_fds=(lock.fd,))
lock.finish("completed")
print("finished", flush=True)
"""


def _start_holder(folder: Path, hold_s: float) -> tuple[subprocess.Popen, int]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), str(hold_s)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    line = holder.stdout.readline()
    assert line.startswith("child "), line
    return holder, int(line.split()[1])


def test_a_waiting_run_takes_the_finished_holders_result_through_a_retry(tmp_path):
    folder = tmp_path / "stages" / "stage1-train" / "abc"
    holder, _ = _start_holder(folder, hold_s=2)
    try:
        started = time.monotonic()
        lines: list[str] = []
        with pytest.raises(StageBusy, match=r"flow run f-first .*finished this stage.*cached result"):
            StageLock(folder, {"flow_run_id": "f-second"}).acquire(120, lines.append)
        assert time.monotonic() - started > 1.0  # it waited for the holder
        assert holder.wait(timeout=60) == 0
        assert any("waiting for flow run f-first" in line for line in lines), lines
        # Released again: the retry (which reads the cache) or a forced run gets in at once.
        forced = StageLock(folder, {"flow_run_id": "f-second"})
        forced.acquire(0, lines.append)
        forced.finish("completed")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_forced_run_that_waited_computes_the_stage_itself(tmp_path):
    folder = tmp_path / "work"
    holder, _ = _start_holder(folder, hold_s=1)
    try:
        lines: list[str] = []
        lock = StageLock(folder, {"flow_run_id": "f-second"})
        lock.acquire(120, lines.append, refresh=True)
        assert lock.fd is not None
        assert "took over" in lines[-1] and "ended with completed" in lines[-1], lines
        lock.finish("failed")
        assert json.loads((tmp_path / "work.lock").read_text())["outcome"] == "failed"
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_the_lock_outlives_a_killed_flow_process_until_its_stage_command_has_saved_and_exited(tmp_path):
    folder = tmp_path / "work"
    holder, child = _start_holder(folder, hold_s=60)
    try:
        holder.send_signal(signal.SIGKILL)  # the flow process: no finally runs
        holder.wait()
        lines: list[str] = []
        lock = StageLock(folder, {"flow_run_id": "f-second"})
        lock.acquire(60, lines.append)
        # The stage command got SIGTERM from the kernel and took 3 s to save; only then was the
        # folder free: the new run never shared it with a live process.
        assert not is_running(child)
        assert "took over" in lines[-1] and "without finishing" in lines[-1] and "f-first" in lines[-1], lines
        lock.finish("completed")
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        if is_running(child):
            os.kill(child, signal.SIGKILL)


def test_a_wait_longer_than_the_stage_timeout_is_a_retryable_failure_naming_the_holder(tmp_path):
    folder = tmp_path / "work"
    holder, child = _start_holder(folder, hold_s=60)
    try:
        with pytest.raises(StageBusy, match=r"flow run f-first \(pid \d+ on .*still holds the work folder .*after 1 s"):
            StageLock(folder, {"flow_run_id": "f-second"}).acquire(1, lambda line: None)
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        deadline = time.monotonic() + 20
        while is_running(child) and time.monotonic() < deadline:
            time.sleep(0.1)


def test_two_flow_runs_of_one_stage_compute_it_once(prefect_api, mlflow_uri, tmp_path):
    """Two Prefect flow runs started together with the same stage inputs: the first computes the
    stage, the second waits for its work folder, and its retry takes the first's cached result."""
    from prefect import flow, task
    from prefect.context import FlowRunContext

    from tasks.artifacts.s3 import S3Options
    from tasks.registry.tracking import TrackingContext, mlflow_client
    from tasks.stages.caching import StoreResultStorage, stage_cache_key
    from tasks.stages.prefect_tasks import _retry_unless_bad_input
    from tasks.stages.runner import StageContext, open_stage

    client = mlflow_client(mlflow_uri)
    experiment = client.create_experiment(f"stage-lock-{tmp_path.name}")
    root = tmp_path / "root"
    root.mkdir()
    results = StoreResultStorage.saved(str(root), S3Options())

    @task(
        name="locked-stage",
        cache_key_fn=stage_cache_key,
        persist_result=True,
        result_serializer="json",
        retries=1,
        retry_delay_seconds=1,
        retry_condition_fn=_retry_unless_bad_input,
    )
    def locked_stage(value: int, ctx: StageContext) -> dict:
        with open_stage(ctx) as stage:
            with open(stage.work / "computed-by", "a") as f:
                f.write(ctx.flow_run_id + "\n")
            time.sleep(4)
            return {"value": value, "computed_by": ctx.flow_run_id}

    @flow(persist_result=False)
    def one_stage() -> dict:
        run_id = str(FlowRunContext.get().flow_run.id)
        parent = client.create_run(experiment).info.run_id
        ctx = StageContext(
            artifact_root=str(root),
            work_dir=str(tmp_path / "work"),
            run_prefix=f"runs/{run_id}",
            flow_run_id=run_id,
            tracking=TrackingContext(tracking_uri=mlflow_uri, experiment_id=experiment, parent_run_id=parent, ui_url="http://x"),
        )
        return locked_stage.with_options(result_storage=results)(7, ctx=ctx)

    outputs: dict[str, dict] = {}
    first = threading.Thread(target=lambda: outputs.setdefault("first", one_stage()))
    first.start()
    locks = tmp_path / "work" / "stages" / "locked-stage"
    deadline = time.monotonic() + 120
    while not (list(locks.glob("*.lock")) and list(locks.glob("*/computed-by"))) and time.monotonic() < deadline:
        time.sleep(0.1)
    second = threading.Thread(target=lambda: outputs.setdefault("second", one_stage()))
    second.start()
    first.join(timeout=300)
    second.join(timeout=300)

    assert outputs["first"] == outputs["second"], outputs
    assert outputs["first"]["value"] == 7
    computed = (next(locks.glob("*/computed-by"))).read_text().split()
    assert computed == [outputs["first"]["computed_by"]]  # one computation, by the first run
