"""Artifact stores (a local folder and S3 over HTTP from moto) and the download cache: hashes
computed in the transfer pass, verified on every download, write-once keys, folders with a
manifest, one clear error when S3 is unreachable."""

import hashlib
import os
import time

import boto3
import pytest

from moe.files.hashing import sha256_tree
from tasks.artifacts.download_cache import DownloadCache
from tasks.artifacts.interface import StoreError
from tasks.artifacts.refs import FOLDER_MANIFEST
from tasks.artifacts.s3 import S3Options
from tasks.artifacts.store import open_store


def _folder(root):
    (root / "sub").mkdir(parents=True)
    (root / "a.json").write_text('{"a": 1}')
    (root / "sub" / "b.bin").write_bytes(os.urandom(3000))
    (root / "empty").write_bytes(b"")
    (root / ".hidden").write_text("not part of the artifact")  # skipped, as sha256_tree skips it
    return root


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(str(tmp_path / "store"))
    bucket = request.getfixturevalue("bucket")
    return open_store(f"s3://{bucket}/root", S3Options(multipart_chunk_mib=5))


def test_file_and_folder_roundtrip(store, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom((55 << 20) + 1))  # 12 parts of 5 MiB on S3 (s3transfer's streaming mode stalls past 10)
    ref = store.put(big, "run/stage/big.bin", "test", "pytest")
    assert ref.sha256 == hashlib.sha256(big.read_bytes()).hexdigest() and ref.size == (55 << 20) + 1
    folder = store.put(_folder(tmp_path / "f"), "run/stage/f", "folder", "pytest")
    assert folder.layout == "folder" and folder.sha256 == sha256_tree(tmp_path / "f")
    assert {e.path for e in store.folder_manifest("run/stage/f").files} == {"a.json", "sub/b.bin", "empty"}

    cache = DownloadCache(tmp_path / "cache", getattr(store, "options", None))
    got = cache.fetch(ref)
    assert got.name == "big.bin" and got.read_bytes() == big.read_bytes()
    got_folder = cache.fetch(folder)
    assert sha256_tree(got_folder) == folder.sha256 and not (got_folder / ".hidden").exists()
    assert not (got_folder / FOLDER_MANIFEST).exists()


def test_keys_are_write_once(store, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    first = store.put(a, "k/x", "test", "pytest")
    assert store.put(a, "k/x", "test", "pytest").sha256 == first.sha256  # the same bytes again: fine
    with pytest.raises(StoreError, match="refusing to overwrite .*write-once"):
        store.put(b, "k/x", "test", "pytest")


def test_s3_records_the_hash_on_the_object(bucket, moto_server, tmp_path):
    store = open_store(f"s3://{bucket}", S3Options(endpoint_url=moto_server, request_checksum_calculation="when_required"))
    path = tmp_path / "w.safetensors"
    path.write_bytes(os.urandom(1000))
    ref = store.put(path, "w.safetensors", "weights", "pytest")
    tags = boto3.client("s3", endpoint_url=moto_server).get_object_tagging(Bucket=bucket, Key="w.safetensors")["TagSet"]
    assert {"Key": "sha256", "Value": ref.sha256} in tags
    assert store.stat("w.safetensors").sha256 == ref.sha256


def test_download_is_verified_against_the_ref(bucket, moto_server, tmp_path):
    store = open_store(f"s3://{bucket}", S3Options())
    path = tmp_path / "x.bin"
    path.write_bytes(b"original bytes")
    ref = store.put(path, "x.bin", "test", "pytest")
    boto3.client("s3", endpoint_url=moto_server).put_object(Bucket=bucket, Key="x.bin", Body=b"tampered bytes")
    cache = DownloadCache(tmp_path / "cache", S3Options())
    with pytest.raises(StoreError, match=r"does not match its ref: sha256 .* instead of"):
        cache.fetch(ref)
    assert not list((tmp_path / "cache").rglob("x.bin"))  # nothing half-kept


def test_download_cache_fetches_once(bucket, moto_server, tmp_path):
    store = open_store(f"s3://{bucket}", S3Options())
    path = tmp_path / "model.safetensors"
    path.write_bytes(os.urandom(5000))
    ref = store.put(path, "m/model.safetensors", "dit", "pytest")
    cache = DownloadCache(tmp_path / "cache", S3Options())
    first = cache.fetch(ref)
    boto3.client("s3", endpoint_url=moto_server).delete_object(Bucket=bucket, Key="m/model.safetensors")
    assert cache.fetch(ref) == first  # served from the cache: the object is gone from S3


def test_inputs_by_uri_are_hashed_once(tmp_path):
    data = tmp_path / "base.safetensors"
    data.write_bytes(os.urandom(4000))
    cache = DownloadCache(tmp_path / "cache")
    ref = cache.resolve(str(data), "dit")
    assert ref.sha256 == hashlib.sha256(data.read_bytes()).hexdigest() and ref.uri == data.as_uri()
    index = next((tmp_path / "cache" / "inputs").iterdir())
    stamp = index.stat().st_mtime_ns
    time.sleep(0.01)
    assert cache.resolve(data.as_uri(), "dit").sha256 == ref.sha256
    data.write_bytes(os.urandom(4000))  # changed in place: hashed again
    assert cache.resolve(str(data), "dit").sha256 == hashlib.sha256(data.read_bytes()).hexdigest() != ref.sha256
    assert index.stat().st_mtime_ns != stamp
    with pytest.raises(StoreError, match="does not exist"):
        cache.resolve(str(tmp_path / "missing.safetensors"), "dit")


def test_unreachable_endpoint_is_one_clear_error(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = open_store("s3://some-bucket/p", S3Options(endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2))
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with pytest.raises(StoreError) as e:
        store.put(path, "f", "test", "pytest")
    message = str(e.value)
    assert f"http://127.0.0.1:{port}" in message and "'some-bucket'" in message and "after 2 attempts" in message
    assert "\n" not in message


def test_missing_bucket_and_unknown_scheme(s3_endpoint, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with pytest.raises(StoreError, match="NoSuchBucket: the bucket does not exist"):
        open_store("s3://no-such-bucket-here/p", S3Options()).put(path, "f", "test", "pytest")
    with pytest.raises(StoreError, match="unsupported artifact URI 'gs://b/p'"):
        open_store("gs://b/p")


def test_download_hash_follows_out_of_order_parts(tmp_path):
    """Parts land in any order (and a retried part may land twice); the hash is the file's."""
    from tasks.artifacts.s3 import _HashingWriter

    data = os.urandom(1000)
    writer = _HashingWriter(tmp_path / "out")
    for start, end in [(600, 1000), (200, 400), (0, 100), (100, 200), (0, 150), (400, 600), (600, 1000)]:
        writer.seek(start)
        writer.write(data[start:end])
    got = writer.result()
    assert got.sha256 == hashlib.sha256(data).hexdigest() and got.size == 1000
    assert (tmp_path / "out").read_bytes() == data
