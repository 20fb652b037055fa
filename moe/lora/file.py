"""Vanilla LoRA files (SPEC section 3): write ours, read every common Wan LoRA form.

Forms written (`LoraForm`; `lora-moe convert-lora` turns any readable file into any of them):

- `default` (`--save_format diffusers`): loads in diffusers and ComfyUI, also with partial coverage
      diffusion_model.blocks.{i}.self_attn.q.lora_down.weight  [r, in]
      diffusion_model.blocks.{i}.self_attn.q.lora_up.weight    [out, r]
      diffusion_model.blocks.{i}.self_attn.q.alpha             scalar
- `musubi`: musubi-tuner's `lora_unet_blocks_{i}_self_attn_q.{lora_down.weight,lora_up.weight,alpha}`;
- `peft`: what diffusers' `save_lora_weights` writes, `transformer.blocks.{i}.attn1.to_q.lora_A.weight`
  / `.lora_B.weight` with the ranks and alphas in the PEFT header (`moe.lora.peft_header`).

Read forms: the above with or without `model.diffusion_model.`/`diffusion_model.`, musubi
`lora_unet_`, PEFT/diffusers `transformer.blocks.N.attn1.to_q.lora_A/lora_B` with or without a
`lora_adapter_metadata` header (without one and without `.alpha` the scale is 1, i.e. alpha = rank,
as diffusers does), any subset of modules, mixed ranks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file

from moe.config.targets import LINEAR_SUBMODULES, TargetSpec
from moe.errors import MoeError
from moe.files.atomic import atomic_file
from moe.files.safetensors_file import require_finite
from moe.lora.peft_header import COMPONENT_PREFIX, HEADER_KEY, PeftLoraHeader
from moe.wan.file_kind import require_kind
from moe.wan.keys import module_to_diffusers, module_to_original

VANILLA_FORMAT = "vanilla-lora/1"
LoraForm = Literal["default", "musubi", "peft"]
# The `--save_format` of stage 1 and export-expert: "diffusers" is the default form.
SaveFormat = Literal["diffusers", "musubi"]
_FORM_OF_SAVE_FORMAT = {"diffusers": "default", "default": "default", "musubi": "musubi", "peft": "peft"}
# Header entries computed from the weights on every write (never copied from an input file).
DERIVED_METADATA = {"ss_network_dim", "ss_network_alpha", "lora_moe.format", "lora_moe.ranks", HEADER_KEY}

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
    form: str  # a LoraForm, or (read only) "peft-bare", "comfy" (model.diffusion_model.*), "other", "mixed"

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


def lora_form(keys) -> str:
    """Which form a LoRA state dict's keys are in (see the module docstring). `peft-bare` is what
    `save_lora_adapter` writes (`blocks.N.attn1.to_q.lora_A.weight`): diffusers reads it only with
    `load_lora_adapter(..., prefix=None)`, `load_lora_weights` skips it."""
    forms = set()
    for key in keys:
        if key.startswith("lora_unet_"):
            forms.add("musubi")
        elif key.startswith("model.diffusion_model."):
            forms.add("comfy")
        elif key.startswith("diffusion_model."):
            forms.add("default")
        elif key.startswith(COMPONENT_PREFIX):
            forms.add("peft")
        elif key.startswith("blocks.") and (".lora_A." in key or ".lora_B." in key):
            forms.add("peft-bare")
        else:
            forms.add("other")
    return forms.pop() if len(forms) == 1 else "mixed"


def parse_lora_state(state: dict[str, torch.Tensor], source: str, metadata: dict[str, str] | None = None) -> dict[str, LoRAModuleWeights]:
    """Group a LoRA state dict of any supported form by canonical module name. A PEFT header in
    `metadata` sets each module's alpha (`moe.lora.peft_header`)."""
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
    header = PeftLoraHeader.from_metadata(metadata or {}, source)
    if header is not None and any("alpha" in p for p in parts.values()):
        # diffusers would apply both (the .alpha baked into the weights, then the header's scale);
        # ComfyUI and musubi-tuner read only the .alpha: the file has no single meaning.
        raise MoeError(f"{source} has both .alpha tensors and a {HEADER_KEY} header, which tools read differently; remove one of them")
    modules = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise MoeError(f"{source}: {module} has {'no lora_up' if 'up' not in p else 'no lora_down'} weight")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise MoeError(f"{source}: {module} has inconsistent LoRA shapes down {tuple(down.shape)}, up {tuple(up.shape)}")
        if header is not None:
            alpha = header.kohya_alpha(module_to_diffusers(module), down.shape[0], source)
        else:
            alpha = float(p["alpha"].float().item()) if "alpha" in p else float(down.shape[0])
        modules[module] = LoRAModuleWeights(down=down, up=up, alpha=alpha)
    if not modules:
        raise MoeError(f"{source} holds no LoRA weights")
    return dict(sorted(modules.items()))


def read_lora_file(path: str | Path) -> LoRAFile:
    """Read a vanilla LoRA file of any supported form; other kinds of file are a clear error."""
    path = Path(path)
    header = require_kind(path, "vanilla-lora", "--lora_weight")
    state = load_file(header.path)  # the file itself when `path` is a folder holding one
    require_finite(state, str(path))
    return LoRAFile(modules=parse_lora_state(state, str(path), header.metadata), metadata=header.metadata, form=lora_form(state))


def lora_metadata(modules: dict[str, LoRAModuleWeights], targets: TargetSpec | None, task: str | None) -> dict[str, str]:
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


def _module_key(module: str, form: str) -> tuple[str, str, str]:
    """(base key, down part, up part) of a module in a written form."""
    if form == "musubi":
        return "lora_unet_" + module.replace(".", "_"), "lora_down", "lora_up"
    if form == "peft":
        return COMPONENT_PREFIX + module_to_diffusers(module), "lora_A", "lora_B"
    return "diffusion_model." + module, "lora_down", "lora_up"


def write_lora_file(
    path: str | Path,
    modules: dict[str, LoRAModuleWeights],
    targets: TargetSpec | None = None,
    task: str | None = None,
    save_format: SaveFormat | LoraForm = "diffusers",
    dtype: torch.dtype | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write a vanilla LoRA file (atomically) in one of the written forms. `dtype` casts
    down/up (alpha stays an fp32 scalar); in the peft form alphas go into the PEFT header."""
    form = _FORM_OF_SAVE_FORMAT.get(save_format)
    if form is None:
        raise MoeError(f"unknown LoRA form {save_format!r}; choose default (diffusers), musubi or peft")
    if form == "musubi" and (zero := [m for m, w in modules.items() if w.alpha == 0]):
        # musubi-tuner reads alpha 0 as alpha = rank (networks/lora.py LoRAModule.__init__)
        raise MoeError(f"the musubi form cannot hold alpha 0 ({', '.join(zero[:3])}): musubi-tuner reads it as alpha = rank")
    cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
    state: dict[str, torch.Tensor] = {}
    for module, w in modules.items():
        base, down, up = _module_key(module, form)
        state[f"{base}.{down}.weight"] = cast(w.down.detach()).contiguous().cpu()
        state[f"{base}.{up}.weight"] = cast(w.up.detach()).contiguous().cpu()
        if form != "peft":
            state[f"{base}.alpha"] = torch.tensor(w.alpha, dtype=torch.float32)
    meta = lora_metadata(modules, targets, task) | (extra_metadata or {})
    meta.pop(HEADER_KEY, None)  # a header beside .alpha tensors would scale twice in diffusers
    if form == "peft":
        meta |= PeftLoraHeader.for_modules({module_to_diffusers(m): (w.rank, w.alpha) for m, w in modules.items()}).to_metadata()
    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata=meta)
    return Path(path)
