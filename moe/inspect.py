"""`lora-moe inspect`: a few lines saying what a file or checkpoint folder is and holds.

The kind comes from `moe.wan.file_kind` (headers only); the details from the readers of each format.
"""

from __future__ import annotations

import math
from pathlib import Path

from moe.config.targets import describe_modules
from moe.errors import MoeError
from moe.files.atomic import temporary_target
from moe.files.output_paths import leftovers_report
from moe.lora.convert import describe_support
from moe.lora.file import read_lora_file
from moe.lora.peft_header import HEADER_KEY
from moe.lora_moe.file import read_lora_moe_file
from moe.wan.checkpoint import guess_dit_config, resolve_checkpoint
from moe.wan.file_kind import KIND_NAMES, classify


def inspect_report(path: str | Path) -> str:
    """A few lines describing a file or checkpoint folder, for `lora-moe inspect`, with the
    unfinished temporaries and locks that interrupted runs left for it. A truncated or damaged
    file is an error, never reported as valid."""
    path = Path(path)
    target = temporary_target(path)
    if target is not None and path.exists():
        return (
            f"{path}: an unfinished temporary of {target.name}, left by an interrupted write; the next "
            f"run of the command that writes {target.name} removes it"
        )
    leftovers = leftovers_report(path)
    try:
        info = classify(path)
    except MoeError as e:
        if not leftovers:
            raise
        raise MoeError(f"{e}; " + "; ".join(line.strip() for line in leftovers)) from None
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
    return "\n".join(lines + leftovers)


def _describe_dit(path) -> list[str]:
    layout = resolve_checkpoint(path)
    shapes = layout.original_shapes()
    params = sum(math.prod(s) for s in shapes.values())
    return [
        f"  format: {layout.describe()}",
        f"  architecture: {guess_dit_config(shapes)}",
        f"  dtype: {', '.join(sorted(layout.dtypes()))}; {params / 1e6:.2f}M parameters",
    ]


def _describe_lora_moe(path) -> list[str]:
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
    lora = read_lora_file(path)
    alphas = sorted({w.alpha for w in lora.modules.values()})
    lines = [
        f"  {len(lora.modules)} modules: {describe_modules(lora.ranks())}",
        f"  alpha {', '.join(f'{a:g}' for a in alphas)}; task {lora.metadata.get('lora_moe.task', 'unknown')}",
        f"  form: {lora.form}"
        + (f" (scales from its {HEADER_KEY} header)" if HEADER_KEY in lora.metadata else "")
        + f"; {describe_support(lora.form, lora.modules)}",
    ]
    return lines
