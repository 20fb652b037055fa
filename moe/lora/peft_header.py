"""The PEFT adapter config that diffusers keeps in a LoRA file's header.

diffusers 0.42 writes `LoraConfig.to_dict()` as JSON under the header key `lora_adapter_metadata`
(`loaders/lora_base.py` `LoraBaseMixin.write_lora_layers`, `loaders/peft.py`
`PeftAdapterMixin.save_lora_adapter`). `save_lora_weights` prefixes every config key with the
component (`transformer.r`), like the tensor keys; `save_lora_adapter` writes both bare. Loading
(`loaders/peft.py` `load_lora_adapter` -> `utils/peft_utils.py` `_create_lora_config`) rebuilds
`LoraConfig(**header)`, and peft gives each module M (its path in the transformer,
`blocks.7.attn1.to_q`) in `peft/tuners/lora/model.py` `LoraModel._create_and_replace`:

    r     = rank_pattern[first key matching M]  else r
    alpha = alpha_pattern[first key matching M] else lora_alpha
    scale = alpha / r            (alpha / sqrt(r) with use_rslora; `tuners/lora/layer.py` update_layer)

A pattern key K matches M when `re.match(rf"(.*\\.)?({K})$", M)` (`peft/utils/other.py`
`get_pattern_key`): K is a regex, matched against M or a dotted suffix of it, tried in the order
the header lists them. peft is not a runtime dependency, so that one rule is restated here; the
tests check it against peft's own function. Missing options take LoraConfig's defaults (r 8,
lora_alpha 8), as `LoraConfig(**header)` would.

Here every module's scale is turned into a kohya alpha (`alpha_kohya = scale * rank`), which is
what the rest of the project stores (SPEC: scale = alpha / rank).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter

from pydantic import BaseModel, ConfigDict, ValidationError

from moe.errors import MoeError, list_names

HEADER_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
COMPONENT_PREFIX = "transformer."

# Options with no effect on what a plain LoRA on Linear layers adds to the weights (bookkeeping,
# training-time settings, or options that only matter together with one refused below).
_NO_EFFECT = {
    "peft_version",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "auto_mapping",
    "inference_mode",
    "lora_dropout",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "fan_in_fan_out",  # peft turns it off for nn.Linear (tuners/lora/model.py _create_new_module)
}
_HANDLED = {"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "target_modules", "exclude_modules"}
# Allowed values of options that are otherwise refused.
_PLAIN_VALUES = {"peft_type": ("LORA",), "bias": ("none",), "init_lora_weights": (True, False, "gaussian")}


def _plain(option: str, value) -> bool:
    """Whether an option's value leaves a plain LoRA (unset, off, empty, or an allowed value)."""
    if option in _PLAIN_VALUES:
        return any(value is v or (isinstance(v, str) and value == v) for v in _PLAIN_VALUES[option])
    return value is None or value is False or value in ({}, [], "")


def pattern_key(patterns, module: str) -> str | None:
    """The first key of `patterns` that peft's `get_pattern_key` would match to `module`."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _targets(spec: list[str] | str | None, module: str) -> bool:
    """peft's `check_target_module_exists` for a list (exact name or dotted suffix) or a regex."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return spec == "all-linear" or re.fullmatch(spec, module) is not None
    return any(module == t or module.endswith("." + t) for t in spec)


class PeftLoraHeader(BaseModel):
    """The part of a PEFT LoraConfig that decides each module's rank and scale."""

    model_config = ConfigDict(frozen=True)

    r: int = 8
    lora_alpha: float = 8
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    use_rslora: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], source: str) -> PeftLoraHeader | None:
        """The header of a file's metadata, or None when it has none. Options that change what the
        adapter computes beyond a plain LoRA (DoRA, biases, layer replication ...) are refused."""
        raw = metadata.get(HEADER_KEY)
        if not raw:
            return None
        try:
            config = json.loads(raw)
        except json.JSONDecodeError:
            raise MoeError(f"{source}: the {HEADER_KEY} header is not JSON") from None
        if not isinstance(config, dict):
            raise MoeError(f"{source}: the {HEADER_KEY} header is not a JSON object")
        if any(k.startswith(COMPONENT_PREFIX) for k in config):  # `save_lora_weights` style
            config = {k[len(COMPONENT_PREFIX) :]: v for k, v in config.items() if k.startswith(COMPONENT_PREFIX)}
        unsupported = [f"{k}={v!r}" for k, v in config.items() if k not in _NO_EFFECT | _HANDLED and not _plain(k, v)]
        if unsupported:
            raise MoeError(
                f"{source}: its PEFT header sets {list_names(sorted(unsupported), 4)}, which is more than a plain "
                "LoRA; this tool cannot merge it exactly"
            )
        try:
            return cls(**{k: v for k, v in config.items() if k in _HANDLED and v is not None})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise MoeError(f"{source}: invalid {HEADER_KEY} header ({problems})") from None

    def kohya_alpha(self, module: str, tensor_rank: int, source: str) -> float:
        """The alpha giving `module` (a diffusers module path) the scale diffusers gives it,
        as `scale * rank`. Refuses a module diffusers would not load or would fail on."""
        if not _targets(self.target_modules or [module], module) or _targets(self.exclude_modules, module):
            raise MoeError(
                f"{source}: its PEFT header does not target {module}, so diffusers would drop that module's weights; fix target_modules in the header"
            )
        key = pattern_key(self.rank_pattern, module)
        rank = self.rank_pattern[key] if key is not None else self.r
        if rank != tensor_rank:
            raise MoeError(f"{source}: its PEFT header gives {module} rank {rank} but the tensors have rank {tensor_rank}; diffusers cannot load it")
        key = pattern_key(self.alpha_pattern, module)
        alpha = self.alpha_pattern[key] if key is not None else self.lora_alpha
        scale = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        return scale * rank

    @classmethod
    def for_modules(cls, modules: dict[str, tuple[int, float]]) -> PeftLoraHeader:
        """A header expressing (rank, kohya alpha) per diffusers module path: the most common rank
        and alpha as r / lora_alpha, the others as exact patterns (anchored, as diffusers writes
        its own rank patterns: `^blocks.7.attn1.to_q`, peft PR #2419)."""
        r = Counter(rank for rank, _ in modules.values()).most_common(1)[0][0]
        alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
        exact = {m: "^" + re.escape(m) for m in modules}
        return cls(
            r=r,
            lora_alpha=alpha,
            rank_pattern={exact[m]: rank for m, (rank, _) in modules.items() if rank != r},
            alpha_pattern={exact[m]: a for m, (_, a) in modules.items() if a != alpha},
            target_modules=sorted(modules),
        )

    def to_metadata(self) -> dict[str, str]:
        """The header entry, as `save_lora_weights` writes it (component-prefixed keys)."""
        config = self.model_dump() | {"peft_type": "LORA", "use_dora": False, "lora_bias": False}
        prefixed = {COMPONENT_PREFIX + k: v for k, v in config.items() if v is not None}
        return {HEADER_KEY: json.dumps(prefixed, indent=2, sort_keys=True)}
