"""An exclusive lock on an output (a file or a folder) for the whole run that writes it.

The lock is a file `.NAME.lock` beside the output NAME, holding the owner's pid, host, process
start time and start date, with a kernel lock (`flock`) on it for as long as the run holds it. A
second run that wants the same output stops at once, naming the run that has it; without the
lock two runs into one folder both reported success with their files mixed.

A run killed with SIGKILL (or by the OOM killer) cannot remove its lock file, but the kernel drops
its flock. When the recorded owner ran on this host and is gone, the next run takes the lock over
and says so (a Prefect retry after an OOM kill just works). When it ran on another host, nobody
here can tell a dead run from a live one: that lock is reported with the command that clears it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

from pydantic import BaseModel, ValidationError

from moe.errors import MoeError
from moe.files.atomic import write_error

log = logging.getLogger(__name__)


class LockOwner(BaseModel):
    pid: int
    host: str
    started: str
    process_start: int | None = None  # /proc start time, so a reused pid is not taken for the owner
    token: str


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def _process_start(pid: int) -> int | None:
    """The kernel's start time of `pid` (clock ticks since boot); None where /proc is missing."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[19])  # a zombie has finished


def is_running(owner: LockOwner) -> bool | None:
    """Whether the lock's owner still runs: None when it ran on another host (cannot tell)."""
    if owner.host != socket.gethostname():
        return None
    try:
        os.kill(owner.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's live process
    now = _process_start(owner.pid)
    if Path("/proc/self/stat").exists() and now is None:
        return False  # gone between the calls, or a zombie
    return owner.process_start is None or now is None or now == owner.process_start


def read_owner(lock: Path) -> LockOwner | None:
    """The owner recorded in a lock file; None when it is empty or unreadable (being written)."""
    try:
        return LockOwner.model_validate_json(lock.read_text())
    except (OSError, ValueError, ValidationError):
        return None


def describe_lock(lock: Path, target: Path, flag: str, held: bool | None) -> str:
    """Why `target` cannot be claimed: who holds the lock (`held`: True by a live run, None by a
    run on another host), and what to do."""
    owner = read_owner(lock)
    who = f" (pid {owner.pid} on {owner.host}, started {owner.started})" if owner else ""
    if held:
        return f"{flag} {target} is in use by another run{who}; wait for it to finish or stop it (two runs writing one output would mix their files)"
    return (
        f"{flag} {target} is locked by a run on another host{who}, which this host cannot check; "
        f"if that run has ended, delete the lock (rm {lock}) and run again"
    )


def _acquire(lock: Path, target: Path, flag: str, owner: LockOwner) -> int:
    """Open `lock`, take its flock and write `owner` into it; returns the open descriptor."""
    for _ in range(10):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MoeError(describe_lock(lock, target, flag, held=True)) from None
        try:
            same_file = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # its holder removed it between our open and our flock: start again
            os.close(fd)
            continue
        previous = read_owner(lock)
        if previous is not None:
            running = is_running(previous)
            if running is not False:  # a live owner without the flock, or another host's lock
                os.close(fd)
                raise MoeError(describe_lock(lock, target, flag, held=running))
            log.warning(
                "took over the stale lock %s of pid %d (started %s), which is no longer running",
                lock,
                previous.pid,
                previous.started,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, owner.model_dump_json().encode(), 0)
        os.fsync(fd)
        return fd
    raise MoeError(describe_lock(lock, target, flag, held=True))


@contextlib.contextmanager
def output_lock(target: str | os.PathLike, flag: str) -> Iterator[Path]:
    """Hold the lock on `target` for the duration of the block (see the module docstring)."""
    target = Path(target)
    lock = lock_path(target)
    owner = LockOwner(
        pid=os.getpid(),
        host=socket.gethostname(),
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        process_start=_process_start(os.getpid()),
        token=uuid.uuid4().hex,
    )
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, target, flag, owner)
    except NotADirectoryError:
        raise MoeError(f"{flag} {target}: a part of this path is a file, not a folder") from None
    except OSError as e:
        if (error := write_error(target, e)) is None:
            raise
        raise error from None
    try:
        yield lock
    finally:
        # Removed while the flock is held; a run that opened the old file retries (see _acquire).
        current = read_owner(lock)
        if current is not None and current.token == owner.token:
            lock.unlink(missing_ok=True)
        os.close(fd)
