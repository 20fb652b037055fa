"""The safetensors container, read at the byte level.

A safetensors file is `u64 header length | JSON header | data`. The JSON maps each tensor name to
its dtype, shape and byte range in the data section, plus an optional `__metadata__` of strings.
Reading only the header lets us classify a 28 GB checkpoint instantly and lets the merge stream
tensors without loading the model (the `safetensors` package does the regular reads and writes).
`resolve_files` finds the files behind a user's path: a single file, or the shards of a sharded
checkpoint (`*-0000i-of-0000n.safetensors` + `*.safetensors.index.json`, given as its folder, its
index or any shard).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from moe.errors import MoeError
from moe.files.input_paths import special_kind

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}

SHARD_RE = re.compile(r"(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.safetensors")

# A header larger than this is not a safetensors file (the format itself caps it at 100 MB).
_MAX_HEADER = 100_000_000


class TensorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    dtype: str
    shape: tuple[int, ...]
    data_offsets: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.data_offsets[1] - self.data_offsets[0]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class SafetensorsHeader(BaseModel):
    """A parsed header. `data_start` is the file offset of the data section."""

    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int

    @property
    def total_bytes(self) -> int:
        return max((t.data_offsets[1] for t in self.tensors.values()), default=0)


def _truncated(path: Path, expected: int, found: int) -> MoeError:
    return MoeError(
        f"{path} is truncated or corrupt: expected {expected} bytes, found {found}"
        + ("" if found < expected else " (bytes after the last tensor)")
        + "; copy or download it again"
    )


def _check_layout(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """The byte ranges must tile the data section exactly and match each tensor's dtype and
    shape, as the safetensors library requires; checked here first so that a half-copied file is
    a one-line error naming both sizes instead of a SafetensorError deep inside a load."""
    expected = data_start + max((t.data_offsets[1] for t in tensors.values()), default=0)
    if size != expected:
        raise _truncated(path, expected, size)
    position = 0
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].data_offsets):
        start, end = info.data_offsets
        itemsize = DTYPES[info.dtype].itemsize if info.dtype in DTYPES else None
        if start != position or (itemsize is not None and end - start != info.numel * itemsize):
            raise MoeError(f"{path} is corrupt: the byte range of tensor {name!r} does not fit its dtype and shape")
        position = end


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse the header of a safetensors file; a file that is not one, or is truncated, is a
    clear error."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise MoeError(f"{path} is not a safetensors file (too short: {size} bytes)")
            (n,) = struct.unpack("<Q", raw_len)
            if n == 0 or n > _MAX_HEADER:
                raise MoeError(f"{path} is not a safetensors file (bad header length {n})")
            if 8 + n > size:
                raise _truncated(path, 8 + n, size)
            raw = f.read(n)
    except FileNotFoundError:
        raise MoeError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise MoeError(f"{path} is a folder, expected a .safetensors file") from None
    except NotADirectoryError:
        raise MoeError(f"{path}: a part of this path is a file, not a folder") from None
    except PermissionError:
        raise MoeError(f"cannot read {path}: permission denied") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoeError(f"{path} is not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise MoeError(f"{path} is not a safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    try:
        tensors = {k: TensorInfo(**v) for k, v in header.items()}
    except (TypeError, ValueError):
        raise MoeError(f"{path} is not a valid safetensors file (malformed tensor entries)") from None
    _check_layout(path, tensors, 8 + n, size)
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata, data_start=8 + n)


def require_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Refuse tensors holding NaN or inf (a LoRA from a diverged run would merge into a NaN DiT)."""
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        shown = ", ".join(bad[:4]) + (f" ... ({len(bad)} in all)" if len(bad) > 4 else "")
        raise MoeError(
            f"{source} holds NaN or inf values (in {shown}); it is unusable, e.g. written by a run whose loss diverged. Use an earlier checkpoint"
        )


def encode_header(tensors: dict[str, TensorInfo], metadata: dict[str, str]) -> bytes:
    """Serialise a header (length prefix included), padded with spaces to 8-byte alignment
    as the reference implementation does. Tensor order and byte offsets are kept as given."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = metadata
    for name, info in tensors.items():
        obj[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _find_index(folder: Path) -> Path | None:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise MoeError(f"{folder} holds several index files ({', '.join(p.name for p in indexes)}); pass one of them")
    return indexes[0] if indexes else None


def _shards_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError):
        raise MoeError(f"{index} is not a valid safetensors index (expected a 'weight_map')") from None
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (index.parent / f).is_file()]
    if missing:
        raise MoeError(f"sharded checkpoint {index} is incomplete: missing {', '.join(missing)}")
    return [index.parent / f for f in files]


def resolve_files(path: str | Path) -> tuple[list[Path], Path | None]:
    """The shard files (and index) a user path refers to, without reading any tensor."""
    path = Path(path)
    if not path.exists():
        raise MoeError(f"{path} does not exist")
    if not path.is_dir() and not path.is_file():  # a named pipe would block the read forever
        raise MoeError(f"{path} is {special_kind(path.stat().st_mode) or 'not a regular file'}, not a file or folder")
    if path.is_dir():
        index = _find_index(path)
        if index:
            return _shards_from_index(index), index
        singles = sorted(path.glob("*.safetensors"))
        if len(singles) == 1:
            return singles, None
        raise MoeError(f"{path} holds {len(singles)} .safetensors files and no *.safetensors.index.json; pass the file to use or add the index")
    if path.name.endswith(".index.json"):
        return _shards_from_index(path), path
    m = SHARD_RE.fullmatch(path.name)
    if m:
        index = _find_index(path.parent)
        if index is None:
            raise MoeError(f"{path} looks like a shard but its folder has no *.safetensors.index.json")
        return _shards_from_index(index), index
    return [path], None


def readinto_exact(f, view: memoryview) -> None:
    """Fill `view` from the unbuffered file `f` (a raw read may return fewer bytes)."""
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise MoeError(f"{f.name} is truncated")
        got += n


def iter_tensors(header: SafetensorsHeader):
    """(name, tensor) for every tensor of a file, in file order, each read into its own
    memory with plain reads: no memory map, so a tensor that the caller converts and drops
    (a bf16 weight quantised to fp8 on load) never holds pages of the file in this process.
    Peak memory is what the caller keeps plus one tensor."""
    with open(header.path, "rb", buffering=0) as f:
        for name, info in sorted(header.tensors.items(), key=lambda kv: kv[1].data_offsets[0]):
            if info.dtype not in DTYPES:
                raise MoeError(f"{header.path}: tensor {name!r} has dtype {info.dtype}, which this tool cannot read")
            t = torch.empty(info.shape, dtype=DTYPES[info.dtype])
            view = memoryview(t.view(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
            f.seek(header.data_start + info.data_offsets[0])
            readinto_exact(f, view)
            yield name, t
