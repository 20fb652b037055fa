"""The worker-side download cache: every fetched artifact once per worker, keyed by sha256.

    ROOT/sha256/ab/abcdef.../NAME      a verified file or folder (NAME: the artifact's name), read-only
    ROOT/sha256/ab/abcdef.../.verified.json  size, times and inode of each of its files when
                                       they were last verified
    ROOT/inputs/<sha256 of URI>.json   URI -> sha256 for inputs given by URI (not by ref), keyed
                                       by the object's version (ETag or inode/size/mtime), so an
                                       unchanged input is not hashed again
    ROOT/tmp/                          downloads in progress (renamed into place when verified)

A fetch writes to a temporary folder and renames it into place only after the sha256 computed
during the download matched, so concurrent fetches of one artifact (merge-low and merge-high
both want the LoRA) cannot see a half-written file.

What a hit hands out is verified again: each file's size, modification and change times and inode
must be the ones recorded when its sha256 was last checked, and an entry of up to
LORA_MOE_REHASH_LIMIT_MIB (default 64 MiB) is re-hashed on every hit. An entry whose stamps
changed is re-hashed; one whose bytes changed is removed and fetched again. Entries never share an
inode with the store they came from (`LocalStore` clones or copies), and a file that does (an entry
made by an older version, which hard-linked) gets its own copy at its next hit. Nothing else is
evicted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from moe.files.atomic import write_json_atomic
from moe.files.hashing import sha256_tree
from tasks.artifacts.interface import StoreError
from tasks.artifacts.local import copy_hashing, make_read_only, rehash_limit
from tasks.artifacts.refs import ArtifactRef
from tasks.artifacts.store import store_for_uri

RECORD = ".verified.json"  # hidden: never taken for the entry's file
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """LORA_MOE_DOWNLOAD_CACHE, else the worker's (LORA_MOE_WORK_DIR/downloads, which the flow
    uses), else ~/.cache/lora-moe/downloads (the flow's default for an S3 artifact root)."""
    if os.environ.get("LORA_MOE_DOWNLOAD_CACHE"):
        return Path(os.environ["LORA_MOE_DOWNLOAD_CACHE"])
    return Path(os.environ.get("LORA_MOE_WORK_DIR") or Path.home() / ".cache" / "lora-moe") / "downloads"


class DownloadCache:
    def __init__(self, root: str | Path | None = None, s3=None):
        self.root = Path(root) if root is not None else default_cache_dir()
        self.s3 = s3  # tasks.artifacts.s3.S3Options for s3:// URIs

    def _entry(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def cached(self, sha256: str) -> Path | None:
        """The cached file or folder with this sha256, verified (see the module's notes); None
        when there is none, or when the one there no longer has these bytes (it is removed)."""
        entry = self._entry(sha256)
        children = [c for c in entry.iterdir() if not c.name.startswith(".")] if entry.is_dir() else []
        if not children:
            return None
        path = children[0]
        try:
            shared = [f for f in _files(path) if f.stat().st_nlink > 1]
            for file in shared:  # an older cache hard-linked from a local store: give it its own inode
                _unshare(file)
            stamps = _stamps(path)
            record = _read_record(entry / RECORD)
            if record.get("stamps") == stamps and sum(s[0] for s in stamps.values()) > rehash_limit():
                return path
            got = sha256_tree(path)
        except OSError as e:
            log.warning(f"download cache entry {path} cannot be checked ({e}); fetching it again")
            got = None
        if got != sha256:
            log.warning(f"download cache entry {path} no longer has sha256 {sha256[:12]}...; fetching it again")
            shutil.rmtree(entry, ignore_errors=True)
            return None
        try:
            write_json_atomic(entry / RECORD, {"sha256": sha256, "stamps": _stamps(path)})
        except OSError:  # a cache this process may read but not write: re-hashed at every hit
            pass
        return path

    def fetch(self, ref: ArtifactRef) -> Path:
        """The local path of `ref`'s bytes, downloaded and verified unless already cached."""
        hit = self.cached(ref.sha256)
        if hit is not None:
            return hit
        path, sha256, _ = self._download(ref.uri, ref.name, ref.layout)
        if sha256 != ref.sha256:
            shutil.rmtree(path.parent, ignore_errors=True)
            raise StoreError(
                f"{ref.uri} does not match its ref: sha256 {sha256[:12]}... instead of {ref.sha256[:12]}... (the stored object changed or is damaged)"
            )
        return self._keep(path, sha256)

    def resolve(self, uri: str, kind: str) -> ArtifactRef:
        """A ref for an input given by URI: its sha256 from the cache index when the object did
        not change, else from the object's recorded hash, else by downloading (and so caching) it."""
        store, key = store_for_uri(uri, self.s3)
        uri = store.uri(key)
        layout = store.layout_of(key)
        if layout is None:
            raise StoreError(f"input {uri} does not exist")
        if layout == "file":
            info = store.stat(key)
            version, size, recorded = info.version, info.size, info.sha256
        else:
            listing = store.list_files(key)
            version = hashlib.sha256(json.dumps(sorted((k, v.size, v.version) for k, v in listing.items())).encode()).hexdigest()
            manifest = store.folder_manifest(key)  # ours records every file's hash
            size = manifest.size
            recorded = manifest.sha256 if all(f.sha256 for f in manifest.files) else None
        index = self.root / "inputs" / f"{hashlib.sha256(uri.encode()).hexdigest()}.json"
        known = json.loads(index.read_text()) if index.is_file() else {}
        if known.get("version") == version:
            sha256 = known["sha256"]
        elif recorded is not None:
            sha256 = recorded
        else:
            path, sha256, size = self._download(uri, uri.rstrip("/").rsplit("/", 1)[-1], layout)
            self._keep(path, sha256)
        write_json_atomic(index, {"uri": uri, "version": version, "sha256": sha256, "size": size})
        return ArtifactRef(uri=uri, sha256=sha256, size=size, kind=kind, layout=layout, producer="input")

    def adopt(self, path: Path, sha256: str) -> Path:
        """A copy of a local file with this sha256 in the cache (the copy is hashed as it is made:
        the file is neither moved nor linked, so nothing else shares the entry); returns its
        cached path."""
        if (hit := self.cached(sha256)) is not None:
            return hit
        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        got = copy_hashing(Path(path), tmp / Path(path).name).sha256
        if got != sha256:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(f"{path} does not match its ref: sha256 {got[:12]}... instead of {sha256[:12]}...")
        return self._keep(tmp / Path(path).name, sha256)

    def _download(self, uri: str, name: str, layout: str) -> tuple[Path, str, int]:
        store, key = store_for_uri(uri, self.s3)
        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        try:
            sha256, size = store.get(key, tmp / name, layout)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp / name, sha256, size

    def _keep(self, path: Path, sha256: str) -> Path:
        """Move a verified download into its entry, read-only and with its stamps recorded
        (another worker thread may have won)."""
        make_read_only(path)
        write_json_atomic(path.parent / RECORD, {"sha256": sha256, "stamps": _stamps(path)})
        entry = self._entry(sha256)
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path.parent, entry)
        except OSError:  # already there
            shutil.rmtree(path.parent, ignore_errors=True)
            hit = self.cached(sha256)
            if hit is None:
                raise StoreError(f"download cache entry {entry} appeared and failed its check at once") from None
            return hit
        return entry / path.name


def _files(path: Path) -> list[Path]:
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def _stamps(path: Path) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns, ctime_ns, inode]} of an entry's files. The change time
    moves with any write or chmod and cannot be set back, so an edit that restores the
    modification time is still seen."""
    stamps = {}
    for file in _files(path):
        st = file.stat()
        stamps[file.relative_to(path).as_posix() if file != path else ""] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return stamps


def _read_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _unshare(file: Path) -> None:
    """Replace a hard-linked file by a private copy with the same bytes."""
    tmp = file.with_name(f".unshare-{uuid.uuid4().hex}")
    try:
        copy_hashing(file, tmp)
        make_read_only(tmp)
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
