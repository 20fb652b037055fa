"""Stage 2 (SPEC section 5): LoRA-MoE experts, router and timestep gates on the merged DiTs.

    y = W' x + alpha_expert * sum_e g_e * w_e(sigma) * (alpha / r) * B_e A_e x
    L = L_fm(ROI-weighted) + lambda_teach KL(q || p) + lambda_ent mean H(p) + lambda_lb E sum f_e P_e

The merged DiTs (stage-1 LoRA folded in) stay frozen; there is no base_lora. One router per
model decides per sample from the pooled caption embedding, sigma and (I2V) the first frame.
Teacher forcing mixes the label-derived q into p with rho decaying 1 -> 0 over the first 30% of
steps. The loop is stage 1's (`moe.train.loop`); only this module differs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from moe.config.file_names import LORA_MOE_FILE
from moe.config.instruments import INSTRUMENT_CLASSES
from moe.config.targets import check_same_targets
from moe.config.train import Stage2Config
from moe.dit.dual_dit import DualDiT
from moe.dit.flow_matching import per_sample_loss, roi_weights
from moe.dit.routed_dit import RoutedDiT, stage2_metrics
from moe.errors import MoeError
from moe.files.hashing import sha256_tree
from moe.lora_moe.file import write_lora_moe_file
from moe.lora_moe.gates import TimestepGate
from moe.lora_moe.losses import LoadBalance, routing_entropy, teacher_kl
from moe.lora_moe.model import build_moe_adapters, inject_lora_moe, set_alpha_expert
from moe.lora_moe.router import Router, RouterConfig
from moe.lora_moe.routing import (
    RoutingState,
    compute_gates,
    labels_by_name,
    teacher_distribution,
    teacher_forcing_rho,
)
from moe.train.loop import TrainingModule
from moe.train.recipe import StageRecipe, run_stage
from moe.train.sampling import check_sampling
from moe.wan.file_kind import classify, require_kind

BASE_LORA_REFUSAL = (
    "--use_base_lora is not supported: stage-1 knowledge lives in the merged DiTs, not in a base_lora. "
    "Merge the stage-1 LoRA into both DiTs with `lora-moe merge` and pass the merged files as --dit and "
    "--dit_high_noise (see the README's two-stage workflow)"
)


def check_stage2_inputs(cfg: Stage2Config) -> dict[str, str]:
    """Refuse what the merge workflow rules out, before any weights are loaded (the experts are
    checked against the cache's classes by `check_experts`, after the DiTs' task). Returns the
    merged DiTs' sha256 (recorded in the stage-2 file)."""
    if cfg.use_base_lora:
        raise MoeError(BASE_LORA_REFUSAL)
    if cfg.alpha_base is not None:
        warnings.warn("--alpha_base is ignored: this workflow has no base_lora (use_base_lora = false)", stacklevel=2)
    paths = {"low": cfg.dit} | ({"high": cfg.dit_high_noise} if cfg.dit_high_noise else {})
    stage1_loras = {}
    for name, path in paths.items():
        flag = "--dit" if name == "low" else "--dit_high_noise"
        info = classify(path)
        if info.kind == "wan-dit":
            raise MoeError(
                f"{path} is a base Wan DiT with no stage-1 LoRA merged in; stage 2 trains on merged DiTs. Run "
                f"`lora-moe merge --dit {path} --lora_weight vanilla_lora.safetensors --save_merged_model "
                f"merged_{name}_noise.safetensors` and pass the result as {flag}"
            )
        require_kind(path, "merged-dit", flag)
        record = info.merged_from()[-1]
        stage1_loras[name] = record.get("lora_sha256")
        if record.get("ranks"):
            resolved = cfg.target_spec().resolve(cfg.preset.dit.num_layers)
            check_same_targets(record["ranks"], resolved, f"the stage-1 LoRA merged into {path.name}", "stage 2 (--rank_* flags)")
    if len(set(stage1_loras.values())) > 1:
        raise MoeError(f"{cfg.dit} and {cfg.dit_high_noise} have different stage-1 LoRAs merged in; merge the same one into both")
    return {name: sha256_tree(p) for name, p in paths.items()}


def check_experts(cfg: Stage2Config, label_classes: tuple[str, ...]) -> None:
    """`--num_experts` / `--expert_names` against the cache's label classes: one expert per class,
    matched by name (any order), before any DiT is loaded."""
    names, classes = tuple(cfg.expert_names), tuple(label_classes)
    listed = f"--expert_names {','.join(names)}"
    if cfg.num_experts != len(names):
        raise MoeError(
            f"--num_experts {cfg.num_experts} but {listed} names {len(names)}; the cache's label classes are {', '.join(classes)} (one expert each)"
        )
    if len(set(names)) != len(names):
        raise MoeError(f"{listed} names an expert twice")
    if set(names) != set(classes):
        missing, unknown = [c for c in classes if c not in names], [n for n in names if n not in classes]
        raise MoeError(
            f"{listed} must name the cache's label classes ({', '.join(classes)}), one expert each, in any order"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; not a label class: {', '.join(unknown)}" if unknown else "")
        )


class Stage2Module(TrainingModule):
    def __init__(self, cfg: Stage2Config, dits: DualDiT, merged_dits: dict[str, str], label_classes: tuple[str, ...] = INSTRUMENT_CLASSES):
        super().__init__()
        self.cfg = cfg
        self.dits = dits
        self.merged_dits = merged_dits
        self.spec = cfg.target_spec()
        self.experts = tuple(cfg.expert_names)
        self.label_classes = tuple(label_classes)  # the cache's label columns; experts match them by name
        self.state = RoutingState()
        modules = self.spec.resolve(cfg.preset.dit.num_layers)
        self.adapters = build_moe_adapters(dits.models["low"], modules, self.spec.alpha, len(self.experts))
        for dit in dits:
            inject_lora_moe(dit, modules, self.spec.alpha, self.experts, self.state, adapters=self.adapters)
            set_alpha_expert(dit, cfg.alpha_expert)
        self.router = Router(RouterConfig.for_preset(cfg.preset, sigma_dim=cfg.router_sigma_dim, num_experts=len(self.experts), top_k=cfg.top_k))
        self.router.requires_grad_(self.router_trained)
        self.timestep_gate = TimestepGate(len(self.experts))
        self.load_balance = LoadBalance(len(self.experts), cfg.load_balance_beta)
        self.rho = 0.0
        # The routed forward (shared with `lora-moe eval`); a plain object, so the router and
        # gates stay registered here only.
        self.routed = RoutedDiT(dits, self.router, self.timestep_gate, self.state, self.experts, cfg.top_k, cfg.preset.i2v, self.label_classes)

    # --- routing ---------------------------------------------------------------------------
    def teacher(self, batch: dict) -> torch.Tensor:
        """q [B, E] from the clips' labels, each column taken from the label class of that name."""
        return teacher_distribution(labels_by_name(batch["labels"], self.label_classes, self.experts), self.experts)

    def gates(self, p: torch.Tensor, q: torch.Tensor, mode: str, rho: float = 0.0, hint: int | None = None) -> torch.Tensor:
        return compute_gates(mode, router_probs=p, q=q, rho=rho, hint_index=hint, top_k=self.cfg.top_k)

    # --- training --------------------------------------------------------------------------
    def on_step(self, step: int, total_steps: int) -> None:
        guided = self.cfg.use_teacher_guidance and self.cfg.routing_mode == "learned"
        self.rho = teacher_forcing_rho(step, total_steps, self.cfg.teacher_forcing_fraction) if guided else 0.0

    def forward(self, batch, sigma, noise, expert):
        cfg = self.cfg
        q = self.teacher(batch)
        logits = self.routed.router_logits(batch, sigma)
        p = F.softmax(logits, dim=-1)
        g = self.gates(p, q, cfg.routing_mode, self.rho)
        pred, target = self.routed.predict(batch, sigma, noise, expert, g)
        fm = per_sample_loss(pred, target, roi_weights(batch["roi"], cfg.roi_weight)).mean()
        parts = {"loss_fm": fm.detach(), "rho": torch.tensor(self.rho)}
        loss = fm
        if cfg.routing_mode == "learned" and cfg.train_router:
            teach = teacher_kl(q, logits) if cfg.use_teacher_guidance else torch.zeros(())
            ent, lb = routing_entropy(logits), self.load_balance(p)
            loss = fm + cfg.lambda_teach * teach + cfg.lambda_ent * ent + cfg.lambda_lb * lb
            parts |= {"loss_teach": teach.detach(), "loss_entropy": ent.detach(), "loss_load_balance": lb.detach()}
        parts["routing_accuracy"] = (q.gather(1, p.argmax(1, keepdim=True)) > 0).float().mean()
        for i, name in enumerate(self.experts):
            parts[f"load_{name}"] = g[:, i].mean().detach()
            parts[f"gate_w_{name}"] = self.state.timestep_weights[:, i].mean().detach()
        parts["loss"] = loss
        return parts

    def save_weights(self, path: Path) -> None:
        write_lora_moe_file(
            path,
            self.adapters,
            self.router,
            self.timestep_gate,
            experts=self.experts,
            targets=self.spec,
            task=self.cfg.task,
            merged_dits=self.merged_dits,
            extra_metadata={"lora_moe.routing_mode": self.cfg.routing_mode, "lora_moe.router_trained": str(self.router_trained).lower()},
        )

    @property
    def router_trained(self) -> bool:
        return self.cfg.train_router and self.cfg.routing_mode == "learned"

    def sample_routing(self, cond, hint):
        """`lora-moe generate`'s routing over the live router and gates: the hint's expert, else
        what generation with this run's file would do (`unhinted_routing`)."""
        from types import SimpleNamespace

        from moe.config.generate import GenerateConfig
        from moe.inference import MoERouting

        live = SimpleNamespace(router_config=self.router.config, inference_routing=lambda source=None: unhinted_routing(self.cfg))
        index = self.experts.index(hint) if hint is not None else None
        beta = GenerateConfig.model_fields["routing_beta"].default
        return MoERouting(live, self.router, self.timestep_gate, self.state, cond, index, beta)

    # --- held-out metrics ------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, items, cfg):
        """Held-out metrics on the fixed sigma grid with fixed noise per (clip, sigma)."""
        return stage2_metrics(self.routed.measure(items, cfg.val_sigmas, cfg.seed)) | {
            "timestep_gate_k": self.timestep_gate.k.tolist(),
            "timestep_gate_c": self.timestep_gate.c.tolist(),
            "experts": list(self.experts),
        }


def unhinted_routing(cfg: Stage2Config) -> str | None:
    """How a sample without an instrument hint routes (`LoRAMoEFile.inference_routing` of the file
    this run writes): the learned router, uniform gates, or None (the router is never trained)."""
    if cfg.train_router and cfg.routing_mode == "learned":
        return "learned"
    return "uniform" if cfg.routing_mode == "uniform" else None


class Stage2Recipe(StageRecipe):
    name, weights_file = "stage2", LORA_MOE_FILE

    def check_inputs(self, cfg: Stage2Config) -> None:
        self.merged = check_stage2_inputs(cfg)  # the merged DiTs' provenance, recorded in the file

    def check_dataset(self, cfg: Stage2Config, index) -> list:
        check_experts(cfg, index.label_classes)
        return check_sampling(cfg, index.settings.size, index.settings.frames, tuple(cfg.expert_names), unhinted_routing(cfg))

    def build_module(self, cfg: Stage2Config, dits: DualDiT, index) -> Stage2Module:
        return Stage2Module(cfg, dits, self.merged, index.label_classes)


def train_stage2(cfg: Stage2Config) -> dict:
    """Train experts + router + gates; writes `lora_moe_stage2.safetensors` into `cfg.output_dir`."""
    return run_stage(cfg, Stage2Recipe())


def stage2_summary(metrics: dict) -> str:
    from moe.runtime.progress import metrics_line  # `name value, ...` with 4 significant digits, not a JSON dump

    return metrics_line(
        {
            k: metrics[k]
            for k in ("routing_accuracy", "roi_loss_correct_hint", "roi_loss_wrong_hint", "val_loss_stage1", "val_loss_stage2")
            if k in metrics
        }
    )
