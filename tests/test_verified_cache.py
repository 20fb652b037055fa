"""What a cache hands out is verified (issue 22, item 3): the download cache shares no inode
with a local store and re-checks every hit; a Prefect cache record whose refs no longer match
the store is a cache miss, not a failure that repeats on every re-run."""

from __future__ import annotations

import os
import stat
import uuid

import boto3
from prefect.results import ResultStore
from prefect.serializers import JSONSerializer

from tasks.artifacts.download_cache import DownloadCache
from tasks.artifacts.s3 import S3Options
from tasks.artifacts.store import open_store
from tasks.stages.caching import StoreResultStorage


def _rewrite_in_place(path, data: bytes, keep_mtime: bool = True) -> None:
    """Change a file's bytes without changing its inode, size or (optionally) modification time."""
    before = path.stat()
    path.chmod(0o644)
    with open(path, "r+b") as f:
        f.write(data)
    if keep_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def _stored(tmp_path):
    store = open_store(str(tmp_path / "store"))
    src = tmp_path / "w.safetensors"
    src.write_bytes(b"original weights")
    folder = tmp_path / "f"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.bin").write_bytes(b"folder bytes")
    return store, store.put(src, "run/s/w.safetensors", "weights", "s@1"), store.put(folder, "run/s/f", "folder", "s@1")


def test_the_local_store_and_the_cache_share_no_inode(tmp_path):
    store, ref, folder = _stored(tmp_path)
    stored = tmp_path / "store" / "run/s/w.safetensors"
    assert not stored.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)  # stored read-only
    cache = DownloadCache(tmp_path / "cache")
    got, got_folder = cache.fetch(ref), cache.fetch(folder)
    assert got.stat().st_ino != stored.stat().st_ino and stored.stat().st_nlink == 1
    assert (got_folder / "sub" / "a.bin").stat().st_nlink == 1
    assert not got.stat().st_mode & stat.S_IWUSR  # cached read-only
    _rewrite_in_place(stored, b"changed weights!")  # same size, same mtime
    assert cache.fetch(ref).read_bytes() == b"original weights"  # the cache keeps what it verified


def test_a_changed_cache_entry_is_not_handed_out(tmp_path, monkeypatch):
    store, ref, folder = _stored(tmp_path)
    cache = DownloadCache(tmp_path / "cache")
    for limit in ("64", "0"):  # re-hashed on every hit (small), or on its stamps only (large)
        monkeypatch.setenv("LORA_MOE_REHASH_LIMIT_MIB", limit)
        got, got_folder = cache.fetch(ref), cache.fetch(folder)
        _rewrite_in_place(got, b"tampered weight!")  # same size and mtime: only its ctime moves
        _rewrite_in_place(got_folder / "sub" / "a.bin", b"tampered!!!!")
        assert cache.fetch(ref).read_bytes() == b"original weights"  # removed and fetched again
        assert (cache.fetch(folder) / "sub" / "a.bin").read_bytes() == b"folder bytes"


def test_an_unchanged_large_hit_is_not_hashed_again(tmp_path, monkeypatch):
    import tasks.artifacts.download_cache as dc

    store, ref, _ = _stored(tmp_path)
    cache = DownloadCache(tmp_path / "cache")
    path = cache.fetch(ref)
    monkeypatch.setenv("LORA_MOE_REHASH_LIMIT_MIB", "0")
    calls = []
    monkeypatch.setattr(dc, "sha256_tree", lambda p: calls.append(p) or "x")
    assert cache.fetch(ref) == path and calls == []


def test_an_entry_hard_linked_by_an_older_version_gets_its_own_inode(tmp_path):
    store, ref, _ = _stored(tmp_path)
    stored = tmp_path / "store" / "run/s/w.safetensors"
    entry = tmp_path / "cache" / "sha256" / ref.sha256[:2] / ref.sha256
    entry.mkdir(parents=True)
    os.link(stored, entry / ref.name)  # what the cache used to make from a local store
    got = DownloadCache(tmp_path / "cache").fetch(ref)
    assert got == entry / ref.name and got.read_bytes() == b"original weights"
    assert got.stat().st_ino != stored.stat().st_ino and stored.stat().st_nlink == 1


def _record_exists(storage, key, value) -> ResultStore:
    storage._block_document_id = uuid.uuid4()  # as the flow has it, a saved block (nothing asks the API for it)
    results = ResultStore(result_storage=storage, serializer=JSONSerializer())
    results.write(value, key=key)
    return results


def test_a_prefect_record_whose_local_refs_changed_is_a_cache_miss(tmp_path):
    store, ref, folder = _stored(tmp_path)
    storage = StoreResultStorage(store_uri=str(tmp_path / "store"))
    results = _record_exists(storage, "stage-a", {"weights": ref, "more": [folder]})
    _record_exists(storage, "stage-b", {"folder": folder})
    assert results.exists("stage-a") and results.exists("stage-b")
    _rewrite_in_place(tmp_path / "store" / "run/s/w.safetensors", b"changed weights!")  # same size and mtime
    (tmp_path / "store" / "run/s/f/sub/a.bin").unlink()
    assert not results.exists("stage-a") and not results.exists("stage-b")  # recomputed, not a failure


def test_a_prefect_record_whose_s3_objects_changed_is_a_cache_miss(bucket, moto_server, tmp_path):
    store = open_store(f"s3://{bucket}/root", S3Options())
    src = tmp_path / "w.bin"
    src.write_bytes(b"original weights")
    ref = store.put(src, "run/s/w.bin", "weights", "s@1")
    storage = StoreResultStorage(store_uri=f"s3://{bucket}/root")
    results = _record_exists(storage, "stage-a", {"weights": ref})
    assert results.exists("stage-a")
    boto3.client("s3", endpoint_url=moto_server).put_object(Bucket=bucket, Key="root/run/s/w.bin", Body=b"changed weights!")
    assert not results.exists("stage-a")
