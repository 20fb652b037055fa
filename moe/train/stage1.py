"""Stage 1 (SPEC sections 2, 3, 6): one vanilla LoRA trained across both Wan2.2 experts.

    loss = ROI-weighted flow-matching MSE of DiT_expert(sigma)(x_sigma) against eps - x0

The same adapters are injected into the high- and low-noise DiTs, so whichever expert owns a
micro-batch's sigma, the one LoRA learns. Output: `vanilla_lora.safetensors` (SPEC section 3),
`checkpoint-epoch-N.safetensors`, resumable state, logs and `metrics.json` with `val_loss_base`
(LoRA off) and `val_loss_final` (LoRA on) on held-out clips.
"""

from __future__ import annotations

from pathlib import Path

import torch

from moe.config.file_names import VANILLA_LORA_FILE
from moe.config.train import Stage1Config
from moe.dit.dual_dit import DualDiT, Expert
from moe.dit.flow_matching import per_sample_loss, roi_weights
from moe.dit.validation import dit_inputs, dit_variant, measure, run_dit
from moe.lora.convert import write_musubi_copy
from moe.lora.file import LoRAModuleWeights, write_lora_file
from moe.lora.inject import adapter_items, build_adapters, inject_lora
from moe.train.loop import TrainingModule
from moe.train.recipe import StageRecipe, run_stage
from moe.train.sampling import check_sampling


class Stage1Module(TrainingModule):
    def __init__(self, cfg: Stage1Config, dits: DualDiT):
        super().__init__()
        self.cfg = cfg
        self.dits = dits
        self.spec = cfg.target_spec()
        modules = self.spec.resolve(cfg.preset.dit.num_layers)
        self.adapters = build_adapters(dits.models["low"], modules, self.spec.alpha)
        for dit in dits:
            inject_lora(dit, self.adapters)

    def predict(self, batch: dict, sigma: torch.Tensor, noise: torch.Tensor, expert: Expert):
        x, target = dit_inputs(batch, sigma, noise, self.cfg.preset.i2v)
        return run_dit(self.dits.get(expert), x, sigma, batch["text_embeds"]), target

    def forward(self, batch, sigma, noise, expert):
        pred, target = self.predict(batch, sigma, noise, expert)
        weights = roi_weights(batch["roi"], self.cfg.roi_weight) if self.cfg.roi_weight != 1 else None
        return {"loss": per_sample_loss(pred, target, weights).mean()}

    def lora_weights(self) -> dict[str, LoRAModuleWeights]:
        return {
            m: LoRAModuleWeights(down=a.lora_down.detach().float().cpu(), up=a.lora_up.detach().float().cpu(), alpha=a.alpha)
            for m, a in adapter_items(self.adapters)
        }

    def save_weights(self, path: Path) -> None:
        write_lora_file(path, self.lora_weights(), self.spec, self.cfg.task, save_format=self.cfg.save_format)

    @torch.no_grad()
    def evaluate(self, items, cfg):
        variants = {
            "base": dit_variant(self.dits, self.cfg.preset.i2v, adapters=False),
            "final": dit_variant(self.dits, self.cfg.preset.i2v, adapters=True),
        }
        m = measure(items, cfg.val_sigmas, variants, self.dits, cfg.seed)
        return {
            "val_loss_base": m.mean("base"),
            "val_loss_final": m.mean("final"),
            "val_loss_base_by_sigma": {str(s): v for s, v in m.mean_by_sigma("base").items()},
            "val_loss_final_by_sigma": {str(s): v for s, v in m.mean_by_sigma("final").items()},
        }


class Stage1Recipe(StageRecipe):
    name, weights_file = "stage1", VANILLA_LORA_FILE

    def check_dataset(self, cfg: Stage1Config, index) -> list:
        return check_sampling(cfg, index.settings.size, index.settings.frames)

    def build_module(self, cfg: Stage1Config, dits: DualDiT, index) -> Stage1Module:
        return Stage1Module(cfg, dits)

    def save(self, cfg: Stage1Config, module: Stage1Module) -> None:
        super().save(cfg, module)
        if cfg.musubi_copy:
            write_musubi_copy(cfg.output_dir / VANILLA_LORA_FILE, overwrite=True)  # inside our run folder


def train_stage1(cfg: Stage1Config) -> dict:
    """Train the stage-1 LoRA; writes `vanilla_lora.safetensors` into `cfg.output_dir`."""
    return run_stage(cfg, Stage1Recipe())
