"""Checking a path a user gave before anything opens it.

`check_path` is the one check every path option of the command line goes through (`moe.cli`
runs it on each option's value, whatever the command): it refuses, in one line naming the option
and the path, what no reader should ever be handed:
- a named pipe, socket or device (opening a pipe for reading waits forever for a writer);
- a symbolic link to nothing, or a loop of links;
- a path through a file (`model.safetensors/x`: a folder was meant somewhere);
- for an input: a path that does not exist, or that this user cannot read.
What a file must hold (a LoRA, a cache folder, a manifest) is each reader's own check: a folder
where a file belongs, an empty or foreign file, the wrong kind of safetensors file.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from moe.errors import MoeError

_SPECIAL = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def special_kind(mode: int) -> str | None:
    """'a named pipe', 'a socket', ... for a path that is neither a regular file nor a folder."""
    return next((name for test, name in _SPECIAL if test(mode)), None)


def _file_in_the_way(path: Path) -> Path | None:
    """The first ancestor of `path` that exists and is not a folder (None: there is none)."""
    for parent in reversed(path.parents):
        try:
            st = os.stat(parent)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return parent
    return None


def check_path(path: str | os.PathLike, flag: str = "", must_exist: bool = True) -> Path:
    """`path` if a reader (or, with `must_exist=False`, a writer) may be handed it; otherwise a
    `MoeError` naming `flag` and the path and what to do (see the module docstring)."""
    path = Path(path)
    label = f"{flag} {path}".strip()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise MoeError(f"{label} is a link to {os.readlink(path)}, which does not exist; point it at the real file") from None
        if (blocker := _file_in_the_way(path)) is not None:
            raise MoeError(f"{label} does not exist: {blocker} is a file, not a folder") from None
        if must_exist:
            raise MoeError(f"{label} does not exist; check the path") from None
        return path
    except NotADirectoryError:
        blocker = _file_in_the_way(path)
        raise MoeError(f"{label} does not exist: {blocker or 'a part of the path'} is a file, not a folder") from None
    except PermissionError:
        raise MoeError(f"cannot read {label}: permission denied (on one of its folders)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise MoeError(f"{label} is a loop of symbolic links; point it at the real file") from None
        raise MoeError(f"cannot read {label}: {e.strerror}") from None
    kind = special_kind(st.st_mode)
    if kind is not None:
        raise MoeError(f"{label} is {kind}, not a file or folder; pass a regular file or folder")
    if must_exist and not os.access(path, os.R_OK | (os.X_OK if stat.S_ISDIR(st.st_mode) else 0)):
        raise MoeError(f"cannot read {label}: permission denied for this user")
    return path
