"""Atomic writes: nothing is ever half-written.

Every file or folder the project produces is built under a temporary name in the target's own
folder (same filesystem, so the final rename is atomic), fsynced, then renamed into place. On any
error the temporary is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


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


def _temp_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success fsync it and rename it to `target`.

    The caller writes the temporary path however it likes (it must close it before leaving the
    block). Overwrites `target` atomically if it exists.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    try:
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    tmp.mkdir()
    old = None
    try:
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
