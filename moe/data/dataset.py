"""The training side of the latent cache: read a clip file (checked against the index), the
per-split dataset, and batching of clips that share a latent shape."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from safetensors import SafetensorError, safe_open
from torch.utils.data import Dataset

from moe.data.cache_index import INDEX_FILE, CacheEntry, CacheIndex
from moe.errors import MoeError
from moe.files.safetensors_file import read_header


def load_clip(index: CacheIndex, clip: str | CacheEntry) -> dict[str, torch.Tensor]:
    """The tensors of one cached clip, after checking that the file belongs to this cache
    (same task, same fingerprint as the index says)."""
    entry = index.entry(clip) if isinstance(clip, str) else clip
    path = index.root / entry.file
    try:
        read_header(path)  # a truncated clip is named with its sizes, not by a SafetensorError
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError, MoeError) as e:
        raise MoeError(f"clip {entry.id!r}: cannot read {path} ({e}); rebuild the cache with `lora-moe cache`") from None
    built_for = metadata.get("lora_moe.task")
    if built_for != index.task:
        raise MoeError(
            f"clip {entry.id!r}: {path} was built for task {built_for!r}, but cache {index.root} is for "
            f"{index.task!r}; rebuild the cache with `lora-moe cache --task {index.task}`"
        )
    if metadata.get("lora_moe.fingerprint") != entry.fingerprint:
        raise MoeError(
            f"clip {entry.id!r}: {path} does not match {index.root / INDEX_FILE} (a file from another build); rebuild the cache with `lora-moe cache`"
        )
    return tensors


class CachedClipDataset(Dataset):
    """The cached clips of one split (None: all), as dicts of tensors plus "id"."""

    def __init__(self, index: CacheIndex, split: Literal["train", "val"] | None = "train"):
        if split not in ("train", "val", None):
            raise MoeError(f"split must be 'train', 'val' or None, got {split!r}")
        self.index = index
        self.entries = [entry for entry in index.clips if split is None or entry.split == split]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        return {**load_clip(self.index, entry), "id": entry.id}


def collate_clips(items: Sequence[dict]) -> dict:
    """Stack clip dicts into a batch ("id" becomes a list). Clips in one batch must have equal
    shapes: one bucket size and frame count."""
    if not items:
        raise MoeError("cannot collate an empty batch of clips")
    first = items[0]
    names = [name for name in first if name != "id"]
    for item in items[1:]:
        if set(item) != set(first):
            raise MoeError(
                f"clips {first['id']!r} and {item['id']!r} cannot share a batch: they hold different tensors ({sorted(first)} vs {sorted(item)})"
            )
        for name in names:
            if item[name].shape != first[name].shape:
                raise MoeError(
                    f"clips {first['id']!r} and {item['id']!r} cannot share a batch: {name} shapes "
                    f"{list(first[name].shape)} and {list(item[name].shape)} differ; cache them at one "
                    f"--size and --frames or use batch size 1"
                )
    batch = {name: torch.stack([item[name] for item in items]) for name in names}
    batch["id"] = [item["id"] for item in items]
    return batch
