"""`open_store(uri)`: the store behind a URI, a local folder or S3 (the backends import only the
interface, `interface.py`, so no backend imports this module back)."""

from __future__ import annotations

from tasks.artifacts.interface import ArtifactStore, StoreError


def open_store(uri: str, s3=None) -> ArtifactStore:
    """The store rooted at `uri`: `s3://bucket[/prefix]` (options: `tasks.artifacts.s3.S3Options`)
    or a local folder (`file:///path` or a plain path)."""
    if uri.startswith("s3://"):
        from tasks.artifacts.s3 import S3Options, S3Store

        return S3Store(uri, s3 or S3Options())
    if "://" in uri and not uri.startswith("file://"):
        raise StoreError(f"unsupported artifact URI {uri!r}: use s3://bucket/prefix, file:///path or a folder path")
    from tasks.artifacts.local import LocalStore

    return LocalStore(uri)


def store_for_uri(uri: str, s3=None) -> tuple[ArtifactStore, str]:
    """(a store that can read `uri`, the key of `uri` in it): inputs may live outside the
    pipeline's artifact root (a base model in another bucket, a dataset folder on disk)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return open_store(f"s3://{bucket}", s3), key.rstrip("/")
    from tasks.artifacts.local import local_path

    path = local_path(uri)
    return open_store(str(path.parent)), path.name
