"""The stage-2 model as it is trained and evaluated: the merged DiTs with LoRA-MoE layers, the
router and the timestep gates (SPEC section 5), and its held-out variants.

`RoutedDiT` does one routed forward: set the shared routing state (gates g, sigma, w_e(sigma)),
then run the DiT that owns sigma. Stage 2 trains through it; `stage2_variants` names the ways
it is measured on the fixed held-out grid (stage 1 = the experts off; the learned router; the
label as hint; each expert forced; each expert switched off), and `stage2_metrics` gives the
numbers stage 2 writes into metrics.json. `lora-moe eval` runs the same variants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moe.config.instruments import INSTRUMENT_CLASSES
from moe.dit.dual_dit import DualDiT, Expert
from moe.dit.validation import Measurement, Sample, Variant, dit_inputs, dit_variant, measure, run_dit
from moe.lora_moe.routing import RoutingState, compute_gates


@dataclass
class RoutedDiT:
    dits: DualDiT
    router: torch.nn.Module
    timestep_gate: torch.nn.Module
    state: RoutingState
    experts: tuple[str, ...]
    top_k: int
    i2v: bool
    label_classes: tuple[str, ...] = INSTRUMENT_CLASSES  # the cache's label columns (experts match them by name)

    def router_logits(self, batch: dict, sigma: torch.Tensor) -> torch.Tensor:
        """fp32 logits [B, E] (the router never runs in bf16)."""
        image = batch.get("i2v_condition") if self.i2v else None
        return self.router(batch["text_embeds"], batch["text_mask"], sigma, image)

    def router_probs(self, batch: dict, sigma: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.router_logits(batch, sigma), dim=-1)

    def learned_gates(self, p: torch.Tensor) -> torch.Tensor:
        return compute_gates("learned", router_probs=p, top_k=self.top_k)

    def predict(self, batch: dict, sigma: torch.Tensor, noise: torch.Tensor, expert: Expert, gates: torch.Tensor):
        """(prediction, target) with the given gates [B, E]."""
        self.state.set(gates, sigma, self.timestep_gate(sigma))
        x, target = dit_inputs(batch, sigma, noise, self.i2v)
        return run_dit(self.dits.get(expert), x, sigma, batch["text_embeds"]), target

    # --- held-out measurement ---------------------------------------------------------------
    def route(self, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's (p, learned gates) for a held-out sample, kept in its memo."""
        p = self.router_probs(sample.batch, sample.sigma_t)
        sample.memo["p"], sample.memo["gates"] = p, self.learned_gates(p)
        return sample.memo["p"], sample.memo["gates"]

    def _variant(self, gates_of) -> Variant:
        def predict(sample: Sample):
            return self.predict(sample.batch, sample.sigma_t, sample.noise, sample.expert, gates_of(sample))

        return predict

    def stage2_variants(self, knockouts: bool = False) -> dict[str, Variant]:
        """stage1 (merged DiTs, experts off), stage2_learned (router, top-k), stage2_hint (the
        teacher q: the clip's own instrument(s)), stage2_hint_{e} (expert e forced) and, with
        `knockouts`, stage2_knockout_{e} (the learned gates with g_e = 0, the others unchanged:
        expert e's update removed from every layer). Needs `route` as the measurement's router."""
        v = {
            "stage1": dit_variant(self.dits, self.i2v, adapters=False),
            "stage2_learned": self._variant(lambda s: s.memo["gates"]),
            "stage2_hint": self._variant(lambda s: s.teacher),
        }
        for i, e in enumerate(self.experts):
            v[f"stage2_hint_{e}"] = self._variant(
                lambda s, i=i: compute_gates("hint", hint_index=i, batch_size=1, num_experts=len(self.experts)).to(s.noise.device)
            )
        if knockouts:
            for i, e in enumerate(self.experts):
                v[f"stage2_knockout_{e}"] = self._variant(lambda s, i=i: _without(s.memo["gates"], i))
        return v

    def measure(self, items, sigmas, seed: int = 0, knockouts: bool = False, progress: bool = False) -> Measurement:
        """All stage-2 variants on the held-out grid; each forced expert only on clips with an
        ROI (its one use is the ROI comparison of correct and wrong hints)."""
        variants = self.stage2_variants(knockouts)
        forced = [f"stage2_hint_{e}" for e in self.experts]
        return measure(
            items,
            sigmas,
            variants,
            self.dits,
            seed,
            router=self.route,
            roi_only=forced,
            experts=self.experts,
            label_classes=self.label_classes,
            progress=progress,
        )


def _without(gates: torch.Tensor, index: int) -> torch.Tensor:
    out = gates.clone()
    out[:, index] = 0.0
    return out


def stage2_metrics(m: Measurement) -> dict[str, float]:
    """The held-out numbers stage 2 writes into metrics.json (means over all (clip, sigma) pairs;
    `lora-moe eval` reports the same with intervals)."""
    correct, wrong = m.hint_losses()
    return {
        "routing_accuracy": float(m.router_hits(1).mean()),
        "roi_loss_correct_hint": float(np.nanmean(correct)) if np.isfinite(correct).any() else float("nan"),
        "roi_loss_wrong_hint": float(np.nanmean(wrong)) if np.isfinite(wrong).any() else float("nan"),
        "val_loss_stage1": m.mean("stage1"),
        "val_loss_stage2": m.mean("stage2_learned"),
    }
