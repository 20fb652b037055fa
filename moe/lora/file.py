"""Vanilla LoRA files (SPEC section 3): write ours, read every common Wan LoRA form.

Written form (default, loads in diffusers and ComfyUI even with partial coverage):
    diffusion_model.blocks.{i}.self_attn.q.lora_down.weight  [r, in]
    diffusion_model.blocks.{i}.self_attn.q.lora_up.weight    [out, r]
    diffusion_model.blocks.{i}.self_attn.q.alpha             scalar
`musubi` form: `lora_unet_blocks_{i}_self_attn_q.{lora_down.weight,lora_up.weight,alpha}`.

Read forms: the above with or without `model.diffusion_model.`/`diffusion_model.`, musubi
`lora_unet_`, PEFT/diffusers `transformer.blocks.N.attn1.to_q.lora_A/lora_B` (alpha optional:
without it the scale is 1, i.e. alpha = rank, as diffusers does), any subset of modules, mixed ranks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from moe.atomic import atomic_file
from moe.errors import MoeError
from moe.lora.targets import LINEAR_SUBMODULES, TargetSpec
from moe.wan.keys import module_to_original

VANILLA_FORMAT = "vanilla-lora/1"
SaveFormat = Literal["diffusers", "musubi"]

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "")
_PARTS = {
    "lora_down.weight": "down",
    "lora_up.weight": "up",
    "lora_A.weight": "down",
    "lora_B.weight": "up",
    "lora_A.default.weight": "down",
    "lora_B.default.weight": "up",
    "alpha": "alpha",
}
_KEY_RE = re.compile(r"(?P<module>.+?)\.(?P<part>" + "|".join(re.escape(p) for p in _PARTS) + r")")
_MUSUBI_RE = re.compile(r"lora_unet_blocks_(\d+)_(self_attn|cross_attn|ffn)_(q|k|v|o|0|2)")
_ORIGINAL_MODULE_RE = re.compile(r"blocks\.\d+\.(" + "|".join(re.escape(m) for m in LINEAR_SUBMODULES) + ")")


class LoRAModuleWeights(BaseModel):
    """One module's LoRA pair; `alpha / rank` is its scale."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRAFile(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    modules: dict[str, LoRAModuleWeights]  # original module name -> weights
    metadata: dict[str, str]

    def ranks(self) -> dict[str, int]:
        return {m: w.rank for m, w in self.modules.items()}

    def targets(self) -> TargetSpec | None:
        text = self.metadata.get("lora_moe.targets")
        return TargetSpec.from_json(text) if text else None


def canonical_module(module: str) -> str | None:
    """Any supported spelling of a LoRA module -> original dotted name; None if not a Wan target."""
    m = _MUSUBI_RE.fullmatch(module)
    if m:
        idx, group, proj = m.groups()
        return f"blocks.{idx}.{group}.{proj}"
    for prefix in _PREFIXES:
        if not module.startswith(prefix):
            continue
        name = module[len(prefix) :]
        if _ORIGINAL_MODULE_RE.fullmatch(name):
            return name
        try:
            original = module_to_original(name)
        except KeyError:
            continue
        if _ORIGINAL_MODULE_RE.fullmatch(original):
            return original
    return None


def parse_lora_state(state: dict[str, torch.Tensor], source: str) -> dict[str, LoRAModuleWeights]:
    """Group a LoRA state dict of any supported form by canonical module name."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        m = _KEY_RE.fullmatch(key)
        module = canonical_module(m.group("module")) if m else None
        if module is None:
            unknown.append(key)
            continue
        parts.setdefault(module, {})[_PARTS[m.group("part")]] = tensor
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 5 else "")
        raise MoeError(f"{source}: keys that are not Wan DiT LoRA weights: {shown}")
    modules = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise MoeError(f"{source}: {module} has {'no lora_up' if 'up' not in p else 'no lora_down'} weight")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise MoeError(
                f"{source}: {module} has inconsistent LoRA shapes down {tuple(down.shape)}, up {tuple(up.shape)}"
            )
        alpha = float(p["alpha"].float().item()) if "alpha" in p else float(down.shape[0])
        modules[module] = LoRAModuleWeights(down=down, up=up, alpha=alpha)
    if not modules:
        raise MoeError(f"{source} holds no LoRA weights")
    return dict(sorted(modules.items()))


def read_lora_file(path: str | Path) -> LoRAFile:
    """Read a vanilla LoRA file of any supported form; other kinds of file are a clear error."""
    from moe.inspect import require_kind

    path = Path(path)
    header = require_kind(path, "vanilla-lora", "--lora_weight")
    return LoRAFile(modules=parse_lora_state(load_file(path), str(path)), metadata=header.metadata)


def lora_metadata(
    modules: dict[str, LoRAModuleWeights], targets: TargetSpec | None, task: str | None
) -> dict[str, str]:
    ranks = sorted({w.rank for w in modules.values()})
    alphas = sorted({w.alpha for w in modules.values()})
    meta = {
        "ss_network_module": "networks.lora_wan",
        "ss_network_dim": str(max(ranks)),
        "ss_network_alpha": str(alphas[0] if len(alphas) == 1 else max(alphas)),
        "ss_base_model_version": f"wan_2.2_{task}" if task else "wan_2.2",
        "lora_moe.format": VANILLA_FORMAT,
        "lora_moe.ranks": json.dumps({m: w.rank for m, w in modules.items()}),
    }
    if targets is not None:
        meta["lora_moe.targets"] = targets.to_json()
    if task:
        meta["lora_moe.task"] = task
    return meta


def write_lora_file(
    path: str | Path,
    modules: dict[str, LoRAModuleWeights],
    targets: TargetSpec | None = None,
    task: str | None = None,
    save_format: SaveFormat = "diffusers",
    dtype: torch.dtype | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write a vanilla LoRA file (atomically). `dtype` casts down/up (alpha stays fp32)."""
    state: dict[str, torch.Tensor] = {}
    for module, w in modules.items():
        if save_format == "musubi":
            base = "lora_unet_" + module.replace(".", "_")
        elif save_format == "diffusers":
            base = "diffusion_model." + module
        else:
            raise MoeError(f"unknown --save_format {save_format!r}; choose diffusers or musubi")
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        state[f"{base}.lora_down.weight"] = cast(w.down.detach()).contiguous().cpu()
        state[f"{base}.lora_up.weight"] = cast(w.up.detach()).contiguous().cpu()
        state[f"{base}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
    meta = lora_metadata(modules, targets, task) | (extra_metadata or {})
    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata=meta)
    return Path(path)
