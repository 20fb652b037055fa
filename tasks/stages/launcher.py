"""Run one `lora-moe` stage as a child process: stream its output, enforce a timeout, kill its
whole process group on timeout or cancellation, and turn a failure into one clear message.

Every GPU/torch stage runs this way (`python -m moe STAGE ...`, or `accelerate launch
--num_processes N -m moe STAGE ...` for N > 1 GPUs), so the flow process never imports torch.

Process groups: each stage command starts a new process group (its leader is the child), which
holds the child and everything it starts (accelerate's per-GPU workers, data loader workers).
Killing that group on timeout kills the whole stage and nothing else; Prefect's own
`timeout_seconds` does not stop a child process. The flow calls `terminate_all()` when it ends
for any reason (a cancel from the UI arrives as SIGTERM, which Prefect turns into an exception
in the flow's thread), so a cancelled run leaves no stage running behind it.

A stage command also dies with its flow: when the flow process itself is killed (SIGKILL, the OOM
killer), so that nothing of it can clean up, the kernel sends the command SIGTERM
(`PR_SET_PDEATHSIG`, requested by a small trampoline before the command is exec'd), and the
command's own shutdown stops what it started.

Stopping a group is SIGTERM, then SIGKILL after a grace period (`grace_s`; the pipeline gives
every stage `resources.*.stop_grace_s`, 90 s by default): a training child saves its state at
the next optimizer step and exits with 143 (`moe.errors.EXIT_STOPPED`), which is retried like any
failure other than bad input (2), and the retry resumes. Under `accelerate launch` the workers
get the same time from torchrun's agent (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, set from `grace_s`).
"""

from __future__ import annotations

import collections
import math
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GRACE_S = 5.0  # SIGTERM, then SIGKILL after this long (run_command's default)
REDRAW_INTERVAL_S = 30.0  # a progress bar redrawn in place: at most one log line this often
# Started in front of every stage command on Linux: asks the kernel to send the child SIGTERM when
# the flow process (the thread that started it, which waits for it) dies, even by SIGKILL or OOM,
# then becomes the command (exec keeps the request). A parent already gone by then: exit 143.
# Done in the child rather than in `preexec_fn`, which is unsafe in a threaded process.
_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(143)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)
_live: dict[int, str] = {}  # process group id -> stage name
_grace: dict[int, float] = {}  # process group id -> its grace period
_live_lock = threading.Lock()


class StageFailed(RuntimeError):
    """A stage command failed; the message says why in one sentence (the child's last
    `error:` line when it printed one)."""

    def __init__(self, message: str, returncode: int | None = None, timed_out: bool = False):
        super().__init__(message)
        self.returncode, self.timed_out = returncode, timed_out

    @property
    def user_error(self) -> bool:
        """Bad input (exit code 2): retrying cannot help."""
        return self.returncode == 2


@dataclass(frozen=True)
class CommandResult:
    command: list[str]
    pid: int
    started: float  # time.time() at start and end: stage intervals are compared across tasks
    ended: float

    @property
    def wall_s(self) -> float:
        return self.ended - self.started


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The commands that train data parallel under `accelerate launch`; the others (cache, merge,
# eval) are one process on the first GPU however many the stage has (N copies of a merge or an
# eval would all claim the same output).
DATA_PARALLEL_COMMANDS = ("stage1", "stage2")


def stage_command(args: list[str], gpus: int = 1) -> list[str]:
    """The child command for one `lora-moe` stage on `gpus` GPUs (0 or 1, or a command that is
    not data parallel: one process)."""
    if gpus <= 1 or args[0] not in DATA_PARALLEL_COMMANDS:
        return [sys.executable, "-m", "moe", *args]
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(gpus),
        "--main_process_port",
        str(free_port()),
        "-m",
        "moe",
        *args,
    ]


def _last_drawn(segments: list[bytes]) -> bytes:
    """What a terminal would show of a line redrawn with carriage returns: its last non-empty draw."""
    return next((s for s in reversed(segments) if s.strip()), b"")


def _read_lines(stream, lines: queue.Queue, redraw_interval_s: float | None = None) -> None:
    """Split the child's output into lines, then signal the end with None. A line redrawn in
    place with carriage returns (a progress bar: `moe.runtime.progress` draws one only on a terminal, but
    a library may not ask) is one line, its final state, plus its latest state at most every
    `redraw_interval_s` while it is being redrawn: never a log line per redraw."""
    interval = REDRAW_INTERVAL_S if redraw_interval_s is None else redraw_interval_s
    pending, last_redraw = b"", -math.inf
    while chunk := os.read(stream.fileno(), 65536):
        pending += chunk.replace(b"\r\n", b"\n")
        *complete, pending = pending.split(b"\n")
        for line in complete:
            lines.put(_last_drawn(line.split(b"\r")).decode("utf-8", "replace"))
        if b"\r" in pending:
            *drawn, pending = pending.split(b"\r")  # the part after the last \r may be half written
            latest = _last_drawn(drawn)
            if latest and time.monotonic() - last_redraw >= interval:
                lines.put(latest.decode("utf-8", "replace"))
                last_redraw = time.monotonic()
    if pending:
        lines.put(pending.decode("utf-8", "replace"))
    lines.put(None)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies, which hold no resources and
    wait only to be reaped, do not count)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: signal 0 counts zombies too
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def kill_group(pgid: int, grace_s: float = GRACE_S) -> None:
    """SIGTERM the process group, SIGKILL what is left after `grace_s`."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and group_alive(pgid):
        time.sleep(0.05)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def terminate_all(grace_s: float | None = None) -> list[str]:
    """Stop every stage command still running in this process, each with its own grace period
    (or `grace_s`), all at once; returns their names."""
    with _live_lock:
        groups, graces = dict(_live), dict(_grace)
    threads = [
        threading.Thread(target=kill_group, args=(pgid, graces.get(pgid, GRACE_S) if grace_s is None else grace_s), daemon=True) for pgid in groups
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return list(groups.values())


def _exited(pid: int) -> bool:
    """Whether the child has exited, without reaping it: while unreaped, its pid (the process
    group id) cannot be reused, so killing the group never hits an unrelated process."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def run_command(
    command: list[str],
    name: str,
    log: Callable[[str], None],
    timeout_s: float | None = None,
    on_tick: Callable[[], None] | None = None,
    tick_s: float = 2.0,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    grace_s: float = GRACE_S,
    keep_fds: tuple[int, ...] = (),
) -> CommandResult:
    """Run `command`, passing each output line to `log` and calling `on_tick` every `tick_s`
    seconds (both on the calling thread, so they may use the Prefect run context). Raises
    `StageFailed` on a non-zero exit, a signal or the timeout. A stop (the timeout, an exception
    or cancellation here, `terminate_all`) is SIGTERM, then SIGKILL after `grace_s`. `keep_fds`:
    descriptors the child inherits (a lock it holds with its caller)."""
    started = time.time()
    child_env = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(max(int(grace_s), 1))} | os.environ | (env or {})
    launched = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *command] if sys.platform == "linux" else command
    child = subprocess.Popen(
        launched,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=child_env | {"PYTHONUNBUFFERED": "1"},
        cwd=cwd,
        process_group=0,
        pass_fds=keep_fds,
    )
    with _live_lock:
        _live[child.pid], _grace[child.pid] = name, grace_s
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(child.stdout, lines), daemon=True, name=f"{name}-output")
    reader.start()
    tail: collections.deque[str] = collections.deque(maxlen=20)
    errors: list[str] = []

    def take(line: str) -> None:
        if line.strip():
            log(line)
            tail.append(line)
            if line.startswith("error: "):
                errors.append(line.removeprefix("error: ").strip())

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    next_tick = time.monotonic() + tick_s
    timed_out = False
    try:
        while not _exited(child.pid):
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                line = ""
            if line is None:  # output closed: the child is exiting
                lines.put(None)
                time.sleep(0.02)
                continue
            take(line)
            if on_tick is not None and time.monotonic() >= next_tick:
                on_tick()
                next_tick = time.monotonic() + tick_s
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                kill_group(child.pid, grace_s)
    finally:
        # Whatever happened (exit, timeout, an exception or cancellation in this thread), nothing
        # of this stage outlives it: a leader's exit does not end the processes it started.
        kill_group(child.pid, grace_s=0 if _exited(child.pid) else grace_s)
        returncode = child.wait()
        with _live_lock:
            _live.pop(child.pid, None)
            _grace.pop(child.pid, None)
        reader.join(timeout=5)
        while not lines.empty():
            line = lines.get_nowait()
            if line is not None:
                take(line)
        child.stdout.close()
    if on_tick is not None:
        on_tick()
    if timed_out:
        raise StageFailed(
            f"{name} timed out after {timeout_s:g} s; its process group (pid {child.pid}) was killed",
            returncode,
            timed_out=True,
        )
    if returncode < 0:
        raise StageFailed(
            f"{name} (pid {child.pid}) was killed by {signal.Signals(-returncode).name}; its last output: {tail[-1] if tail else 'none'}",
            returncode,
        )
    if returncode != 0:
        detail = errors[-1] if errors else (tail[-1] if tail else "no output")
        raise StageFailed(f"{name} exited with code {returncode}: {detail}", returncode)
    return CommandResult(command=command, pid=child.pid, started=started, ended=time.time())
