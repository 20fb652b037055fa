"""`lora-moe merge`'s options: a vanilla LoRA merged into one DiT checkpoint, in its own format."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from moe.config.file_names import OVERWRITE_HELP
from moe.config.numbers import FiniteFloat
from moe.config.presets import Task


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    dit: Path = Field(description="Base DiT: file, sharded folder, index json or shard.")
    lora_weight: Path = Field(description="Vanilla LoRA (stage-1 output).")
    save_merged_model: Path = Field(description="Output file (a folder for sharded input).")
    lora_multiplier: FiniteFloat = Field(1.0, description="Strength of the LoRA in the merged weights.")
    task: Task | None = Field(None, description="Validate the DiT against this task.")
    force: bool = Field(False, description="Merge even if this LoRA is already merged in.")
    overwrite: bool = Field(False, description=OVERWRITE_HELP)
    quiet: bool = Field(False, description="No progress bar.")
