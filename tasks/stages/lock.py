"""One stage work folder, one run at a time: `WORK_DIR/stages/STAGE/KEY.lock`.

Two flow runs that compute the same stage (same inputs and settings, so the same cache key) share
its work folder, where a failed run's saved state waits for the retry that resumes it. A run that
finds the folder's lock held waits for the holder instead of writing into it:

- the holder finished the stage: its result is now in the stage cache, so this run fails with a
  retryable `StageBusy`, and the retry (Prefect re-reads the cache on every attempt) takes that
  result without computing anything;
- the holder failed or died: this run takes the folder over and resumes from its saved state;
- the wait outlasts the stage's timeout: a retryable `StageBusy` that names the holder.

The lock is a kernel `flock` on the lock file, taken by the flow process and inherited by the
stage command (`keep_fds` of `run_command`), so it is released only when both are gone: after
kill -9 of a flow process, its training command still saving its state on SIGTERM keeps the
folder until it exits. The file itself records who holds it and how the holder ended (for the
messages); it is never deleted, so there is no race between removing and re-creating it.
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

WAIT_LOG_S = 60.0  # how often a waiting run says whom it waits for
POLL_S = 0.5


class StageBusy(RuntimeError):
    """Another run holds (or just finished) this stage's work folder; worth retrying."""


class StageLock:
    """The lock on one stage work folder (`folder.lock` beside it); see the module docstring."""

    def __init__(self, folder: Path, holder: dict[str, str]):
        self.folder, self.path = folder, folder.with_name(folder.name + ".lock")
        self.holder = holder | {"pid": str(os.getpid()), "host": socket.gethostname()}
        self.fd: int | None = None

    def acquire(self, timeout_s: float | None, log: Callable[[str], None], refresh: bool = False) -> None:
        """Take the lock, waiting for a holder (see the module docstring for what follows a wait).
        `refresh`: this run recomputes the stage anyway (forced), so a finished holder is no reason
        to stop."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            waited = self._wait(fd, timeout_s, log)
            previous = self._read(fd)
            self.fd = fd
        except BaseException:
            os.close(fd)
            raise
        self._write({"outcome": "running"})
        if not waited:
            return
        who = self._describe(previous)
        if previous.get("outcome") == "completed" and not refresh:
            self.release()
            raise StageBusy(f"{who} finished this stage while this run waited for its work folder {self.folder}; a retry takes its cached result")
        log(
            f"took over the work folder {self.folder} from {who}, which ended "
            f"{'with ' + previous['outcome'] if previous.get('outcome') not in (None, 'running') else 'without finishing'}"
        )

    def _wait(self, fd: int, timeout_s: float | None, log: Callable[[str], None]) -> bool:
        """Block until the flock is ours; whether anyone held it first."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            pass
        started = time.monotonic()
        next_log = started
        while True:
            now = time.monotonic()
            if timeout_s is not None and now - started > timeout_s:
                raise StageBusy(
                    f"{self._describe(self._read(fd))} still holds the work folder {self.folder} after "
                    f"{timeout_s:g} s of waiting; retry when it has finished"
                )
            if now >= next_log:
                log(f"waiting for {self._describe(self._read(fd))}, which holds the work folder {self.folder}")
                next_log = now + WAIT_LOG_S
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                time.sleep(POLL_S)

    def finish(self, outcome: str) -> None:
        """Record how this run's stage ended ("completed" or "failed") and let the next run in."""
        if self.fd is not None:
            self._write({"outcome": outcome})
            self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # the stage command's inherited copy has exited by now
            self.fd = None

    def _write(self, extra: dict[str, str]) -> None:
        record = self.holder | {"since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")} | extra
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(record).encode(), 0)

    @staticmethod
    def _read(fd: int) -> dict[str, str]:
        try:
            value = json.loads(os.pread(fd, 65536, 0) or b"{}")
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}

    @staticmethod
    def _describe(record: dict[str, str]) -> str:
        if not record.get("pid"):
            return "another run"
        run = f"flow run {record['flow_run_id']}" if record.get("flow_run_id") else "another run"
        return f"{run} (pid {record['pid']} on {record.get('host', '?')}, since {record.get('since', '?')})"
