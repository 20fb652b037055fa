"""A local folder as an artifact store (the embedded default): `file:///path` or a plain path.

Files are copied in with their sha256 computed in the same pass and renamed into place
(`moe.atomic`), so a crash never leaves a half-written artifact under its final name. Reading
hard-links when the destination is on the same filesystem (stored files are never changed in
place) and copies otherwise, hashing either way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from urllib.parse import unquote, urlparse

from moe.atomic import atomic_file
from moe.hashing import CHUNK_BYTES, sha256_file
from tasks.artifacts.store import ArtifactStore, ObjectInfo, StoreError, Transferred


def local_path(uri: str) -> Path:
    """`file:///a/b` or `a/b` -> an absolute Path."""
    if uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise StoreError(f"{uri}: file URIs must be local (file:///path), not on host {parsed.netloc!r}")
        return Path(unquote(parsed.path))
    return Path(uri).expanduser().absolute()


def copy_hashing(src: Path, dst: Path) -> Transferred:
    """Copy `src` to `dst` and hash it in the same read."""
    digest, size = hashlib.sha256(), 0
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(src, "rb", buffering=0) as fin, open(dst, "wb") as fout:
        while n := fin.readinto(buf):
            digest.update(view[:n])
            fout.write(view[:n])
            size += n
    return Transferred(digest.hexdigest(), size)


class LocalStore(ArtifactStore):
    def __init__(self, uri: str):
        self.root = local_path(uri)
        self.root_uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / key if key else self.root

    def upload_files(self, items: list[tuple[Path, str]]) -> list[Transferred]:
        done = []
        for src, key in items:
            dst = self._path(key)
            if dst.exists():
                done.append(_same_or_refuse(src, dst, self.uri(key)))
                continue
            try:
                with atomic_file(dst) as tmp:
                    done.append(copy_hashing(src, tmp))
            except OSError as e:
                raise StoreError(f"cannot write {dst}: {e.strerror}") from None
        return done

    def download_files(self, items: list[tuple[str, Path]]) -> list[Transferred]:
        done = []
        for key, dest in items:
            src = self._path(key)
            if not src.is_file():
                raise StoreError(f"{self.uri(key)} does not exist")
            try:
                os.link(src, dest)
            except OSError:  # another filesystem, or links not allowed
                done.append(copy_hashing(src, dest))
            else:
                done.append(Transferred(sha256_file(dest), dest.stat().st_size))
        return done

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        return _info(path) if path.is_file() else None

    def list_files(self, prefix: str) -> dict[str, ObjectInfo]:
        folder = self._path(prefix)
        if not folder.is_dir():
            return {}
        return {p.relative_to(folder).as_posix(): _info(p) for p in folder.rglob("*") if p.is_file()}

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def write_bytes(self, key: str, data: bytes) -> None:
        with atomic_file(self._path(key)) as tmp:
            tmp.write_bytes(data)


def _info(path: Path) -> ObjectInfo:
    st = path.stat()
    return ObjectInfo(size=st.st_size, sha256=None, version=f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}")


def _same_or_refuse(src: Path, dst: Path, uri: str) -> Transferred:
    """An artifact key is written once: the same bytes again are fine, other bytes are not."""
    ours, theirs = sha256_file(src), sha256_file(dst)
    if ours != theirs:
        raise StoreError(f"refusing to overwrite {uri}: it already holds other bytes (artifacts are write-once)")
    return Transferred(ours, dst.stat().st_size)
