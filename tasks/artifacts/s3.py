"""S3 (AWS, MinIO, moto, any S3-compatible endpoint) as an artifact store, through boto3.

- Managed transfers (`TransferConfig`): multipart with large parts (64 MiB by default) and
  several parts in flight; many files of a folder share one transfer manager.
- The sha256 is computed in the same pass as the upload (the source is read once, in order,
  through a non-seekable reader) and follows the download as its parts land (`_HashingWriter`).
  S3 user metadata is fixed when an upload starts, before the hash exists, and changing it
  later means copying the object (a full server-side rewrite of a 28 GB file), so the hash is
  recorded as the object tag `sha256` right after the upload; the refs (and a folder's
  manifest) carry it too, and every download is checked against the ref.
- Bounded retries (botocore's `standard` mode), then one `StoreError` naming the endpoint and
  bucket. `request_checksum_calculation="when_required"` for stores that reject the checksums
  recent botocore sends by default.
- Credentials come only from the standard AWS chain (environment, profile, instance role); they
  are never passed, logged or recorded here.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moe.files.hashing import sha256_file
from tasks.artifacts.interface import ArtifactStore, ObjectInfo, StoreError, Transferred

MIB = 1 << 20


class S3Options(BaseModel):
    """How to reach S3. Credentials are not options: they come from the standard AWS chain."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, moto ...); default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS."
    )
    region: str | None = Field(None, description="Region; default: the AWS configuration's (us-east-1 if none).")
    profile: str | None = Field(None, description="Profile of the shared AWS config/credentials files (default: AWS_PROFILE).")
    addressing_style: Literal["auto", "path", "virtual"] = Field("auto", description="Bucket addressing; 'path' for most MinIO setups.")
    request_checksum_calculation: Literal["when_supported", "when_required"] = Field(
        "when_supported", description="'when_required' for S3-compatible stores that reject botocore's default checksums."
    )
    max_attempts: int = Field(5, ge=1, le=20, description="Attempts per request (botocore 'standard' retry mode).")
    multipart_chunk_mib: int = Field(64, ge=5, le=5120, description="Multipart part size in MiB (and the multipart threshold).")
    max_concurrency: int = Field(8, ge=1, le=64, description="Parts (or files) in flight at once.")
    connect_timeout_s: float = Field(10.0, gt=0, le=600, description="Seconds to wait for a connection.")
    read_timeout_s: float = Field(120.0, gt=0, le=3600, description="Seconds to wait for a response.")


_clients: dict[str, object] = {}
_clients_lock = threading.Lock()  # boto3 sessions are not thread-safe while creating clients


def endpoint_url(options: S3Options) -> str | None:
    """The endpoint in use: the option, else boto3's environment variables, else AWS."""
    return options.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_client(options: S3Options):
    """One boto3 client per set of options and endpoint (clients are thread-safe once made)."""
    key = options.model_dump_json() + (endpoint_url(options) or "")
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            session = boto3.session.Session(profile_name=options.profile, region_name=options.region)
            config = Config(
                retries={"mode": "standard", "max_attempts": options.max_attempts},
                request_checksum_calculation=options.request_checksum_calculation,
                response_checksum_validation="when_required",
                connect_timeout=options.connect_timeout_s,
                read_timeout=options.read_timeout_s,
                max_pool_connections=max(10, options.max_concurrency + 2),
                s3={"addressing_style": options.addressing_style},
            )
            _clients[key] = session.client("s3", endpoint_url=endpoint_url(options), config=config)
        return _clients[key]


def transfer_config(options: S3Options):
    from boto3.s3.transfer import TransferConfig

    chunk = options.multipart_chunk_mib * MIB
    config = TransferConfig(
        multipart_threshold=chunk,
        multipart_chunksize=chunk,
        max_concurrency=options.max_concurrency,
        use_threads=True,
        preferred_transfer_client="classic",
    )
    # Non-seekable uploads hold their parts in memory: bound it to what is in flight.
    config.max_in_memory_upload_chunks = options.max_concurrency + 2
    return config


class _HashingReader:
    """A file read once, in order, hashed as s3transfer reads it. Non-seekable on purpose: a
    seekable source would be read out of order (and twice by checksum code). Opened lazily so a
    folder of thousands of files does not hold thousands of descriptors."""

    def __init__(self, path: Path):
        self.path, self.file, self.done = path, None, False
        self.digest, self.size = hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, amount: int = -1) -> bytes:
        if self.done:
            return b""
        if self.file is None:
            self.file = open(self.path, "rb")
        data = self.file.read(amount)
        if not data:
            self.file.close()
            self.done = True
        self.digest.update(data)
        self.size += len(data)
        return data

    def result(self) -> Transferred:
        if self.file is not None:
            self.file.close()
        return Transferred(self.digest.hexdigest(), self.size)


class _HashingWriter:
    """A download target whose sha256 follows the download. s3transfer fetches parts
    concurrently and writes each at its offset (from one IO thread); bytes that continue the
    hashed prefix are hashed as they arrive, bytes written ahead of it are read back (from the
    page cache, just written) once the gap before them is filled. Its in-order streaming mode
    would avoid the read-back but stalls on objects of more than ten parts (s3transfer 0.19)."""

    def __init__(self, path: Path):
        self.path, self.fd, self.position = path, None, 0
        self.digest, self.hashed, self.ahead = hashlib.sha256(), 0, []

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        assert whence == 0, "s3transfer seeks to absolute offsets"
        self.position = offset
        return offset

    def tell(self) -> int:
        return self.position

    def write(self, data: bytes) -> int:
        if self.fd is None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        start, end = self.position, self.position + len(data)
        os.pwrite(self.fd, data, start)
        self.position = end
        if start <= self.hashed < end:  # continues the prefix (a retried part may overlap it)
            self.digest.update(memoryview(data)[self.hashed - start :])
            self.hashed = end
            self._catch_up()
        elif start > self.hashed:
            self.ahead.append((start, end))
        return len(data)

    def _catch_up(self) -> None:
        self.ahead.sort()
        while self.ahead and self.ahead[0][0] <= self.hashed:
            _, end = self.ahead.pop(0)
            while self.hashed < end:
                chunk = os.pread(self.fd, min(end - self.hashed, 8 << 20), self.hashed)
                self.digest.update(chunk)
                self.hashed += len(chunk)

    def result(self) -> Transferred:
        if self.fd is None:  # an empty object: nothing was written
            self.path.write_bytes(b"")
            return Transferred(self.digest.hexdigest(), 0)
        size = os.fstat(self.fd).st_size
        self.close()
        if self.ahead or self.hashed != size:
            raise StoreError(f"download of {self.path.name} left a gap at byte {self.hashed} of {size}")
        return Transferred(self.digest.hexdigest(), size)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class S3Store(ArtifactStore):
    records_hashes = True  # the `sha256` tag; an object written again without it loses it

    def __init__(self, uri: str, options: S3Options):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise StoreError(f"{uri!r} names no bucket: use s3://bucket/prefix")
        self.bucket, self.prefix, self.options = bucket, prefix.strip("/"), options
        self.root_uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self.client = s3_client(options)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @contextlib.contextmanager
    def _errors(self, action: str, key: str = ""):
        """botocore/s3transfer exceptions -> one StoreError sentence naming endpoint and bucket."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError
        from s3transfer.exceptions import RetriesExceededError

        where = f"{self.client.meta.endpoint_url} (bucket {self.bucket!r}{f', key {self._key(key)!r}' if key else ''})"
        try:
            yield
        except (NoCredentialsError, PartialCredentialsError):
            raise StoreError(
                f"no AWS credentials for {where}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE (the standard AWS credential chain)"
            ) from None
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            hint = {
                "NoSuchBucket": "the bucket does not exist; create it first",
                "AccessDenied": "access denied; check the credentials' permissions",
                "InvalidAccessKeyId": "the access key is not known to this endpoint",
                "SignatureDoesNotMatch": "the secret key does not match the access key",
            }.get(code, e.response.get("Error", {}).get("Message", str(e)))
            raise StoreError(f"S3 {action} failed at {where}: {code}: {hint}") from None
        except (BotoCoreError, RetriesExceededError) as e:
            raise StoreError(f"S3 {action} failed at {where} after {self.options.max_attempts} attempts: {e}") from None

    # -- primitives ----------------------------------------------------------------------------

    def upload_files(self, items: list[tuple[Path, str]]) -> list[Transferred]:
        from boto3.s3.transfer import create_transfer_manager

        results: list[Transferred | None] = [None] * len(items)
        existing = self._existing([key for _, key in items])
        pending = []
        with self._errors("upload", items[0][1] if len(items) == 1 else ""):
            with create_transfer_manager(self.client, transfer_config(self.options)) as manager:
                for i, (src, key) in enumerate(items):
                    if key in existing:
                        results[i] = self._same_or_refuse(src, key)
                        continue
                    reader = _HashingReader(Path(src))
                    pending.append((i, key, reader, manager.upload(reader, self.bucket, self._key(key))))
                for i, _, reader, future in pending:
                    future.result()
                    results[i] = reader.result()
            self._tag_all([(key, results[i].sha256) for i, key, _, _ in pending])
        return results

    def _tag_all(self, tags: list[tuple[str, str]]) -> None:
        def tag(item):
            key, sha = item
            self.client.put_object_tagging(Bucket=self.bucket, Key=self._key(key), Tagging={"TagSet": [{"Key": "sha256", "Value": sha}]})

        with ThreadPoolExecutor(max_workers=min(self.options.max_concurrency, max(len(tags), 1))) as pool:
            list(pool.map(tag, tags))

    def _existing(self, keys: list[str]) -> set[str]:
        """Which keys already exist: one HEAD for a single file, one listing for a folder."""
        if len(keys) == 1:
            return set(keys) if self.stat(keys[0]) is not None else set()
        common = _common_folder(keys)
        return {f"{common}/{rel}" if common else rel for rel in self.list_files(common)} & set(keys)

    def _same_or_refuse(self, src: Path, key: str) -> Transferred:
        info = self.stat(key)
        ours = sha256_file(src)
        if info is None or info.sha256 != ours:
            raise StoreError(f"refusing to overwrite {self.uri(key)}: it already holds other bytes (artifacts are write-once)")
        return Transferred(ours, info.size)

    def download_files(self, items: list[tuple[str, Path]]) -> list[Transferred]:
        from boto3.s3.transfer import create_transfer_manager

        writers = [_HashingWriter(Path(dest)) for _, dest in items]
        try:
            with self._errors("download", items[0][0] if len(items) == 1 else ""):
                with create_transfer_manager(self.client, transfer_config(self.options)) as manager:
                    futures = [manager.download(self.bucket, self._key(key), w) for (key, _), w in zip(items, writers)]
                    for future in futures:
                        future.result()
            return [w.result() for w in writers]
        finally:
            for w in writers:
                w.close()

    def stat(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        with self._errors("head", key):
            try:
                head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return None
                raise
            tags = self.client.get_object_tagging(Bucket=self.bucket, Key=self._key(key)).get("TagSet", [])
        sha = next((t["Value"] for t in tags if t["Key"] == "sha256"), None)
        return ObjectInfo(size=head["ContentLength"], sha256=sha, version=head["ETag"].strip('"'))

    def list_files(self, prefix: str) -> dict[str, ObjectInfo]:
        base = self._key(prefix).rstrip("/") + "/" if self._key(prefix) else ""
        files = {}
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for obj in page.get("Contents", []):
                    files[obj["Key"][len(base) :]] = ObjectInfo(size=obj["Size"], sha256=None, version=obj["ETag"].strip('"'))
        return files

    def read_bytes(self, key: str) -> bytes | None:
        with self._errors("read", key):
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
            except self.client.exceptions.NoSuchKey:
                return None

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("write", key):
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)


def _common_folder(keys: list[str]) -> str:
    parts = [k.split("/")[:-1] for k in keys]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return "/".join(common)
