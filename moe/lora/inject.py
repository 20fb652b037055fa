"""Put LoRA layers into a diffusers `WanTransformer3DModel` by original module name, and take
them out again. Modules are addressed as `blocks.{i}.self_attn.q` (SPEC section 2); the mapping to
diffusers' attribute paths comes from `moe.wan.keys`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from moe.errors import MoeError
from moe.lora.layer import AdaptedLinear, LoRAAdapter, LoRALinear
from moe.wan.keys import module_to_diffusers


def get_linear(model: nn.Module, module: str) -> nn.Linear:
    """The `nn.Linear` behind an original module name (unwrapping a LoRA layer if present)."""
    try:
        layer = model.get_submodule(module_to_diffusers(module))
    except (AttributeError, KeyError):
        raise MoeError(f"the model has no module {module}") from None
    if isinstance(layer, LoRALinear):
        layer = layer.base
    if not isinstance(layer, nn.Linear):
        raise MoeError(f"{module} is a {type(layer).__name__}, not a Linear layer")
    return layer


def build_adapters(
    model: nn.Module, modules: dict[str, int], alpha: float, adapter_type: type[nn.Module] = LoRAAdapter, **adapter_options
) -> nn.ModuleDict:
    """Fresh adapters for `modules` (name -> rank), sized from the model's Linear layers:
    `adapter_type(in_features, out_features, rank, alpha, **adapter_options)` each (a stage-1
    `LoRAAdapter`, or stage 2's `LoRAMoEAdapter` with `num_experts`).

    ModuleDict keys cannot hold dots, so they use `/` in place of `.`; see `adapter_items`.
    """
    adapters = nn.ModuleDict()
    for module, rank in modules.items():
        linear = get_linear(model, module)
        adapters[module.replace(".", "/")] = adapter_type(linear.in_features, linear.out_features, rank, alpha, **adapter_options)
    return adapters


def adapters_from_weights(model: nn.Module, weights: dict) -> nn.ModuleDict:
    """Adapters holding given LoRA weights (module -> `LoRAModuleWeights`: down, up, alpha),
    sized and checked against the model's Linear layers."""
    adapters = build_adapters(model, {m: w.rank for m, w in weights.items()}, alpha=1.0)
    with torch.no_grad():
        for module, adapter in adapter_items(adapters):
            w = weights[module]
            if w.up.shape[0] != adapter.lora_up.shape[0] or w.down.shape[1] != adapter.lora_down.shape[1]:
                raise MoeError(
                    f"{module}: the LoRA is [{w.up.shape[0]}, {w.down.shape[1]}] but the model's Linear is "
                    f"[{adapter.lora_up.shape[0]}, {adapter.lora_down.shape[1]}]; it was trained for another model"
                )
            adapter.lora_down.copy_(w.down)
            adapter.lora_up.copy_(w.up)
            adapter.alpha = w.alpha
    return adapters


def adapter_items(adapters: nn.ModuleDict) -> list[tuple[str, LoRAAdapter]]:
    """(original module name, adapter) pairs of a ModuleDict made by `build_adapters`."""
    return [(key.replace("/", "."), a) for key, a in adapters.items()]


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put `new` at the dotted diffusers `path` (list children such as `to_out.0` included);
    returns the module that was there."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = parent[int(child)] if child.isdigit() else getattr(parent, child)
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return old


def inject_adapters(model: nn.Module, adapters: nn.ModuleDict, wrap: Callable[[nn.Linear, nn.Module], AdaptedLinear]) -> dict[str, AdaptedLinear]:
    """The one injection loop (peft's pattern) of both stages: each target Linear of `model`
    becomes `wrap(linear, adapter)` with its (possibly shared) adapter; the model's own
    parameters are frozen. Returns module name -> layer."""
    model.requires_grad_(False)
    layers = {}
    for module, adapter in adapter_items(adapters):
        current = model.get_submodule(module_to_diffusers(module))
        if isinstance(current, AdaptedLinear):
            raise MoeError(
                f"{module} already has a {type(current).__name__}; adapter layers do not stack (stage 2 runs on "
                "a merged DiT, with no LoRA layer of its own)"
            )
        layers[module] = wrap(get_linear(model, module), adapter)
        replace_module(model, module_to_diffusers(module), layers[module])
    return layers


def inject_lora(model: nn.Module, adapters: nn.ModuleDict, multiplier: float = 1.0) -> dict[str, LoRALinear]:
    """Stage 1: each target Linear wrapped in a `LoRALinear` with the given adapters."""
    return inject_adapters(model, adapters, lambda linear, adapter: LoRALinear(linear, adapter, multiplier))


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every adapter layer of `model` (stage-1 LoRA or stage-2 LoRA-MoE) on or off."""
    for layer in model.modules():
        if isinstance(layer, AdaptedLinear):
            layer.enabled = enabled


@contextlib.contextmanager
def adapters_enabled(models, enabled: bool):
    """Within the block, the adapters of `models` are on or off; afterwards they are on."""
    for model in models:
        set_adapters_enabled(model, enabled)
    try:
        yield
    finally:
        for model in models:
            set_adapters_enabled(model, True)
