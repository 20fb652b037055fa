"""`make ui` (`deploy/stack.py ui`, issue 21 item 1): both UIs on a local run's stores, on free
loopback ports, the Prefect UI pointed at its own API, both stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from processes import is_running

ROOT = Path(__file__).resolve().parent.parent


def _get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_make_ui_opens_both_uis_on_a_local_runs_stores(mlflow_uri, tmp_path):
    from tasks.registry.tracking import mlflow_client

    run_dir = Path(mlflow_uri.removeprefix("sqlite:///")).parent
    experiment = f"ui-{tmp_path.name}"
    mlflow_client(mlflow_uri).create_experiment(experiment)
    port_5000_free = _free(5000)
    ui = subprocess.Popen(
        [sys.executable, "deploy/stack.py", "ui", "--dir", str(run_dir)],
        cwd=ROOT,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    try:
        lines = [ui.stdout.readline() for _ in range(2)]
        prefect = re.fullmatch(r"Prefect UI  (http://127\.0\.0\.1:\d+)\n", lines[0])
        mlflow = re.fullmatch(r"MLflow UI   (http://127\.0\.0\.1:\d+)\n", lines[1])
        assert prefect and mlflow, lines
        # MLflow on 5000 when it is free: the links a local run writes into its reports point there.
        if port_5000_free:
            assert mlflow[1] == "http://127.0.0.1:5000"
        else:
            assert "port 5000 is taken" in ui.stdout.readline() + ui.stdout.readline()
        assert _get(f"{prefect[1]}/ui-settings")["api_url"] == f"{prefect[1]}/api"  # its own API, not a default
        assert (run_dir / "prefect").is_dir()  # the run's PREFECT_HOME, where the demo's database lives
        with urllib.request.urlopen(f"{prefect[1]}/", timeout=30) as page:
            assert b"<html" in page.read().lower()
        found = _get(f"{mlflow[1]}/ajax-api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}")
        assert found["experiment"]["name"] == experiment
        children = [int(p.name) for p in Path("/proc").glob("[0-9]*") if _parent(int(p.name)) == ui.pid]
        assert len(children) == 2
    finally:
        ui.send_signal(signal.SIGTERM)
        assert ui.wait(timeout=60) == 0
        ui.stdout.close()
    deadline = time.monotonic() + 20
    while any(is_running(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if is_running(pid)]


def test_make_ui_without_a_run_says_what_to_do(tmp_path):
    done = subprocess.run([sys.executable, "deploy/stack.py", "ui", "--dir", str(tmp_path)], cwd=ROOT, text=True, capture_output=True, timeout=60)
    assert done.returncode == 2 and "no local run" in done.stderr and "make demo" in done.stderr
    assert "Traceback" not in done.stderr


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
