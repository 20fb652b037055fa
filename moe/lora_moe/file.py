"""The stage-2 file (SPEC section 5), `lora_moe_stage2.safetensors` and `checkpoint-epoch-N.safetensors`.

Tensors (module = original dotted name, e = expert NAME, e.g. `experts.scissors`, so a file
states its own expert order and names survive a reordering):
    lora_moe.{module}.experts.{e}.lora_down.weight   [r, in]    (A_e)
    lora_moe.{module}.experts.{e}.lora_up.weight     [out, r]   (B_e)
    lora_moe.{module}.alpha                          scalar     (scale alpha / r)
    router.{name}                                    the router's state dict
    timestep_gate.k, timestep_gate.c                 [E]
Metadata (strings): lora_moe.format = "lora-moe/1", lora_moe.experts (JSON list), lora_moe.targets
(TargetSpec JSON), lora_moe.router (RouterConfig JSON), lora_moe.top_k, use_base_lora = "false",
lora_moe.task, lora_moe.merged_dits (JSON {name: sha256} of the merged DiTs trained on),
lora_moe.routing_mode (learned, teacher or uniform) and lora_moe.router_trained (true/false):
how generation without a hint may route (files without them: a trained, learned router).

`export_expert` writes one expert as a stage-1-style vanilla LoRA (`lora-moe export-expert`).
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict
from safetensors.torch import load_file, save_file
from torch import nn

from moe.config.instruments import expert_index
from moe.config.numbers import FiniteFloat, Fraction, checked
from moe.config.targets import TargetSpec, check_same_targets
from moe.errors import MoeError
from moe.files.atomic import atomic_file
from moe.files.output_paths import claim_output
from moe.files.safetensors_file import require_finite
from moe.lora.file import LoRAModuleWeights, SaveFormat, write_lora_file
from moe.lora.inject import adapter_items
from moe.lora_moe.gates import TimestepGate, timestep_weight
from moe.lora_moe.router import Router, RouterConfig
from moe.wan.file_kind import require_kind, written_as

LORA_MOE_FORMAT = "lora-moe/1"
_EXPERT_KEY = re.compile(r"lora_moe\.(?P<module>.+)\.experts\.(?P<expert>[^.]+)\.(?P<part>lora_down|lora_up)\.weight")
_ALPHA_KEY = re.compile(r"lora_moe\.(?P<module>.+)\.alpha")


class LoRAMoEFile(BaseModel):
    """A stage-2 file in memory."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    experts: tuple[str, ...]
    modules: dict[str, dict[str, LoRAModuleWeights]]  # module -> expert name -> (down, up, alpha)
    router_config: RouterConfig
    router_state: dict[str, torch.Tensor]
    timestep_gate_state: dict[str, torch.Tensor]  # k, c
    targets: TargetSpec
    task: str
    merged_dits: dict[str, str]
    metadata: dict[str, str]

    def ranks(self) -> dict[str, int]:
        return {m: next(iter(w.values())).rank for m, w in self.modules.items()}

    @property
    def routing_mode(self) -> str:
        return self.metadata.get("lora_moe.routing_mode", "learned")

    @property
    def router_trained(self) -> bool:
        return self.metadata.get("lora_moe.router_trained", "true") == "true"

    def inference_routing(self, source: str | Path | None = None) -> str:
        """How generation routes without --instrument_hint: `learned` (the trained router) or
        `uniform` (the mode the file was trained with); a router never trained is refused."""
        if self.router_trained:
            return "learned"
        if self.routing_mode == "uniform":
            return "uniform"
        how = "--routing_mode teacher" if self.routing_mode == "teacher" else "--no_train_router"
        raise MoeError(
            f"{source or 'this LoRA-MoE file'} was trained with {how}: its router was never trained, so it cannot "
            f"choose experts; pass --instrument_hint NAME ({', '.join(self.experts)})"
        )

    def build_router(self) -> Router:
        router = Router(self.router_config)
        try:
            router.load_state_dict(self.router_state)
        except RuntimeError as e:
            raise MoeError(f"the router weights do not fit the recorded router config: {e}") from None
        return router

    def build_timestep_gate(self) -> TimestepGate:
        gate = TimestepGate(len(self.experts))
        gate.load_state_dict(self.timestep_gate_state)
        return gate

    def load_adapters(self, adapters: nn.ModuleDict) -> None:
        """Copy the experts into adapters made by `moe.lora_moe.model` (same modules and ranks)."""
        items = adapter_items(adapters)
        check_same_targets(self.ranks(), {m: a.rank for m, a in items}, "the LoRA-MoE file", "the model")
        with torch.no_grad():
            for module, adapter in items:
                w = [self.modules[module][e] for e in self.experts]
                down = torch.cat([x.down for x in w], dim=0)
                up = torch.cat([x.up for x in w], dim=1)
                if down.shape != adapter.lora_down.shape or up.shape != adapter.lora_up.shape:
                    raise MoeError(
                        f"{module}: the LoRA-MoE file holds A_cat {tuple(down.shape)} / B_cat {tuple(up.shape)} but "
                        f"the model needs {tuple(adapter.lora_down.shape)} / {tuple(adapter.lora_up.shape)}; "
                        "was it trained for another task?"
                    )
                adapter.lora_down.copy_(down)
                adapter.lora_up.copy_(up)
                adapter.alpha = w[0].alpha


def write_lora_moe_file(
    path: str | Path,
    adapters: nn.ModuleDict,
    router: Router,
    timestep_gate: TimestepGate,
    *,
    experts: tuple[str, ...],
    targets: TargetSpec,
    task: str,
    merged_dits: dict[str, str],
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write the experts, router and timestep gates (atomically)."""
    if router.config.num_experts != len(experts) or timestep_gate.k.shape != (len(experts),):
        raise MoeError(f"the router and timestep gate must have one output per expert ({len(experts)})")
    state: dict[str, torch.Tensor] = {}
    for module, a in adapter_items(adapters):
        if a.num_experts != len(experts):
            raise MoeError(f"{module} has {a.num_experts} experts but {len(experts)} names were given")
        for i, name in enumerate(experts):
            rows = slice(i * a.rank, (i + 1) * a.rank)
            state[f"lora_moe.{module}.experts.{name}.lora_down.weight"] = a.lora_down[rows]
            state[f"lora_moe.{module}.experts.{name}.lora_up.weight"] = a.lora_up[:, rows]
        state[f"lora_moe.{module}.alpha"] = torch.tensor(a.alpha, dtype=torch.float32)
    state |= {f"router.{k}": v for k, v in router.state_dict().items()}
    state |= {f"timestep_gate.{k}": v for k, v in timestep_gate.state_dict().items()}
    meta = {
        "lora_moe.format": LORA_MOE_FORMAT,
        "lora_moe.experts": json.dumps(list(experts)),
        "lora_moe.targets": targets.to_json(),
        "lora_moe.router": router.config.model_dump_json(),
        "lora_moe.top_k": str(router.config.top_k),
        "use_base_lora": "false",
        "lora_moe.task": task,
        "lora_moe.merged_dits": json.dumps(merged_dits, sort_keys=True),
    } | (extra_metadata or {})
    with atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp, metadata=meta)
    return Path(path)


def read_lora_moe_file(path: str | Path) -> LoRAMoEFile:
    """Read a stage-2 file; any other kind of file (a vanilla LoRA, a DiT) is a one-line error."""
    path = Path(path)
    header = require_kind(path, "lora-moe", "--lora_moe_weights")
    meta = header.metadata
    if meta.get("lora_moe.format") != LORA_MOE_FORMAT:
        raise MoeError(
            f"{path} has LoRA-MoE format {meta.get('lora_moe.format', '(unrecorded)')}, this tool reads "
            f"{LORA_MOE_FORMAT}; it was written by another tool or version"
        )
    try:
        experts = tuple(json.loads(meta["lora_moe.experts"]))
        router_config = RouterConfig.model_validate_json(meta["lora_moe.router"])
        targets = TargetSpec.from_json(meta["lora_moe.targets"])
        merged_dits = json.loads(meta["lora_moe.merged_dits"])
        task = meta["lora_moe.task"]
    except KeyError as e:
        raise MoeError(f"{path}: metadata {e} is missing") from None
    except ValueError as e:
        raise MoeError(f"{path}: unreadable metadata: {e}") from None
    parts: dict[str, dict[tuple[str, str], torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    router_state, gate_state, unknown = {}, {}, []
    state = load_file(header.path)  # the file itself when `path` is a folder holding one
    require_finite(state, str(path))
    for key, t in state.items():
        if m := _EXPERT_KEY.fullmatch(key):
            parts.setdefault(m["module"], {})[m["expert"], m["part"]] = t
        elif m := _ALPHA_KEY.fullmatch(key):
            alphas[m["module"]] = float(t.float().item())
        elif key.startswith("router."):
            router_state[key.removeprefix("router.")] = t
        elif key in ("timestep_gate.k", "timestep_gate.c"):
            gate_state[key.removeprefix("timestep_gate.")] = t
        else:
            unknown.append(key)
    if unknown:
        raise MoeError(f"{path}: unexpected keys {unknown[:5]}")
    modules = {}
    for module in sorted(parts.keys() | alphas.keys()):
        have = parts.get(module, {})
        want = {(e, p) for e in experts for p in ("lora_down", "lora_up")}
        missing = [f"experts.{e}.{p}" for e, p in sorted(want - have.keys())] + ["alpha"] * (module not in alphas)
        if missing:
            raise MoeError(f"{path}: lora_moe.{module} has no {', '.join(missing)}")
        extra = sorted({e for e, _ in have} - set(experts))
        if extra:
            raise MoeError(f"{path}: lora_moe.{module} has experts {extra} not in lora_moe.experts {list(experts)}")
        p = parts[module]
        modules[module] = {e: LoRAModuleWeights(down=p[e, "lora_down"], up=p[e, "lora_up"], alpha=alphas[module]) for e in experts}
        shapes = {(w.down.shape, w.up.shape) for w in modules[module].values()}
        if len(shapes) != 1 or any(d[0] != u[1] for d, u in shapes):
            raise MoeError(f"{path}: lora_moe.{module} has inconsistent expert shapes {sorted(shapes)}")
    if not modules:
        raise MoeError(f"{path} holds no expert weights")
    if gate_state.keys() != {"k", "c"} or any(t.shape != (len(experts),) for t in gate_state.values()):
        raise MoeError(f"{path}: timestep_gate.k / timestep_gate.c must both be [{len(experts)}]")
    if router_config.num_experts != len(experts):
        raise MoeError(f"{path}: the router has {router_config.num_experts} outputs for {len(experts)} experts")
    return LoRAMoEFile(
        experts=experts,
        modules=modules,
        router_config=router_config,
        router_state=router_state,
        timestep_gate_state=gate_state,
        targets=targets,
        task=task,
        merged_dits=merged_dits,
        metadata=meta,
    )


def export_expert(
    moe_file: LoRAMoEFile | str | Path,
    expert_name: str,
    out_path: str | Path,
    bake_timestep_gate_sigma: float | None = 0.0,
    alpha_expert: float = 1.0,
    save_format: SaveFormat = "diffusers",
    overwrite: bool = False,
) -> Path:
    """One expert as a stage-1-style vanilla LoRA (loads in diffusers, ComfyUI, `--lora_weight`).

    The expert is forced (g_e = 1). A vanilla LoRA has no timestep input, so the timestep gate
    is baked in at one reference sigma: `up = alpha_expert * w_e(sigma_ref) * B_e`, with
    sigma_ref = 0 by default (w_e(0) ~ 1 at init: the expert at full strength, as in the late
    steps); None bakes no gate (w = 1). The LoRA is a delta on the MERGED DiTs it was trained on
    (recorded as `lora_moe.merged_dits`), not on the base DiTs.
    """
    checked(FiniteFloat, alpha_expert, "--alpha_expert")
    if bake_timestep_gate_sigma is not None:
        checked(Fraction, bake_timestep_gate_sigma, "--bake_sigma")
    source = None if isinstance(moe_file, LoRAMoEFile) else Path(moe_file)
    if source is not None:
        moe_file = read_lora_moe_file(source)
    e = expert_index(expert_name, moe_file.experts)
    w = 1.0
    if bake_timestep_gate_sigma is not None:
        g = moe_file.timestep_gate_state
        w = float(timestep_weight(g["k"].float(), g["c"].float(), torch.tensor([bake_timestep_gate_sigma]))[0, e])
    factor = alpha_expert * w
    modules = {m: _scale_up(ws[expert_name], factor) for m, ws in moe_file.modules.items()}
    meta = {
        "lora_moe.exported_expert": expert_name,
        "lora_moe.baked_sigma": "none" if bake_timestep_gate_sigma is None else str(bake_timestep_gate_sigma),
        "lora_moe.baked_scale": repr(factor),
        "lora_moe.merged_dits": json.dumps(moe_file.merged_dits, sort_keys=True),
    }
    ours = functools.partial(written_as, kind="vanilla-lora")
    with claim_output(out_path, flag="--out", inputs={"--lora_moe_weights": source}, overwrite=overwrite, is_ours=ours):
        return write_lora_file(out_path, modules, moe_file.targets, moe_file.task, save_format, extra_metadata=meta)


def _scale_up(w: LoRAModuleWeights, factor: float) -> LoRAModuleWeights:
    return LoRAModuleWeights(down=w.down, up=w.up.float() * factor, alpha=w.alpha)
