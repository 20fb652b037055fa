"""Two runs at once are safe (issue 22, item 4): processes that open one fresh MLflow SQLite store
at the same moment all get it (its creation is serialised by a file lock) instead of failing in
MLflow's schema migration."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

OPEN_STORE = """
import sys, time
start = float(sys.argv[2])
import mlflow  # imported before the common start, so that the creations overlap
from tasks.registry.tracking import mlflow_client
time.sleep(max(0.0, start - time.time()))
client = mlflow_client(sys.argv[1])
client.create_experiment(f"e-{sys.argv[3]}")
print("ok")
"""


def test_processes_opening_one_fresh_sqlite_store_at_once_all_get_it(tmp_path):
    root = Path(__file__).resolve().parent.parent
    uri = f"sqlite:///{tmp_path / 'root' / 'mlflow.db'}"
    start = time.time() + 8  # after every process has imported mlflow, even on a busy machine
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", OPEN_STORE, uri, str(start), str(i)],
            cwd=root,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=os.environ | {"PYTHONPATH": str(root)},
        )
        for i in range(3)
    ]
    results = [p.communicate(timeout=300) for p in processes]
    for process, (out, err) in zip(processes, results):
        assert process.returncode == 0 and out.strip() == "ok", err[-12000:]
