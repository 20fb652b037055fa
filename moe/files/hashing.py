"""sha256 of files and folders: provenance records, cache fingerprints, artifact identity."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from moe.errors import MoeError

CHUNK_BYTES = 8 << 20


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(CHUNK_BYTES)
            view = memoryview(buf)
            while n := f.readinto(buf):
                digest.update(view[:n])
    except FileNotFoundError:
        raise MoeError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise MoeError(f"{path} is a folder, expected a file") from None
    except OSError as e:
        raise MoeError(f"cannot read {path}: {e.strerror}") from None
    return digest.hexdigest()


def sha256_tree(path: str | Path) -> str:
    """A file's sha256, or for a folder a sha256 over its files' relative names and hashes
    (hidden entries such as `.cache/` skipped), so a moved or copied folder keeps its hash."""
    root = Path(path)
    if root.is_file():
        return sha256_file(root)
    if not root.is_dir():
        raise MoeError(f"{root} does not exist")
    files = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        files[relative.as_posix()] = sha256_file(file)
    return tree_digest(files)


def tree_digest(files: Mapping[str, str]) -> str:
    """The folder hash of `sha256_tree` from {relative posix path: file sha256}: lets a folder
    stored elsewhere (an S3 prefix, a manifest of files) be hashed without its bytes."""
    digest = hashlib.sha256()
    for relative in sorted(files, key=lambda name: name.split("/")):  # the order of sorted Paths
        digest.update(f"{relative}\0{files[relative]}\0".encode())
    return digest.hexdigest()
