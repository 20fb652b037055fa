"""What kind of file is this? Classifies safetensors files (and checkpoint folders) by their
headers alone, before anything is loaded.

Kinds: a Wan DiT checkpoint (`wan-dit`), a DiT with a LoRA merged in (`merged-dit`), a vanilla
LoRA (`vanilla-lora`), a stage-2 LoRA-MoE file (`lora-moe`), or `unknown`. Every command that
takes a file checks its kind first with `require_kind`, so a file given to the wrong flag fails
at once with one line naming what it is and where it belongs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from moe.errors import MoeError
from moe.files.safetensors_file import SafetensorsHeader, read_header, resolve_files
from moe.wan.keys import detect_key_format

FileKind = Literal["wan-dit", "merged-dit", "vanilla-lora", "lora-moe", "unknown"]

KIND_NAMES: dict[str, str] = {
    "wan-dit": "a Wan DiT checkpoint",
    "merged-dit": "a Wan DiT checkpoint with a LoRA merged in",
    "vanilla-lora": "a vanilla LoRA",
    "lora-moe": "a LoRA-MoE (stage 2) file",
    "unknown": "not a file this tool knows",
}
RIGHT_USE: dict[str, str] = {
    "wan-dit": "pass a DiT as --dit / --dit_high_noise",
    "merged-dit": "pass a merged DiT as --dit / --dit_high_noise (lora-moe stage2, lora-moe generate)",
    "vanilla-lora": "pass a vanilla LoRA as --lora_weight (lora-moe merge, lora-moe generate)",
    "lora-moe": (
        "pass a LoRA-MoE file as --lora_moe_weights (lora-moe generate), or turn one expert into a vanilla LoRA with lora-moe export-expert"
    ),
    "unknown": "check the path",
}
MERGED_FROM_KEY = "lora_moe.merged_from"
_LORA_KEY = re.compile(r".*\.(lora_down|lora_up|lora_A|lora_B)(\.default)?\.weight")


class FileInfo(BaseModel):
    path: Path
    kind: FileKind
    headers: list[SafetensorsHeader]

    @property
    def metadata(self) -> dict[str, str]:
        return self.headers[0].metadata if self.headers else {}

    def merged_from(self) -> list[dict]:
        text = self.metadata.get(MERGED_FROM_KEY)
        return json.loads(text) if text else []


def _kind_of(headers: list[SafetensorsHeader]) -> FileKind:
    meta = headers[0].metadata
    keys = [k for h in headers for k in h.tensors]
    if meta.get("lora_moe.format", "").startswith("lora-moe/") or any(k.startswith(("lora_moe.", "router.")) for k in keys):
        return "lora-moe"
    if any(_LORA_KEY.fullmatch(k) for k in keys):
        return "vanilla-lora"
    if detect_key_format(keys) is not None:
        return "merged-dit" if MERGED_FROM_KEY in meta else "wan-dit"
    return "unknown"


def classify(path: str | Path) -> FileInfo:
    path = Path(path)
    files, _ = resolve_files(path)
    headers = [read_header(f) for f in files]
    return FileInfo(path=path, kind=_kind_of(headers), headers=headers)


def describe_kind(path: str | Path) -> str:
    return KIND_NAMES[classify(path).kind]


def require_kind(path: str | Path, expected: str | tuple[str, ...], flag: str) -> SafetensorsHeader:
    """Check a file's kind before using it; the error names what it is and where it belongs."""
    expected = (expected,) if isinstance(expected, str) else expected
    info = classify(path)
    if info.kind not in expected:
        wanted = " or ".join(KIND_NAMES[e] for e in expected)
        raise MoeError(f"{path} is {KIND_NAMES[info.kind]}, but {flag} expects {wanted}; {RIGHT_USE[info.kind]}")
    return info.headers[0]


def written_as(path: str | Path, kind: FileKind) -> bool:
    """Whether `path` is a file (or sharded checkpoint) of `kind` that lora-moe wrote: its header
    carries our `lora_moe.*` markers. A damaged or foreign file is not, so `--overwrite` never
    replaces it."""
    try:
        info = classify(path)
    except MoeError:
        return False
    return info.kind == kind and any(k.startswith("lora_moe.") for k in info.metadata)
