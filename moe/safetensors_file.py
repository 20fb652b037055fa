"""The safetensors container, read at the byte level.

A safetensors file is `u64 header length | JSON header | data`. The JSON maps each tensor name to
its dtype, shape and byte range in the data section, plus an optional `__metadata__` of strings.
Reading only the header lets us classify a 28 GB checkpoint instantly and lets the merge stream
tensors without loading the model (the `safetensors` package does the regular reads and writes).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from moe.errors import MoeError

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


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse the header of a safetensors file; a file that is not one is a clear error."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise MoeError(f"{path} is not a safetensors file (too short)")
            (n,) = struct.unpack("<Q", raw_len)
            if n == 0 or n > _MAX_HEADER:
                raise MoeError(f"{path} is not a safetensors file (bad header length {n})")
            raw = f.read(n)
    except FileNotFoundError:
        raise MoeError(f"{path} does not exist") from None
    except IsADirectoryError:
        raise MoeError(f"{path} is a folder, expected a .safetensors file") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MoeError(f"{path} is not a safetensors file (header is not JSON)") from None
    metadata = header.pop("__metadata__", None) or {}
    try:
        tensors = {k: TensorInfo(**v) for k, v in header.items()}
    except (TypeError, ValueError):
        raise MoeError(f"{path} is not a valid safetensors file (malformed tensor entries)") from None
    return SafetensorsHeader(path=path, tensors=tensors, metadata=metadata, data_start=8 + n)


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
