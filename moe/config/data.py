"""Options of `lora-moe data cholec80` and `data check` (`data synth`'s are in `moe.config.tiny`)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moe.config.file_names import OUTPUT_DIR, OVERWRITE_HELP
from moe.config.numbers import Fraction, Frames, PositiveFloat, Seed, VideoSize, even_size


class Cholec80Config(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    root: Path = Field(description="Cholec80 folder (videos/, tool_annotations/).")
    output_dir: Path = Field(validation_alias=OUTPUT_DIR, description="Output folder (clips/ and manifest.jsonl).")
    frames_per_clip: Frames = Field(81, description="Frames per clip (4k+1).")
    clip_seconds: PositiveFloat | None = Field(None, description="Source seconds per clip (default: frames / 16).")
    stride_seconds: PositiveFloat | None = Field(None, description="Seconds from clip start to start (default: clip length).")
    size: VideoSize | None = Field(None, description="Rescale to WIDTHxHEIGHT, e.g. 832x480.")
    videos: str | None = Field(None, description="Comma-separated ids, e.g. video01,video02.")
    label_map: Path | None = Field(None, description="JSON object: Cholec80 tool -> expert class.")
    min_presence: Fraction = Field(0.5, description="Share of a clip's frames a tool must be in.")
    val_fraction: Fraction = Field(0.2, description="Share of videos in val.")
    seed: Seed = Field(0, description="Seed of the train/val split.")
    overwrite: bool = Field(False, description=OVERWRITE_HELP)

    @field_validator("size")
    @classmethod
    def _even(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        return None if v is None else even_size(v)


class DataCheckConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    manifest: Path = Field(description="Clip manifest (JSONL).")
    min_frames: Frames = Field(81, description="Frames each clip needs (4k+1).")
