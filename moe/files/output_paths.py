"""Claiming an output before writing it: nothing is overwritten or lost by mistake.

Every command that writes calls `claim_output` for each output before its heavy work starts:

    with claim_output(out, flag="--out", inputs={"--lora_moe_weights": src}, overwrite=overwrite,
                      is_ours=lambda p: written_as(p, "vanilla-lora")):
        ...  # write `out` with moe.files.atomic

It refuses, with one line naming the flag:
- an output that is one of the inputs, holds one, or lies inside an input folder, after
  resolving links (`generate --save_path` pointing at a DiT overwrote the DiT);
- an output that exists, unless `overwrite` (or `reuse`: a cache updated in place, a training
  run resumed); and even then only when `is_ours` recognises it as what this command writes
  (by its header or format marker), so a file or folder lora-moe did not write is never replaced;
- an output another run is writing (`moe.files.output_lock`: the lock is held for the whole block).
Under the lock it removes the unfinished temporaries (`moe.files.atomic`) that killed runs left for
this output, saying how much space came back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from moe.errors import MoeError
from moe.files.atomic import (
    remove_path,
    size_on_disk,
    temporaries_of,
    temporaries_under,
    temporary_target,
)
from moe.files.output_lock import is_running, lock_path, output_lock, read_owner

log = logging.getLogger(__name__)

Inputs = Mapping[str, "str | os.PathLike | Iterable[str | os.PathLike] | None"]


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def _input_items(inputs: Inputs) -> list[tuple[str, Path]]:
    items = []
    for flag, value in inputs.items():
        if value is None:
            continue
        paths = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        items += [(flag, Path(p)) for p in paths if p is not None]
    return items


def check_not_an_input(target: str | os.PathLike, flag: str, inputs: Inputs) -> None:
    """Refuse an output that is an input, contains one, or lies inside an input folder."""
    out = _resolved(target)
    for input_flag, path in _input_items(inputs):
        given = _resolved(path)
        if out == given:
            problem = "is"
        elif out in given.parents:
            problem = "contains"
        elif given.is_dir() and given in out.parents:
            problem = "is inside"
        else:
            continue
        raise MoeError(
            f"{flag} {target} {problem} the input {input_flag} {path}; choose an output path outside the inputs (inputs are never modified)"
        )


def is_empty(path: Path) -> bool:
    """A folder with no files in it (empty sub-folders, locks and temporaries do not count)."""
    for root, dirs, files in os.walk(path):
        if any(temporary_target(Path(root) / f) is None and not _is_lock_name(f) for f in files):
            return False
        dirs[:] = [d for d in dirs if temporary_target(Path(root) / d) is None]
    return True


def _is_lock_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(".lock")


def _check_existing(target: Path, flag: str, overwrite: bool, reuse: bool, is_ours: Callable[[Path], bool] | None, hint: str) -> None:
    if not target.exists() or (target.is_dir() and is_empty(target)):
        return
    what = "folder" if target.is_dir() else "file"
    ours = False
    if is_ours is not None:
        with contextlib.suppress(MoeError, OSError):
            ours = bool(is_ours(target))
    if not ours:
        raise MoeError(
            f"{flag} {target} already exists and is not a {what} this command writes; it is never "
            "replaced: choose another path, or move it away first"
        )
    if not (overwrite or reuse):
        raise MoeError(f"{flag} {target} already exists; {hint}")


def remove_stale_temporaries(target: Path, folder: bool) -> list[Path]:
    """Remove what interrupted writes of `target` left (its own temporaries, and for a folder the
    temporaries inside it whose own target is not locked by a live run). Returns them."""
    candidates = temporaries_of(target) + (temporaries_under(target) if folder and target.is_dir() else [])
    removed = []
    for tmp in candidates:
        inner = temporary_target(tmp)
        if inner != target and inner is not None:
            owner = read_owner(lock_path(inner))
            if owner is not None and is_running(owner) is not False:
                continue  # another live run is writing that file right now
        size = size_on_disk(tmp)
        remove_path(tmp)
        removed.append(tmp)
        log.warning("removed %s (%s), left by an interrupted write of %s", tmp, _human(size), inner)
    return removed


def _human(nbytes: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes} B"


@contextlib.contextmanager
def claim_output(
    target: str | os.PathLike,
    *,
    flag: str,
    inputs: Inputs | None = None,
    overwrite: bool = False,
    is_ours: Callable[[Path], bool] | None = None,
    reuse: bool = False,
    folder: bool = False,
    hint: str = "pass --overwrite to replace it, or choose another path",
) -> Iterator[Path]:
    """Check `target` as an output of this command, lock it and clear its stale temporaries for
    the duration of the block (see the module docstring). `folder` says the output is a folder
    (a file there is refused, and the reverse); `hint` is what the refusal of an existing output
    of ours suggests."""
    target = Path(target)
    if folder and target.exists() and not target.is_dir():
        raise MoeError(f"{flag} {target} is a file; it expects a folder")
    if not folder and target.is_dir():
        raise MoeError(f"{flag} {target} is a folder; it expects a file path")
    check_not_an_input(target, flag, inputs or {})
    with output_lock(target, flag):
        _check_existing(target, flag, overwrite, reuse, is_ours, hint)
        remove_stale_temporaries(target, folder)
        yield target


def leftovers_report(path: str | os.PathLike) -> list[str]:
    """Lines for `lora-moe inspect`: unfinished temporaries and locks for `path` (beside a file,
    beside and inside a folder)."""
    path = Path(path)
    temps = temporaries_of(path) + (temporaries_under(path) if path.is_dir() else [])
    lines = [
        f"  unfinished temporary (an interrupted write of {temporary_target(t).name}): {t} ({_human(size_on_disk(t))}); "
        "the next run of the command that writes it removes it"
        for t in temps
    ]
    locks = [lock_path(path)] + (sorted(path.rglob(".*.lock")) if path.is_dir() else [])
    for lock in locks:
        if lock.is_file():
            owner = read_owner(lock)
            state = {
                True: "held by a running process",
                False: "stale: its process is gone (the next run takes it over)",
                None: "held on another host",
            }
            who = f"pid {owner.pid} on {owner.host} since {owner.started}, {state[is_running(owner)]}" if owner else "unreadable"
            lines.append(f"  lock {lock}: {who}")
    return lines
