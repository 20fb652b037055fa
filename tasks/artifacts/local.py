"""A local folder as an artifact store (the embedded default): `file:///path` or a plain path.

Files are copied in with their sha256 computed in the same pass, renamed into place
(`moe.files.atomic`), so a crash never leaves a half-written artifact under its final name, and made
read-only. Reading never shares an inode with the store (a hard link would let an in-place change
to a stored file change every cached copy, and the reverse): it clones the file where the
filesystem can (a reflink: copy-on-write, so neither side sees the other's changes) and copies
otherwise, hashing either way.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from urllib.parse import unquote, urlparse

from moe.files.atomic import atomic_file
from moe.files.hashing import CHUNK_BYTES, sha256_file, sha256_tree
from tasks.artifacts.interface import ArtifactStore, ObjectInfo, StoreError, Transferred
from tasks.artifacts.refs import ArtifactRef

FICLONE = 0x40049409  # Linux ioctl: make `dst` share `src`'s extents copy-on-write (btrfs, XFS ...)
READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
MTIME_SLACK_S = 2.0  # file system timestamps may run a little ahead of the clock that dated the ref
REHASH_LIMIT_MIB = 64  # default of LORA_MOE_REHASH_LIMIT_MIB


def rehash_limit() -> int:
    """Bytes up to which a local object (a cache entry, a stored artifact) is re-hashed on every
    check instead of trusted on its size and times: LORA_MOE_REHASH_LIMIT_MIB (default 64)."""
    value = os.environ.get("LORA_MOE_REHASH_LIMIT_MIB", "").strip()
    try:
        return int(float(value) * (1 << 20)) if value else REHASH_LIMIT_MIB << 20
    except ValueError:
        raise StoreError(f"LORA_MOE_REHASH_LIMIT_MIB={value!r} must be a number of MiB") from None


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


def clone_or_copy(src: Path, dst: Path) -> Transferred:
    """`src`'s bytes at the new file `dst` (never the same inode), with their sha256: a reflink
    where the filesystem supports one (then hashed from `dst`), else a copy hashed as it goes."""
    if _reflink(src, dst):
        return Transferred(sha256_file(dst), dst.stat().st_size)
    return copy_hashing(src, dst)


def _reflink(src: Path, dst: Path) -> bool:
    import fcntl

    try:
        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
        return True
    except OSError as e:
        dst.unlink(missing_ok=True)
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EBADF):
            return False
        raise


def make_read_only(path: Path) -> None:
    """Clear the write bits of a file (a folder: of every file in it; folders stay writable so
    that they can still be removed)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]
    for file in files:
        file.chmod(file.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) | READ_ONLY)


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
                make_read_only(dst)  # artifacts are write-once; `atomic_file` needs to reopen tmp for writing
            except OSError as e:
                raise StoreError(f"cannot write {dst}: {e.strerror}") from None
        return done

    def download_files(self, items: list[tuple[str, Path]]) -> list[Transferred]:
        done = []
        for key, dest in items:
            src = self._path(key)
            if not src.is_file():
                raise StoreError(f"{self.uri(key)} does not exist")
            done.append(clone_or_copy(src, dest))
        return done

    def check(self, ref: ArtifactRef) -> str | None:
        """The generic checks, then a re-hash of the stored bytes when it is cheap (up to
        `rehash_limit()` bytes) or when a file was modified after the ref was made (a local file
        records no hash of its own)."""
        problem = super().check(ref)
        if problem is not None:
            return problem
        path = self._path(self.key(ref.uri))
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        made = ref.created.timestamp() + MTIME_SLACK_S
        if ref.size > rehash_limit() and all(f.stat().st_mtime <= made for f in files):
            return None
        got = sha256_tree(path)
        return None if got == ref.sha256 else f"{ref.uri} now hashes to {got[:12]}..., its ref {ref.sha256[:12]}..."

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
