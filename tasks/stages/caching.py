"""Stage caching with Prefect's own machinery: a cache key function and result storage.

The cache key of a stage is a hash of its input refs' sha256 (not their URIs: the same bytes
stored twice are the same input), its config and the package version. Prefect stores each
task's result (refs and metrics, as JSON: never pickles, which would run code when read back)
under that key in the artifact root, so a re-run with nothing changed finds every stage's
record and shows it `Cached` without running anything, and a run that failed at stage 2
finds stage 1 and the merges. `StoreResultStorage` keeps those records in the artifact store
itself (a local folder or S3 through boto3), so no prefect-aws/s3fs is needed.

A record is only as good as the objects its refs name: before Prefect takes a record as a cache
hit, every ref in it is checked against the store (`ArtifactStore.check`: the object exists, has
the ref's size and recorded sha256, and a local one re-hashes to it when that is cheap or it was
modified). A record that fails the check is a cache miss: the stage runs again and writes a new
record, instead of handing the next stage a ref that fails its download on every re-run.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel

import moe
from tasks.artifacts.refs import ArtifactRef
from tasks.artifacts.s3 import S3Options

RESULTS_PREFIX = "prefect-results"
RUNTIME_PARAMETERS = frozenset({"ctx"})  # where and how a stage runs, not what it computes
log = logging.getLogger(__name__)


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


def record_refs(content: bytes) -> list[ArtifactRef]:
    """Every ArtifactRef in a Prefect result record (JSON: the result is a JSON string in it, with
    pydantic models as {"__class__": ..., "data": ...}), found by shape, without importing the
    result's classes."""
    try:
        record = json.loads(content)
        result = record.get("result") if isinstance(record, dict) else None
        value = json.loads(result) if isinstance(result, str) else result
    except (ValueError, TypeError):
        return []
    refs: list[ArtifactRef] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if {"uri", "sha256", "size", "kind"} <= node.keys():
                try:
                    refs.append(ArtifactRef.model_validate(node))
                    return
                except ValueError:
                    pass
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(value)
    return refs


def stale_ref(refs: list[ArtifactRef], store_uri: str, s3: S3Options) -> str | None:
    """Why the first ref a stage wrote that no longer matches its stored object fails (None: all
    match). Inputs given by URI are skipped: they are resolved (and hashed) again by every run,
    and a stage's cache key already pins their sha256."""
    from tasks.artifacts.interface import StoreError
    from tasks.artifacts.store import open_store, store_for_uri

    root = open_store(store_uri, s3)
    for ref in refs:
        if ref.producer == "input":
            continue
        try:
            store = root if ref.uri.startswith(root.root_uri.rstrip("/") + "/") else store_for_uri(ref.uri, s3)[0]
            problem = store.check(ref)
        except StoreError as e:
            if "does not exist" in str(e) or "holds no files" in str(e):
                return f"{ref.uri} is gone"
            raise
        if problem is not None:
            return problem
    return None


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
        """A result record, after checking its refs against the store. Prefect's `exists` takes
        any error here as "no record" (a cache miss, so the stage runs again)."""
        data = self._store().read_bytes(f"{RESULTS_PREFIX}/{path}")
        if data is None:
            raise ValueError(f"no result record {path} in {self.store_uri}")
        problem = stale_ref(record_refs(data), self.store_uri, self.s3)
        if problem is not None:
            _warn(f"cached result {path} is stale ({problem}): the stage runs again")
            raise ValueError(f"result record {path} is stale: {problem}")
        return data

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:
        self._store().write_bytes(f"{RESULTS_PREFIX}/{path}", content)
        return path

    async def aread_path(self, path: str) -> bytes:
        return await asyncio.to_thread(self.read_path, path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return await asyncio.to_thread(self.write_path, path, content)


def _warn(message: str) -> None:
    """To the running task's Prefect log when there is one (so the UI shows why a stage ran)."""
    try:
        from prefect import get_run_logger

        get_run_logger().warning(message)
    except Exception:
        log.warning(message)
