"""Put LoRA-MoE layers into a diffusers `WanTransformer3DModel` by original module name
(`blocks.7.self_attn.q`, SPEC section 2; mapped by `moe.wan.keys`), as `moe.lora.inject` does
for stage 1.

Both Wan2.2 DiTs (high and low noise) train ONE set of experts: the first `inject_lora_moe`
call builds the adapters and returns them; pass them as `adapters` to the second call (with
the same `RoutingState`), so both models hold the very same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moe.config.targets import check_same_targets
from moe.errors import MoeError
from moe.lora.inject import adapter_items, build_adapters, inject_adapters
from moe.lora_moe.file import LoRAMoEFile
from moe.lora_moe.gates import TimestepGate
from moe.lora_moe.layer import LoRAMoEAdapter, LoRAMoELinear
from moe.lora_moe.router import Router
from moe.lora_moe.routing import RoutingState


def build_moe_adapters(model: nn.Module, modules: dict[str, int], alpha: float, num_experts: int) -> nn.ModuleDict:
    """Fresh LoRA-MoE adapters for `modules` (name -> rank), sized from the model's Linear layers."""
    return build_adapters(model, modules, alpha, LoRAMoEAdapter, num_experts=num_experts)


def inject_lora_moe(
    model: nn.Module,
    modules: dict[str, int],
    alpha: float,
    experts: tuple[str, ...],
    state: RoutingState,
    adapters: nn.ModuleDict | None = None,
) -> nn.ModuleDict:
    """Replace each target Linear of `model` with a `LoRAMoELinear` reading `state`; freeze the
    model's own parameters. Builds the adapters unless given (then they must match `modules`
    and `experts`). Returns the adapters."""
    if adapters is None:
        adapters = build_moe_adapters(model, modules, alpha, len(experts))
    items = adapter_items(adapters)
    check_same_targets({m: a.rank for m, a in items}, modules, "the shared LoRA-MoE adapters", "this model's targets")
    wrong = sorted({a.num_experts for _, a in items} - {len(experts)})
    if wrong:
        raise MoeError(f"the shared adapters have {wrong[0]} experts, expected {len(experts)} ({', '.join(experts)})")
    inject_adapters(model, adapters, lambda linear, adapter: LoRAMoELinear(linear, adapter, state))
    return adapters


def set_alpha_expert(model: nn.Module, alpha_expert: float) -> None:
    """`--alpha_expert`: the strength of the expert mixture in every LoRA-MoE layer."""
    for layer in model.modules():
        if isinstance(layer, LoRAMoELinear):
            layer.alpha_expert = alpha_expert


@dataclass
class AttachedLoRAMoE:
    """A stage-2 file's experts, router and timestep gates, attached to one or two DiTs that
    share one routing state."""

    adapters: nn.ModuleDict
    router: Router
    timestep_gate: TimestepGate
    state: RoutingState


def attach_lora_moe_file(dits: list[nn.Module], moe_file: LoRAMoEFile, num_layers: int, device, alpha_expert: float = 1.0) -> AttachedLoRAMoE:
    """Inject a stage-2 file's experts into `dits` (the merged DiTs it was trained on), with its
    router (eval mode) and timestep gates on `device`."""
    check_same_targets(moe_file.targets.resolve(num_layers), moe_file.ranks(), "the file's target spec", "its weights")
    state = RoutingState()
    adapters = build_moe_adapters(dits[0], moe_file.ranks(), moe_file.targets.alpha, len(moe_file.experts))
    moe_file.load_adapters(adapters)
    adapters.to(device)
    for dit in dits:
        inject_lora_moe(dit, moe_file.ranks(), moe_file.targets.alpha, moe_file.experts, state, adapters=adapters)
        set_alpha_expert(dit, alpha_expert)
    router = moe_file.build_router().to(device).eval()
    return AttachedLoRAMoE(adapters, router, moe_file.build_timestep_gate().to(device), state)
