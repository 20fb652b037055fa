"""What is this file? Classifies safetensors files by their header alone.

Kinds: a Wan DiT checkpoint (`wan-dit`), a DiT with a LoRA merged in (`merged-dit`), a vanilla
LoRA (`vanilla-lora`), a stage-2 LoRA-MoE file (`lora-moe`), or `unknown`. Every command that
takes a file checks its kind first with `require_kind`, so a file given to the wrong flag fails
at once with one line naming what it is and where it belongs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from moe.errors import MoeError
from moe.safetensors_file import SafetensorsHeader, read_header

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
        "pass a LoRA-MoE file as --lora_moe_weights (lora-moe generate), or turn one expert into a "
        "vanilla LoRA with lora-moe export-expert"
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
    from moe.wan.keys import detect_key_format

    meta = headers[0].metadata
    keys = [k for h in headers for k in h.tensors]
    if meta.get("lora_moe.format", "").startswith("lora-moe/") or any(
        k.startswith(("lora_moe.", "router.")) for k in keys
    ):
        return "lora-moe"
    if any(_LORA_KEY.fullmatch(k) for k in keys):
        return "vanilla-lora"
    if detect_key_format(keys) is not None:
        return "merged-dit" if MERGED_FROM_KEY in meta else "wan-dit"
    return "unknown"


def classify(path: str | Path) -> FileInfo:
    from moe.wan.checkpoint import resolve_files

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


def inspect_report(path: str | Path) -> str:
    """A few lines describing a file or checkpoint folder, for `lora-moe inspect`."""
    info = classify(path)
    lines = [f"{path}: {KIND_NAMES[info.kind]}"]
    if info.kind in ("wan-dit", "merged-dit"):
        lines += _describe_dit(path)
        for rec in info.merged_from():
            lines.append(
                f"  merged: LoRA sha256 {rec.get('lora_sha256', '?')[:12]} x{rec.get('multiplier')} "
                f"into {rec.get('base')} (sha256 {str(rec.get('base_sha256', '?'))[:12]})"
            )
    elif info.kind == "vanilla-lora":
        lines += _describe_lora(path)
    elif info.kind == "lora-moe":
        lines += _describe_lora_moe(path)
    else:
        keys = list(info.headers[0].tensors)[:5]
        lines.append(f"  first keys: {', '.join(keys)}")
    return "\n".join(lines)


def _describe_dit(path) -> list[str]:
    from moe.wan.checkpoint import guess_dit_config, resolve_checkpoint

    layout = resolve_checkpoint(path)
    shapes = layout.original_shapes()
    params = sum(math.prod(s) for s in shapes.values())
    return [
        f"  format: {layout.describe()}",
        f"  architecture: {guess_dit_config(shapes)}",
        f"  dtype: {', '.join(sorted(layout.dtypes()))}; {params / 1e6:.2f}M parameters",
    ]


def _describe_lora_moe(path) -> list[str]:
    from moe.lora.targets import describe_modules
    from moe.lora_moe.file import read_lora_moe_file

    f = read_lora_moe_file(path)
    rc = f.router_config
    return [
        f"  experts: {', '.join(f.experts)}; top_k {rc.top_k}; use_base_lora false; task {f.task}",
        f"  {len(f.modules)} modules: {describe_modules(f.ranks())}",
        f"  router: MLP {rc.in_features} -> {rc.hidden} -> {rc.num_experts} (text {rc.text_dim}, sigma {rc.sigma_dim}, image {rc.image_channels})",
        "  timestep gate c: " + ", ".join(f"{v:.3f}" for v in f.timestep_gate_state["c"].tolist()),
        "  trained on merged DiTs: " + ", ".join(f"{k} {v[:12]}" for k, v in sorted(f.merged_dits.items())),
    ]


def _describe_lora(path) -> list[str]:
    from moe.lora.file import read_lora_file
    from moe.lora.targets import describe_modules

    lora = read_lora_file(path)
    alphas = sorted({w.alpha for w in lora.modules.values()})
    lines = [
        f"  {len(lora.modules)} modules: {describe_modules(lora.ranks())}",
        f"  alpha {', '.join(f'{a:g}' for a in alphas)}; task {lora.metadata.get('lora_moe.task', 'unknown')}",
    ]
    return lines
