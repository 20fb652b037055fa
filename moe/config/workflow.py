"""The one-process workflow's settings (`lora-moe workflow run`) and the options it gives each
stage: the Prefect flow's tiny preset uses the same functions, so both paths train the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from moe.config.file_names import OVERWRITE_HELP
from moe.config.numbers import Count, Frames, PositiveFloat, PretrainSteps, Seed, VideoSize
from moe.errors import MoeError

STAGES = ("data", "cache", "stage1", "merge", "stage2", "eval")
Stage = Literal["data", "cache", "stage1", "merge", "stage2", "eval"]
TINY_PRESETS = {"tiny": "tiny-t2v", "tiny-t2v": "tiny-t2v", "tiny-i2v": "tiny-i2v"}
# Pre-training steps per expert of the tiny base DiTs (`moe.tiny.pretrain`): the default of
# this workflow and of the Prefect flow's `models.tiny_pretrain_steps`: about 2-3 min per expert on
# one CPU thread, which the suction caption and hint need to draw the (blue) suction cannula in
# the demo's samples; 300 steps do not. (`lora-moe models tiny` defaults to 0: random, fast.)
TINY_PRETRAIN_STEPS = 1000


class WorkflowConfig(BaseModel):
    """`lora-moe workflow run`: every stage in one process, on the embedded tiny default."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    output_dir: Path = Field(description="Folder for every artifact.")
    preset: str = Field("tiny", description="tiny (= tiny-t2v) or tiny-i2v.")
    until: Stage = Field("eval", description="Stop after: data, cache, stage1, merge, stage2, eval.")
    seed: Seed = 0
    overwrite: bool = Field(False, description=OVERWRITE_HELP)
    pretrain_steps: PretrainSteps = Field(
        TINY_PRETRAIN_STEPS,
        description="Pre-train each tiny base DiT this many steps on synthetic clips of its own, as a real base is "
        "pretrained (about 5 min; 0: random DiTs, fast, but they draw no instrument).",
    )
    # Sized so the tiny run learns visibly (stage 1) and the experts specialise (stage 2) in about
    # a minute on 2 CPU cores; tiny models take far higher learning rates than real ones. The
    # ranks are the reference workflow's (q 8, k/v/o 4, ffn.0 4: the configs' defaults).
    clips: Count = Field(64, description="Synthetic clips.")
    frames: Frames = Field(17, description="Frames per clip.")
    size: VideoSize = Field((64, 64), description="Frame size WIDTHxHEIGHT.")
    stage1_epochs: Count = 40
    stage1_learning_rate: PositiveFloat = 1e-2
    stage2_epochs: Count = 40
    stage2_learning_rate: PositiveFloat = 1e-2
    eval_samples: Annotated[int, Field(ge=0, le=100)] = Field(1, description="Held-out prompts per expert in the report's sample videos.")
    eval_sample_steps: Annotated[int, Field(ge=1, le=1000)] = 10
    quiet: bool = Field(False, description="No progress bars.")

    @property
    def progress(self) -> bool:
        return not self.quiet

    @property
    def task(self) -> str:
        try:
            return TINY_PRESETS[self.preset]
        except KeyError:
            raise MoeError(
                f"unknown --preset {self.preset!r}: the one-command workflow runs the tiny presets "
                f"({', '.join(TINY_PRESETS)}); for real Wan2.2 weights run the stage commands (see README)"
            ) from None


def stage1_options(cfg: WorkflowConfig) -> dict:
    """The stage-1 options this workflow sets (besides paths); the Prefect flow's tiny preset
    uses the same, so both paths train the same way."""
    return {
        "learning_rate": cfg.stage1_learning_rate,
        "max_train_epochs": cfg.stage1_epochs,
        "save_every_n_epochs": cfg.stage1_epochs,
        "seed": cfg.seed,
    }


def stage2_options(cfg: WorkflowConfig) -> dict:
    """The stage-2 options this workflow sets besides paths and stage 1's target flags."""
    return {
        "learning_rate": cfg.stage2_learning_rate,
        "max_train_epochs": cfg.stage2_epochs,
        "save_every_n_epochs": cfg.stage2_epochs,
    }


# Generated clips per variant for FVD/FID and instrument accuracy on the tiny models: one prompt
# per instrument class (each hint once) and one Inception frame per clip; together they add about
# 40-50 s to the eval on 2 CPU cores (I3D features of 4 + 4 x 4 clips are most of it).
TINY_EVAL_METRIC_CLIPS = 4
TINY_EVAL_FID_FRAMES = 1


def eval_options(cfg: WorkflowConfig) -> dict:
    """The `lora-moe eval` options this workflow sets besides paths."""
    return {
        "samples": cfg.eval_samples,
        "sample_steps": cfg.eval_sample_steps,
        "metric_clips": TINY_EVAL_METRIC_CLIPS,
        "fid_frames": TINY_EVAL_FID_FRAMES,
        "seed": cfg.seed,
    }
