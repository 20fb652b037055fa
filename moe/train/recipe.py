"""The one sequence both training stages repeat, read top to bottom (torchtune's recipe shape):

    check the inputs -> open the dataset once -> claim the run folder -> accelerator -> seed
      -> load the DiTs -> build the stage's module -> train (`moe.train.loop`) -> save its weights

A stage says only what differs (`StageRecipe`): its extra checks, the module it trains on the
loaded DiTs, and the weights file it writes. `lora-moe stage1` and `stage2` are
`run_stage(cfg, Stage1Recipe())` and `run_stage(cfg, Stage2Recipe())`.
"""

from __future__ import annotations

import torch

from moe.config.train import TrainConfig
from moe.data.cache_index import CacheIndex
from moe.dit.dual_dit import DualDiT
from moe.train.loop import TrainingModule, check_dits, load_dits, make_accelerator, open_dataset, run_training
from moe.train.run_dir import claim_run_dir
from moe.train.sampling import TrainingSampler


class StageRecipe:
    """What one stage adds to the shared sequence."""

    name: str  # the run's name: logs, `NAME_config.json`, the output folder's owner
    weights_file: str  # what the run writes into --output_dir

    def check_inputs(self, cfg: TrainConfig) -> None:
        """Checks before anything is read (stage 2: the merged DiTs' provenance)."""

    def check_dataset(self, cfg: TrainConfig, index: CacheIndex) -> list:
        """Checks against the opened cache; returns the --sample_prompts lines (checked)."""
        raise NotImplementedError

    def build_module(self, cfg: TrainConfig, dits: DualDiT, index: CacheIndex) -> TrainingModule:
        raise NotImplementedError

    def save(self, cfg: TrainConfig, module: TrainingModule) -> None:
        """Write the weights file (main process only)."""
        module.save_weights(cfg.output_dir / self.weights_file)


def run_stage(cfg: TrainConfig, recipe: StageRecipe) -> dict:
    """Train one stage; returns the metrics written to metrics.json (empty on other processes)."""
    recipe.check_inputs(cfg)
    check_dits(cfg)
    index = open_dataset(cfg)
    prompts = recipe.check_dataset(cfg, index)  # --sample_prompts too, before any loading
    with claim_run_dir(cfg, recipe.name, recipe.weights_file):
        accelerator = make_accelerator(cfg)
        sampler = TrainingSampler.prepare(cfg, accelerator, prompts)  # prompt embeddings, before the DiTs load
        torch.manual_seed(cfg.seed)  # adapter (and router) initialisation
        module = recipe.build_module(cfg, load_dits(cfg, accelerator), index)
        metrics = run_training(cfg, module, accelerator, index, run_name=recipe.name, sampler=sampler)
        if accelerator.is_main_process:
            recipe.save(cfg, module)
    return metrics
