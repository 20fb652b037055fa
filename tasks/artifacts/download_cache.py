"""The worker-side download cache: every fetched artifact once per worker, keyed by sha256.

    ROOT/sha256/ab/abcdef.../NAME      a verified file or folder (NAME: the artifact's name)
    ROOT/inputs/<sha256 of URI>.json   URI -> sha256 for inputs given by URI (not by ref), keyed
                                       by the object's version (ETag or inode/size/mtime), so an
                                       unchanged input is not hashed again
    ROOT/tmp/                          downloads in progress (renamed into place when verified)

A fetch writes to a temporary folder and renames it into place only after the sha256 computed
during the download matched, so concurrent fetches of one artifact (merge-low and merge-high
both want the LoRA) cannot see a half-written file. Nothing is evicted automatically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

from moe.atomic import write_json_atomic
from tasks.artifacts.refs import ArtifactRef
from tasks.artifacts.store import StoreError, store_for_uri


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
        """The cached file or folder with this sha256, if any."""
        entry = self._entry(sha256)
        children = list(entry.iterdir()) if entry.is_dir() else []
        return children[0] if children else None

    def fetch(self, ref: ArtifactRef) -> Path:
        """The local path of `ref`'s bytes, downloaded and verified unless already cached."""
        hit = self.cached(ref.sha256)
        if hit is not None:
            return hit
        path, sha256, _ = self._download(ref.uri, ref.name, ref.layout)
        if sha256 != ref.sha256:
            shutil.rmtree(path.parent, ignore_errors=True)
            raise StoreError(
                f"{ref.uri} does not match its ref: sha256 {sha256[:12]}... instead of {ref.sha256[:12]}... "
                "(the stored object changed or is damaged)"
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
        """Move a local file whose sha256 was just verified into the cache; returns its cached path."""
        if (hit := self.cached(sha256)) is not None:
            return hit
        tmp = self.root / "tmp" / uuid.uuid4().hex
        tmp.mkdir(parents=True)
        shutil.move(path, tmp / path.name)
        return self._keep(tmp / path.name, sha256)

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
        """Move a verified download into its entry (another worker thread may have won)."""
        entry = self._entry(sha256)
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(path.parent, entry)
        except OSError:  # already there
            shutil.rmtree(path.parent, ignore_errors=True)
        return self.cached(sha256)
