"""The subprocess launcher: output streamed line by line (progress bars included), the child's
`error:` line as the failure message, its own timeout, and no process of a stage left behind."""

import os
import signal
import sys
import textwrap
import threading
import time

import pytest

from tasks.stages.launcher import StageFailed, run_command, stage_command


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code)]


def _gone(pid: int, within_s: float = 5.0) -> bool:
    """Dead: no such process, or a zombie (this container's init may not reap orphans)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_lines_are_streamed_and_the_error_line_is_the_message():
    lines = []
    code = """
        import sys
        print("loading")
        sys.stdout.write("step 1/3\\rstep 2/3\\rstep 3/3\\n")
        print("error: an earlier problem", file=sys.stderr)
        print("error: --dit x.safetensors is a LoRA file, not a DiT", file=sys.stderr)
        sys.exit(2)
    """
    with pytest.raises(StageFailed) as e:
        run_command(_python(code), "stage1-train", lines.append)
    assert str(e.value) == "stage1-train exited with code 2: --dit x.safetensors is a LoRA file, not a DiT"
    assert e.value.user_error and e.value.returncode == 2
    assert lines[:2] == ["loading", "step 3/3"]  # a line redrawn in place: its final state (test_progress_logs)


def test_success_returns_the_interval_and_ticks_run_on_the_caller():
    ticks = []
    result = run_command(
        _python("import time; time.sleep(0.5); print('done')"),
        "merge-low",
        lambda _: None,
        on_tick=lambda: ticks.append(threading.current_thread()),
        tick_s=0.1,
    )
    assert result.ended - result.started == pytest.approx(result.wall_s) and result.wall_s >= 0.5
    assert ticks and set(ticks) == {threading.current_thread()}


def test_timeout_kills_the_whole_process_group():
    lines = []
    code = """
        import subprocess, sys, time
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("pids", worker.pid, flush=True)
        time.sleep(120)
    """
    started = time.monotonic()
    # 4 s: time enough for the child to start its worker and print its pid on 2 busy CI cores
    with pytest.raises(StageFailed, match=r"stage2-train timed out after 4 s; its process group \(pid \d+\) was killed") as e:
        run_command(_python(code), "stage2-train", lines.append, timeout_s=4.0)
    assert e.value.timed_out and time.monotonic() - started < 15
    leader = int(str(e.value).split("pid ")[1].split(")")[0])
    worker = int(lines[0].split()[1])
    assert _gone(leader) and _gone(worker)


def test_a_stage_that_ignores_sigterm_is_killed():
    code = """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(120)
    """
    with pytest.raises(StageFailed, match="timed out"):
        run_command(_python(code), "eval", lambda _: None, timeout_s=1)


def test_nothing_outlives_a_finished_stage():
    lines = []
    code = """
        import subprocess, sys
        worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print("pids", worker.pid, flush=True)
    """
    run_command(_python(code), "prepare-data", lines.append, timeout_s=30)
    assert _gone(int(lines[0].split()[1]))


def test_a_killed_child_is_a_clear_failure():
    def kill_when_started(line):
        if line.startswith("pid"):
            os.kill(int(line.split()[1]), signal.SIGKILL)

    code = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(120)"
    with pytest.raises(StageFailed, match=r"stage2-train \(pid \d+\) was killed by SIGKILL; its last output: pid"):
        run_command(_python(code), "stage2-train", kill_when_started, timeout_s=60)


def test_stage_commands():
    assert stage_command(["stage1", "--dit", "a"], gpus=1) == [sys.executable, "-m", "moe", "stage1", "--dit", "a"]
    multi = stage_command(["stage2"], gpus=4)
    assert multi[:5] == [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "4"]
    assert multi[5] == "--main_process_port" and int(multi[6]) > 0 and multi[7:] == ["-m", "moe", "stage2"]
    for command in ("merge", "eval", "cache"):  # one process whatever LORA_MOE_GPUS gives the stage
        assert stage_command([command, "--dit", "a"], gpus=4) == [sys.executable, "-m", "moe", command, "--dit", "a"]


@pytest.mark.parametrize("grace_s, finishes", [(8.0, True), (0.3, False)])
def test_a_stopped_stage_gets_its_grace_period_before_sigkill(tmp_path, grace_s, finishes):
    """SIGTERM first, SIGKILL only after `grace_s`: a training child that takes a moment to save
    its state after SIGTERM (as `lora-moe stage1` does) finishes within a long enough grace and
    its exit code comes back; torchrun's agent under `accelerate launch` gets the same time."""
    marker = tmp_path / "saved"
    code = f"""
        import os, signal, sys, time
        def stop(signum, frame):
            time.sleep(1.0)  # saving the state
            open({str(marker)!r}, "w").write("saved")
            sys.exit(143)
        signal.signal(signal.SIGTERM, stop)
        print("shutdown timeout", os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"], flush=True)
        time.sleep(120)
    """
    lines = []
    started = time.monotonic()
    with pytest.raises(StageFailed, match="timed out") as e:
        run_command(_python(code), "stage1-train", lines.append, timeout_s=3, grace_s=grace_s)
    assert lines[0] == f"shutdown timeout {max(int(grace_s), 1)}"
    assert marker.exists() is finishes
    assert e.value.returncode == (143 if finishes else -signal.SIGKILL)
    assert time.monotonic() - started < 3 + grace_s + 3
