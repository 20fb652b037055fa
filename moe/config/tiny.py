"""Options of the embedded tiny default's own commands: `lora-moe models tiny` (a stand-in model
set) and `lora-moe data synth` (the procedural surgical-like clip set)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moe.config.file_names import OUTPUT_DIR, OVERWRITE_HELP
from moe.config.numbers import Count, Fraction, Frames, PositiveFloat, PretrainSteps, Seed, VideoSize, even_size
from moe.config.presets import Task
from moe.config.workflow import TINY_PRETRAIN_STEPS


class TinyModelsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    output_dir: Path = Field(validation_alias=OUTPUT_DIR, description="Folder to write the model set into.")
    task: Task = Field("tiny-t2v", description="tiny-t2v or tiny-i2v.")
    seed: Seed = 0
    pretrain_steps: PretrainSteps = Field(
        0,
        description=f"Pre-train both DiTs this many steps on synthetic clips of their own, as a real base is pretrained "
        f"(the demo uses {TINY_PRETRAIN_STEPS}: about 3 min on 2 cores; 0: random weights, for fast tests).",
    )
    overwrite: bool = Field(False, description=OVERWRITE_HELP)
    quiet: bool = Field(False, description="No progress bar.")


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    output_dir: Path = Field(validation_alias=OUTPUT_DIR, description="Output folder (videos/ and manifest.jsonl).")
    clips: Count = Field(16, description="Number of clips; classes are balanced.")
    frames: Frames = Field(17, description="Frames per clip (Wan likes 4k+1).")
    size: VideoSize = Field((64, 64), description="Frame size WIDTHxHEIGHT, both even.")
    seed: Seed = Field(0, description="Same seed, same clips (byte for byte).")
    fps: PositiveFloat = Field(16.0, description="Frame rate written into the MP4s.")
    val_fraction: Fraction = Field(0.2, description="Share of clips in val.")
    overwrite: bool = Field(False, description=OVERWRITE_HELP)

    @field_validator("size")
    @classmethod
    def _even(cls, v: tuple[int, int]) -> tuple[int, int]:
        return even_size(v)
