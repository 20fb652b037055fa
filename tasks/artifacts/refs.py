"""`ArtifactRef`: what one pipeline stage hands the next (SPEC section 9: handoff by reference).

A ref names stored bytes by URI and pins them by sha256; whoever fetches it verifies the hash.
A folder (a sharded checkpoint, a component folder, a latent cache) is stored as its files plus
a small manifest (`FolderManifest`); its sha256 is `moe.files.hashing.sha256_tree` of the folder, so a
ref can be checked against a local copy with the project's own hashing.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moe.files.hashing import tree_digest

SHA256_PATTERN = r"^[0-9a-f]{64}$"
FOLDER_MANIFEST = ".lora-moe-folder.json"  # hidden: sha256_tree skips it, so it never hashes itself
FOLDER_FORMAT = "lora-moe-folder/1"


class ArtifactRef(BaseModel):
    """One stored file or folder."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    uri: str = Field(description="s3://bucket/key or file:///absolute/path (a folder: its prefix, no trailing slash).")
    sha256: str = Field(pattern=SHA256_PATTERN, description="File sha256, or sha256_tree of a folder.")
    size: int = Field(ge=0, description="Bytes (a folder: all its files).")
    kind: str = Field(description="What it is: dit, vanilla_lora, merged_dit, lora_moe, latent_cache, dataset_file ...")
    layout: Literal["file", "folder"] = "file"
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    producer: str = Field("input", description="The stage (and flow run) that wrote it, or 'input'.")

    @property
    def name(self) -> str:
        """The file or folder name (the URI's last segment)."""
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def child(self, relative: str, sha256: str, size: int, kind: str) -> ArtifactRef:
        """A ref to one file inside this folder."""
        return ArtifactRef(uri=f"{self.uri}/{relative}", sha256=sha256, size=size, kind=kind, producer=self.producer)


class FolderEntry(BaseModel):
    path: str = Field(description="Relative posix path inside the folder.")
    sha256: str | None = Field(pattern=SHA256_PATTERN, description="None: a folder stored by other tools, not hashed yet.")
    size: int = Field(ge=0)


class FolderManifest(BaseModel):
    """`FOLDER/.lora-moe-folder.json`: the files of a stored folder and their hashes."""

    format: Literal["lora-moe-folder/1"] = FOLDER_FORMAT
    files: list[FolderEntry]

    @property
    def sha256(self) -> str:
        return tree_digest({f.path: f.sha256 for f in self.files})

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class DatasetRef(BaseModel):
    """A clip manifest and the files it names (videos, masks), each pinned by sha256."""

    manifest: ArtifactRef
    files: dict[str, ArtifactRef] = Field(description="Path relative to the manifest -> ref.")

    @property
    def fingerprint(self) -> str:
        """The data fingerprint: a hash of the manifest and every clip's sha256 (equal to
        `sha256_tree` of a folder holding just the manifest and its clips)."""
        return tree_digest({self.manifest.name: self.manifest.sha256} | {k: v.sha256 for k, v in self.files.items()})
