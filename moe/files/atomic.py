"""Atomic writes: nothing is ever half-written.

Every file or folder the project produces is built under a temporary name in the target's own
folder (same filesystem, so the final rename is atomic), fsynced, then renamed into place. On any
error the temporary is removed and the target is left as it was; a full disk or a read-only
folder is a one-line `MoeError`.

Temporaries are named `.NAME.tmp-XXXXXXXX` (8 hex digits) after their target NAME, so what a
killed process left behind (SIGKILL runs no cleanup) is recognisable: `temporaries_of` and
`temporaries_under` find them, and `moe.files.output_paths` removes them when it claims the target.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from moe.errors import MoeError


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            with open(Path(root) / name, "rb+") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


_TEMP_RE = re.compile(r"\.(?P<target>.+)\.tmp-[0-9a-f]{8}")
# What a full disk, a quota or a read-only folder raise while writing.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def _temp_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


def temporary_target(path: Path) -> Path | None:
    """The target a temporary (`.NAME.tmp-XXXXXXXX`) was being written for; None for other names."""
    m = _TEMP_RE.fullmatch(Path(path).name)
    return Path(path).parent / m["target"] if m else None


def temporaries_of(target: Path) -> list[Path]:
    """Temporaries left next to `target` by writes of it that never finished."""
    target = Path(target)
    try:
        return sorted(p for p in target.parent.glob(f".{glob.escape(target.name)}.tmp-*") if _TEMP_RE.fullmatch(p.name))
    except OSError:
        return []


def temporaries_under(folder: Path) -> list[Path]:
    """Unfinished temporaries anywhere inside `folder` (a temporary folder counts once)."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            if _TEMP_RE.fullmatch(name):
                found.append(Path(root) / name)
        dirs[:] = [d for d in dirs if not _TEMP_RE.fullmatch(d)]
    return sorted(found)


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def size_on_disk(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size if path.exists() else 0


def write_error(target: str | os.PathLike, e: OSError) -> MoeError | None:
    """A failed write (full disk, quota, read-only folder) as one line saying what to do; None
    for other errors, which are not the user's to fix."""
    if e.errno not in _WRITE_ERRNOS:
        return None
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        hint = "free space on that disk or choose another path; nothing was written"
    else:
        hint = "the folder is not writable for this user; choose another path"
    return MoeError(f"cannot write {target}: {e.strerror}; {hint}")


@contextlib.contextmanager
def _write_errors_as_moe_errors(target: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        error = write_error(target, e)
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success fsync it and rename it to `target`.

    The caller writes the temporary path however it likes (it must close it before leaving the
    block). Overwrites `target` atomically if it exists.
    """
    target = Path(target)
    tmp = _temp_sibling(target)
    try:
        with _write_errors_as_moe_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, target)
            fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `target`; on success fsync it and move it to `target`.

    An existing `target` folder is replaced: it is renamed aside first and removed only after
    the new folder is in place.
    """
    target = Path(target)
    tmp = _temp_sibling(target)
    old = None
    try:
        with _write_errors_as_moe_errors(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            yield tmp
            fsync_tree(tmp)
            if target.exists():
                old = _temp_sibling(target)
                os.replace(target, old)
            os.replace(tmp, target)
            fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(target: str | os.PathLike, text: str) -> None:
    with atomic_file(target) as tmp:
        tmp.write_text(text)


def write_json_atomic(target: str | os.PathLike, obj) -> None:
    write_text_atomic(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")
