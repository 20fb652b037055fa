"""Two runs into one output (issue 12, class 7): the output is locked for the whole run; a second
run stops at once naming the first; a lock left by a killed run on this host is taken over (and
said so); one from another host is reported with the command that clears it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import LockHolder, run_cli

from moe.config.train import Stage1Config
from moe.errors import MoeError
from moe.files.output_lock import lock_path, output_lock, read_owner
from moe.train.run_dir import claim_run_dir, is_main_process


@pytest.fixture(scope="module")
def ws(stage2_run):
    r = stage2_run
    return r | {"model_dir": r["root"] / "models", "low": r["models"].low_noise, "high": r["models"].high_noise}


WRITERS = [
    ("merge", "m.safetensors", lambda ws, o: ["merge", "--quiet", "--dit", ws["low"], "--lora_weight", ws["vanilla_lora"], "--save_merged_model", o]),
    ("export-expert", "e.safetensors", lambda ws, o: ["export-expert", "--lora_moe_weights", ws["lora_moe"], "--expert", "hook", "--out", o]),
    (
        "generate",
        "v.mp4",
        lambda ws, o: [
            "generate",
            "--dit",
            ws["low"],
            "--dit_high_noise",
            ws["high"],
            "--model_set",
            ws["model_dir"],
            "--prompt",
            "x",
            "--infer_steps",
            "1",
            "--video_size",
            "32x32",
            "--video_length",
            "5",
            "--save_path",
            o,
        ],
    ),
    ("models tiny", "m", lambda ws, o: ["models", "tiny", "--out", o]),
    ("data synth", "d", lambda ws, o: ["data", "synth", "--clips", "1", "--out", o]),
    (
        "cache",
        "c",
        lambda ws, o: [
            "cache",
            "--quiet",
            "--manifest",
            ws["manifest"],
            "--model_set",
            ws["model_dir"],
            "--size",
            "64x64",
            "--frames",
            "17",
            "--out",
            o,
        ],
    ),
    ("stage1", "s1", lambda ws, o: ["stage1", "--dit", ws["low"], "--dit_high_noise", ws["high"], "--dataset", ws["cache"], "--output_dir", o]),
    (
        "stage2",
        "s2",
        lambda ws, o: [
            "stage2",
            "--dit",
            ws["merged_low"],
            "--dit_high_noise",
            ws["merged_high"],
            "--dataset",
            ws["cache"],
            "--network_dim",
            "8",
            "--output_dir",
            o,
        ],
    ),
    ("workflow", "w", lambda ws, o: ["workflow", "run", "--quiet", "--output_dir", o]),
]


@pytest.mark.parametrize("command, name, argv", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_second_run_into_a_locked_output_stops_at_once(ws, tmp_path, capsys, command, name, argv):
    out = tmp_path / name
    holder = LockHolder(out)
    try:
        code, _, err = run_cli(capsys, argv(ws, out))
    finally:
        holder.stop()
    assert code == 2, err
    assert f"{out} is in use by another run (pid {holder.process.pid} on {socket.gethostname()}, started" in err, err
    assert not out.exists()


def _plant_lock(target: Path, pid: int, host: str) -> Path:
    lock = lock_path(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(json.dumps({"pid": pid, "host": host, "started": "2026-12-01T10:00:00+00:00", "token": "t"}))
    return lock


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_lock_left_by_a_killed_run_here_is_taken_over(ws, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    pid = _dead_pid()
    lock = _plant_lock(out, pid, socket.gethostname())
    code, _, err = run_cli(capsys, WRITERS[0][2](ws, out))
    assert code == 0, err
    assert f"warning: took over the stale lock {lock} of pid {pid} (started 2026-12-01T10:00:00+00:00), which is no longer running" in err
    assert out.is_file() and not lock.exists()


def test_a_lock_from_another_host_is_reported_with_how_to_clear_it(ws, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    lock = _plant_lock(out, 4242, "gpu-node-17")
    code, _, err = run_cli(capsys, WRITERS[0][2](ws, out))
    assert code == 2 and err.count("\n") == 1, err
    assert f"{out} is locked by a run on another host (pid 4242 on gpu-node-17, started 2026-12-01T10:00:00+00:00)" in err
    assert f"if that run has ended, delete the lock (rm {lock}) and run again" in err
    assert lock.exists() and not out.exists()


def test_a_live_owner_recorded_without_a_kernel_lock_is_respected(tmp_path):
    """A lock file naming a live process of this host is honoured even without its flock
    (a lock written by an older version, or over a filesystem without flock)."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant_lock(tmp_path / "out", holder.pid, socket.gethostname())
        with pytest.raises(MoeError, match=f"is in use by another run \\(pid {holder.pid} on"):
            with output_lock(tmp_path / "out", "--out"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_exactly_one_of_many_concurrent_claims_wins(tmp_path):
    target, start = tmp_path / "out", threading.Barrier(8)
    won, refused = [], []

    def claim():
        start.wait()
        try:
            with output_lock(target, "--out"):
                won.append(read_owner(lock_path(target)).token)
                time.sleep(0.3)
        except MoeError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1 and len(refused) == 7
    assert all("is in use by another run" in r for r in refused)
    assert not lock_path(target).exists()  # released


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path / "out", "--out"):
            assert lock_path(tmp_path / "out").is_file()
            raise RuntimeError("the run failed")
    assert not lock_path(tmp_path / "out").exists()
    with output_lock(tmp_path / "out", "--out"):  # and can be taken again
        pass


def test_only_the_main_process_of_a_multi_process_run_claims(tiny_workspace, tmp_path, monkeypatch):
    cfg = Stage1Config(dit=tiny_workspace["models"].low_noise, dataset=tiny_workspace["cache"], output_dir=tmp_path / "run")
    holder = LockHolder(cfg.output_dir)
    try:
        monkeypatch.setenv("RANK", "1")
        assert not is_main_process()
        with claim_run_dir(cfg, "stage1", "vanilla_lora.safetensors"):  # rank 1: no claim, no refusal
            pass
        monkeypatch.setenv("RANK", "0")
        assert is_main_process()
        with pytest.raises(MoeError, match="is in use by another run"):
            with claim_run_dir(cfg, "stage1", "vanilla_lora.safetensors"):
                pass
    finally:
        holder.stop()
