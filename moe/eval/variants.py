"""The model variants `lora-moe eval` compares, each on the same held-out clips, sigmas and noise
(`moe.dit.validation.measure`):

    base                 the base DiTs (when --dit / --dit_high_noise are given)
    stage1               the merged DiTs: base + stage-1 LoRA, folded in
    stage2_learned       + the LoRA-MoE experts, gated by the learned router (top-k)
    stage2_hint          + the experts, gated by the clip's labels (the teacher q: one-hot for a
                         clip with one instrument)
    stage2_hint_{e}      expert e forced (for the correct- vs wrong-hint comparison)
    stage2_knockout_{e}  the learned gates with expert e switched off

The base DiTs are loaded, measured (and their clips generated) and released before the merged
ones are loaded, so at most one pair of DiTs is in memory (and, with offloading, one DiT on the
accelerator).
"""

from __future__ import annotations

import gc

import numpy as np
import torch

from moe.dit.dual_dit import DualDiT
from moe.dit.routed_dit import RoutedDiT
from moe.dit.validation import Measurement, dit_variant, measure
from moe.lora_moe.model import attach_lora_moe_file

MAIN_VARIANTS = {
    "base": "base DiTs",
    "stage1": "merged DiTs (stage 1)",
    "stage2_learned": "stage 2, learned router",
    "stage2_hint": "stage 2, label as hint",
}


def held_out_teacher(items: list[dict], experts: tuple[str, ...]) -> np.ndarray:
    """The teacher distribution [N, E] of the held-out clips, as `measure` computes it (known
    before any DiT is loaded, so the generated clips' prompts can be picked first)."""
    from moe.config.instruments import INSTRUMENT_CLASSES
    from moe.lora_moe.routing import labels_by_name, teacher_distribution

    labels = torch.stack([item["labels"] for item in items]).float()
    return teacher_distribution(labels_by_name(labels, INSTRUMENT_CLASSES, experts), experts).numpy()


def load_dits(cfg, preset, low, high) -> DualDiT:
    """Two DiTs (or one) in cfg's dtype; both on the accelerator when they fit, else only the
    active one (training's `auto` placement)."""
    return DualDiT.load(
        preset,
        low,
        high,
        preset.boundary,
        getattr(torch, cfg.dtype),
        cfg.device,
        placement="auto",
        fp8=cfg.fp8,
        blocks_to_swap=cfg.blocks_to_swap,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        attention_backend=cfg.attention_backend,
    )


def release(dits: DualDiT) -> None:
    dits.models.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_stage2(cfg, preset, moe_file) -> RoutedDiT:
    """The merged DiTs with the LoRA-MoE file's experts, router and timestep gates."""
    dits = load_dits(cfg, preset, cfg.merged_dit, cfg.merged_dit_high_noise)
    moe = attach_lora_moe_file(list(dits), moe_file, preset.dit.num_layers, cfg.device)
    return RoutedDiT(dits, moe.router, moe.timestep_gate, moe.state, moe_file.experts, moe_file.router_config.top_k, preset.i2v)


def measure_variants(cfg, preset, moe_file, items: list[dict], with_base=None) -> tuple[Measurement, RoutedDiT]:
    """Every variant on the held-out grid; returns the measurement and the loaded stage-2 model
    (kept for the generated clips). `with_base(dits)`, when given, runs on the base DiTs after
    their measurement and before their release (the base variant's generated clips)."""
    base = None
    if cfg.dit is not None:
        dits = load_dits(cfg, preset, cfg.dit, cfg.dit_high_noise)
        base = measure(items, cfg.sigmas, {"base": dit_variant(dits, preset.i2v)}, dits, cfg.seed, experts=moe_file.experts, progress=cfg.progress)
        if with_base is not None:
            with_base(dits)
        release(dits)
    model = load_stage2(cfg, preset, moe_file)
    m = model.measure(items, cfg.sigmas, cfg.seed, knockouts=True, progress=cfg.progress)
    if base is not None:
        m.losses = {"base": base.losses["base"]} | m.losses
    return m, model
