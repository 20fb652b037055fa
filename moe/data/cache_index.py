"""The latent cache's index (`index.json`) and its entries: the on-disk format that the cache
builder (`moe.data.cache`) writes and the training dataset (`moe.data.dataset`) reads.

    OUT/index.json                 {"format": "lora-moe-cache/1", "task", "settings", "clips": [...]}
    OUT/clips/{clip_id}.safetensors  one file per clip (see `moe.data.cache`)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from moe.config.instruments import INSTRUMENT_CLASSES
from moe.errors import MoeError
from moe.files.atomic import write_json_atomic
from moe.files.safetensors_file import read_header

CACHE_FORMAT = "lora-moe-cache/1"
INDEX_FILE = "index.json"
CLIPS_DIR = "clips"


class CacheSettings(BaseModel):
    """Everything besides the clip itself that changes the cached tensors."""

    size: tuple[int, int]  # (width, height) of the bucket
    frames: int
    dtype: str  # compute dtype of the VAE and text encoder
    embed_dtype: str  # stored dtype of text_embeds
    max_length: int  # text tokens
    components: dict[str, str]  # vae / text_encoder / tokenizer -> sha256 of their files


class CacheEntry(BaseModel):
    id: str
    file: str  # relative to the cache folder
    split: Literal["train", "val"]
    source: str
    instruments: list[str]
    caption: str
    has_roi: bool
    fingerprint: str
    latent_shape: list[int]


class BuildReport(BaseModel):
    """What one `build_cache` call did, by clip id."""

    encoded: list[str] = []
    skipped: list[str] = []
    dropped: list[str] = []

    def summary(self) -> str:
        return f"{len(self.encoded)} encoded, {len(self.skipped)} skipped, {len(self.dropped)} dropped"


class CacheIndex(BaseModel):
    """`index.json` of a cache folder. `root` (the folder) and `report` (set by `build_cache`)
    are not written to the file."""

    format: str = CACHE_FORMAT
    task: str
    settings: CacheSettings
    clips: list[CacheEntry]
    # The classes the clips' `labels` vectors are multi-hot over, in their column order (indexes
    # written before this field existed used the canonical expert classes).
    label_classes: tuple[str, ...] = INSTRUMENT_CLASSES
    root: Path = Field(exclude=True)
    report: BuildReport | None = Field(default=None, exclude=True)

    @classmethod
    def load(cls, folder: str | Path, task: str | None = None) -> CacheIndex:
        """Read a cache's index; with `task`, refuse a cache built for another task."""
        folder = Path(folder)
        if folder.is_file():
            raise MoeError(f"{folder} is a file; a latent cache is a folder made by `lora-moe cache`")
        index = cls._read(folder)
        if index is None:
            raise MoeError(f"{folder} is not a latent cache (no {INDEX_FILE}); build one with `lora-moe cache`")
        if task is not None and index.task != task:
            first = index.clips[0].id if index.clips else "none"
            raise MoeError(
                f"cache {folder} was built for task {index.task!r} (first clip {first!r}), not "
                f"{task!r}; rebuild it with `lora-moe cache --task {task}`"
            )
        return index

    @classmethod
    def _read(cls, folder: Path) -> CacheIndex | None:
        """The index in `folder`, None when there is none, a MoeError when it is not ours."""
        path = folder / INDEX_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MoeError(f"cannot read {path} as a cache index: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise MoeError(
                f"{path} is not a {CACHE_FORMAT} cache index (format {found!r}); build the cache into another folder with `lora-moe cache`"
            )
        try:
            return cls.model_validate({**raw, "root": folder})
        except ValidationError as e:
            first = e.errors()[0]
            raise MoeError(
                f"{path} is a damaged cache index (field '{'.'.join(map(str, first['loc']))}': {first['msg']}); rebuild it with `lora-moe cache`"
            ) from None

    @classmethod
    def holds_cache(cls, folder: Path) -> bool:
        """Whether `folder` is a cache lora-moe wrote: an index of ours, or (an interrupted first
        build) nothing but a `clips/` folder whose first file is one of our clip files."""
        folder = Path(folder)
        try:
            if cls._read(folder) is not None:
                return True
        except MoeError:
            return False
        visible = [p for p in folder.iterdir() if not p.name.startswith(".")]
        clips = sorted((folder / CLIPS_DIR).glob("*.safetensors")) if visible == [folder / CLIPS_DIR] else []
        try:
            return bool(clips) and read_header(clips[0]).metadata.get("lora_moe.format") == CACHE_FORMAT
        except MoeError:
            return False

    def entry(self, clip_id: str) -> CacheEntry:
        for entry in self.clips:
            if entry.id == clip_id:
                return entry
        raise MoeError(f"clip {clip_id!r} is not in cache {self.root}")

    def save(self) -> None:
        write_json_atomic(self.root / INDEX_FILE, self.model_dump(mode="json"))
