"""The artifact store interface: what every backend (`local.py`, `s3.py`) implements, and the
files, folders, refs and verification built on it (`store.py` opens a store for a URI).

A store is a write-once place under one root URI (`file:///data/runs` or `s3://bucket/prefix`).
Backends implement a few primitives over keys relative to their root (upload and download with
the sha256 computed in the same pass, small records, listing); this module builds files and
folders, refs and verification on top, the same way for every backend.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

from moe.errors import MoeError
from tasks.artifacts.refs import FOLDER_MANIFEST, ArtifactRef, FolderEntry, FolderManifest


class StoreError(MoeError):
    """A storage problem (unreachable endpoint, missing object, hash mismatch), in one sentence."""


@dataclass(frozen=True)
class ObjectInfo:
    size: int
    sha256: str | None  # as recorded with the object (S3 tag), None when unknown
    version: str  # changes whenever the object does (ETag, mtime): keys the input-hash index


@dataclass(frozen=True)
class Transferred:
    sha256: str
    size: int


class ArtifactStore(abc.ABC):
    """Backend primitives; keys are posix paths relative to `root_uri`."""

    root_uri: str
    records_hashes = False  # every object this store wrote carries its sha256 (S3: the `sha256` tag)

    @abc.abstractmethod
    def upload_files(self, items: list[tuple[Path, str]]) -> list[Transferred]:
        """Store local files at keys, hashing each in the same pass as its upload. An existing
        key is never overwritten: the same bytes are accepted as already stored, other bytes
        raise `StoreError`."""

    @abc.abstractmethod
    def download_files(self, items: list[tuple[str, Path]]) -> list[Transferred]:
        """Write objects to local paths (their folders exist), hashing in the same pass."""

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size, recorded sha256 and version of one object; None when absent."""

    @abc.abstractmethod
    def list_files(self, prefix: str) -> dict[str, ObjectInfo]:
        """{path relative to prefix: size and version (no sha256)} of every object under `prefix/`."""

    @abc.abstractmethod
    def read_bytes(self, key: str) -> bytes | None:
        """A small record, or None when absent."""

    @abc.abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """A small record (replaced atomically when it exists: cache records, not artifacts)."""

    def uri(self, key: str) -> str:
        return f"{self.root_uri.rstrip('/')}/{key}" if key else self.root_uri

    def key(self, uri: str) -> str:
        """The key of a URI under this store's root."""
        root = self.root_uri.rstrip("/") + "/"
        if not uri.startswith(root):
            raise StoreError(f"{uri} is not under the artifact root {self.root_uri}")
        return uri[len(root) :]

    # -- files and folders on top of the primitives ------------------------------------------

    def put(self, local: Path, key: str, kind: str, producer: str) -> ArtifactRef:
        """Store a local file or folder at `key`; returns its ref (sha256 from the upload pass)."""
        local = Path(local)
        if local.is_file():
            done = self.upload_files([(local, key)])[0]
            return ArtifactRef(uri=self.uri(key), sha256=done.sha256, size=done.size, kind=kind, producer=producer)
        if not local.is_dir():
            raise StoreError(f"cannot store {local}: it does not exist")
        files = local_folder_files(local)
        done = self.upload_files([(local / rel, f"{key}/{rel}") for rel in files])
        manifest = FolderManifest(files=[FolderEntry(path=rel, sha256=t.sha256, size=t.size) for rel, t in zip(files, done)])
        self.write_bytes(f"{key}/{FOLDER_MANIFEST}", manifest.model_dump_json(indent=1).encode())
        return ArtifactRef(uri=self.uri(key), sha256=manifest.sha256, size=manifest.size, kind=kind, layout="folder", producer=producer)

    def folder_manifest(self, key: str) -> FolderManifest:
        """A stored folder's manifest; a folder stored by other tools (no manifest) is listed,
        with hashes filled in when it is downloaded."""
        raw = self.read_bytes(f"{key}/{FOLDER_MANIFEST}")
        if raw is not None:
            return FolderManifest.model_validate_json(raw)
        files = {rel: info for rel, info in self.list_files(key).items() if not _hidden(rel)}
        if not files:
            raise StoreError(f"{self.uri(key)} holds no files")
        return FolderManifest(files=[FolderEntry(path=rel, sha256=None, size=files[rel].size) for rel in _sorted_paths(files)])

    def get(self, key: str, dest: Path, layout: str) -> tuple[str, int]:
        """Download a file or folder to `dest` (absent; its parent exists); returns the sha256
        computed while downloading (a folder: its sha256_tree) and the size."""
        if layout == "file":
            done = self.download_files([(key, dest)])[0]
            return done.sha256, done.size
        manifest = self.folder_manifest(key)
        for entry in manifest.files:
            (dest / entry.path).parent.mkdir(parents=True, exist_ok=True)
        done = self.download_files([(f"{key}/{e.path}", dest / e.path) for e in manifest.files])
        for entry, got in zip(manifest.files, done):
            if entry.sha256 is not None and got.sha256 != entry.sha256:
                raise StoreError(
                    f"{self.uri(key)}/{entry.path} does not match its folder manifest "
                    f"(sha256 {got.sha256[:12]}..., expected {entry.sha256[:12]}...): the stored copy is damaged"
                )
        got = FolderManifest(files=[FolderEntry(path=e.path, sha256=t.sha256, size=t.size) for e, t in zip(manifest.files, done)])
        return got.sha256, got.size

    def check(self, ref: ArtifactRef) -> str | None:
        """None when the stored object still matches `ref` as far as the store can tell without
        downloading it: it exists, has the ref's size, and the sha256 the store records for it
        (an S3 tag, a folder's manifest) is the ref's; else why not, in one phrase. Backends that
        can re-hash cheaply check more (`LocalStore`)."""
        key = self.key(ref.uri)
        if ref.layout == "file":
            info = self.stat(key)
            if info is None:
                return f"{ref.uri} is gone"
            if info.size != ref.size:
                return f"{ref.uri} holds {info.size} bytes, its ref {ref.size}"
            if info.sha256 is not None and info.sha256 != ref.sha256:
                return f"{ref.uri} records sha256 {info.sha256[:12]}..., its ref {ref.sha256[:12]}..."
            if info.sha256 is None and self.records_hashes and ref.producer != "input":
                return f"{ref.uri} lost its sha256 record (it was written again by something else)"
            return None
        files = {rel: info.size for rel, info in self.list_files(key).items() if not _hidden(rel)}
        if not files:
            return f"{ref.uri} is gone"
        raw = self.read_bytes(f"{key}/{FOLDER_MANIFEST}")
        if raw is not None:
            manifest = FolderManifest.model_validate_json(raw)
            if manifest.sha256 != ref.sha256:
                return f"{ref.uri}: its manifest records sha256 {manifest.sha256[:12]}..., its ref {ref.sha256[:12]}..."
            if files != {f.path: f.size for f in manifest.files}:
                return f"{ref.uri}: its files are not the ones its manifest lists"
        if sum(files.values()) != ref.size:
            return f"{ref.uri} holds {sum(files.values())} bytes, its ref {ref.size}"
        return None

    def layout_of(self, key: str) -> str | None:
        """'file', 'folder' or None (nothing at `key`)."""
        if self.stat(key) is not None:
            return "file"
        return "folder" if self.list_files(key) else None


def _hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def local_folder_files(folder: Path) -> list[str]:
    """The files of a local folder as sorted relative posix paths, hidden entries skipped (as
    `moe.files.hashing.sha256_tree` does, so a stored folder hashes like the local one)."""
    return _sorted_paths(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder).as_posix()))


def _sorted_paths(paths) -> list[str]:
    return sorted(paths, key=lambda name: name.split("/"))
