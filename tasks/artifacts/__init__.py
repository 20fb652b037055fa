"""Artifact handoff: refs (URI + sha256), the stores (a local folder, S3) and the worker-side
download cache. Every stage returns refs; the next fetches and verifies them."""

from tasks.artifacts.download_cache import DownloadCache
from tasks.artifacts.interface import ArtifactStore, StoreError
from tasks.artifacts.refs import ArtifactRef, DatasetRef
from tasks.artifacts.store import open_store

__all__ = ["ArtifactRef", "ArtifactStore", "DatasetRef", "DownloadCache", "StoreError", "open_store"]
