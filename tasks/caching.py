"""Stage caching with Prefect's own machinery: a cache key function and result storage.

The cache key of a stage is a hash of its input refs' sha256 (not their URIs: the same bytes
stored twice are the same input), its config and the package version. Prefect stores each
task's result (refs and metrics, as JSON: never pickles, which would run code when read back)
under that key in the artifact root, so a re-run with nothing changed finds every stage's
record and shows it `Cached` without running anything, and a run that failed at stage 2
finds stage 1 and the merges. `StoreResultStorage` keeps those records in the artifact store
itself (a local folder or S3 through boto3), so no prefect-aws/s3fs is needed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel

import moe
from tasks.artifacts.refs import ArtifactRef
from tasks.artifacts.s3 import S3Options

RESULTS_PREFIX = "prefect-results"
RUNTIME_PARAMETERS = frozenset({"ctx"})  # where and how a stage runs, not what it computes


def identity(value: Any) -> Any:
    """A JSON-able value that changes exactly when the computation would: refs by content."""
    if isinstance(value, ArtifactRef):
        return {"sha256": value.sha256, "layout": value.layout}
    if isinstance(value, BaseModel):
        return {name: identity(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, dict):
        return {str(k): identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def stage_key(stage: str, parameters: dict[str, Any]) -> str:
    payload = {
        "stage": stage,
        "version": moe.__version__,
        "inputs": {k: identity(v) for k, v in sorted(parameters.items()) if k not in RUNTIME_PARAMETERS},
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
    return f"{stage}-{digest[:40]}"


def stage_cache_key(context, parameters: dict[str, Any]) -> str:
    """Prefect `cache_key_fn`: the task's name plus the hash above."""
    return stage_key(context.task.name, parameters)


class StoreResultStorage(WritableFileSystem):
    """Prefect result records under `STORE/prefect-results/` of an artifact store."""

    _block_type_name = "LoRA-MoE artifact store results"

    store_uri: str
    s3: S3Options = S3Options()

    @classmethod
    def saved(cls, store_uri: str, s3: S3Options) -> StoreResultStorage:
        """The block for this store, saved to the Prefect API (task options take saved blocks
        only); one block document per store and S3 options, named after their hash."""
        block = cls(store_uri=store_uri, s3=s3)
        name = "lora-moe-results-" + hashlib.sha256(block.model_dump_json().encode()).hexdigest()[:16]
        block.save(name, overwrite=True)
        return block

    def _store(self):
        from tasks.artifacts.store import open_store

        return open_store(self.store_uri, self.s3)

    # Prefect calls these with `_sync=True` from sync code, and the `a...` forms from async code.
    def read_path(self, path: str, _sync: bool | None = None) -> bytes:
        data = self._store().read_bytes(f"{RESULTS_PREFIX}/{path}")
        if data is None:
            raise ValueError(f"no result record {path} in {self.store_uri}")
        return data

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        self._store().write_bytes(f"{RESULTS_PREFIX}/{path}", content)
        return path

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await asyncio.to_thread(self.write_path, path, content)
