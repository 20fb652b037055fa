"""Wan DiT key styles and the mapping between them.

Two key styles exist for the same tensors:

- original (the Wan release, musubi-tuner, ComfyUI): `blocks.3.self_attn.q.weight`, `ffn.0`,
  `norm3`, `blocks.3.modulation`, `head.head` ...; ComfyUI single files prefix every key with
  `model.diffusion_model.`;
- diffusers (`WanTransformer3DModel`): `blocks.3.attn1.to_q.weight`, `ffn.net.0.proj`, `norm2`,
  `blocks.3.scale_shift_table`, `proj_out` ...

LoRA module names are always original-style dotted names without prefix (SPEC section 2).
The tables below are the single source of truth for both directions.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict

from moe.config.presets import BLOCK_MODULES

KeyStyle = Literal["original", "diffusers"]
COMFY_PREFIX = "model.diffusion_model."

# Parameters that sit directly on a block: original -> diffusers.
BLOCK_PARAMS: dict[str, str] = {"modulation": "scale_shift_table"}

# Modules outside the blocks: original -> diffusers.
TOP_MODULES: dict[str, str] = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
TOP_PARAMS: dict[str, str] = {"head.modulation": "scale_shift_table"}

_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def _invert(d: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


_TABLES = {
    "original": (BLOCK_MODULES, BLOCK_PARAMS, TOP_MODULES, TOP_PARAMS),
    "diffusers": tuple(_invert(t) for t in (BLOCK_MODULES, BLOCK_PARAMS, TOP_MODULES, TOP_PARAMS)),
}


def _convert(key: str, source: KeyStyle) -> str | None:
    block_modules, block_params, top_modules, top_params = _TABLES[source]
    m = _BLOCK_RE.fullmatch(key)
    if m:
        idx, rest = m.groups()
        if rest in block_params:
            return f"blocks.{idx}.{block_params[rest]}"
        module, _, param = rest.rpartition(".")
        return f"blocks.{idx}.{block_modules[module]}.{param}" if module in block_modules else None
    if key in top_params:
        return top_params[key]
    module, _, param = key.rpartition(".")
    return f"{top_modules[module]}.{param}" if module in top_modules else None


def original_to_diffusers(key: str) -> str | None:
    """`blocks.0.self_attn.q.weight` -> `blocks.0.attn1.to_q.weight`; None for an unknown key."""
    return _convert(key, "original")


def diffusers_to_original(key: str) -> str | None:
    """`blocks.0.attn1.to_q.weight` -> `blocks.0.self_attn.q.weight`; None for an unknown key."""
    return _convert(key, "diffusers")


def module_to_diffusers(module: str) -> str:
    """Original LoRA module name -> diffusers module path (`blocks.3.ffn.0` -> `blocks.3.ffn.net.0.proj`)."""
    key = original_to_diffusers(module + ".weight")
    if key is None:
        raise KeyError(module)
    return key[: -len(".weight")]


def module_to_original(module: str) -> str:
    key = diffusers_to_original(module + ".weight")
    if key is None:
        raise KeyError(module)
    return key[: -len(".weight")]


class KeyFormat(BaseModel):
    """How a checkpoint spells its keys: a key style and an optional prefix."""

    model_config = ConfigDict(frozen=True)

    style: KeyStyle
    prefix: str = ""

    def describe(self) -> str:
        return f"{self.style} keys" + (f" with prefix '{self.prefix}'" if self.prefix else "")

    def to_file_key(self, original_key: str) -> str:
        """Canonical (original, unprefixed) key -> the key as stored in this format."""
        key = original_key if self.style == "original" else original_to_diffusers(original_key)
        if key is None:
            raise KeyError(original_key)
        return self.prefix + key

    def to_original_key(self, file_key: str) -> str | None:
        key = file_key[len(self.prefix) :] if self.prefix and file_key.startswith(self.prefix) else file_key
        return key if self.style == "original" else diffusers_to_original(key)


def detect_key_format(keys) -> KeyFormat | None:
    """Recognise a Wan DiT state dict by its keys; None when it is not one."""
    keys = list(keys)
    prefix = COMFY_PREFIX if any(k.startswith(COMFY_PREFIX) for k in keys) else ""
    bare = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
    if any(re.fullmatch(r"blocks\.\d+\.self_attn\.q\.weight", k) for k in bare):
        return KeyFormat(style="original", prefix=prefix)
    if any(re.fullmatch(r"blocks\.\d+\.attn1\.to_q\.weight", k) for k in bare):
        return KeyFormat(style="diffusers", prefix=prefix)
    return None
