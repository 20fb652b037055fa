"""`lora-moe cache`'s options: encode a manifest's clips into the latent cache the trainers read."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moe.config.file_names import OUTPUT_DIR
from moe.config.numbers import Frames, VideoSize, even_size
from moe.config.presets import Task


class CacheConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    manifest: Path = Field(description="Clip manifest (JSONL).")
    output_dir: Path = Field(validation_alias=OUTPUT_DIR, description="Cache folder (index.json, clips/).")
    task: Task | None = Field(None, description="Wan task; default: the model set's.")
    model_set: Path | None = Field(None, description="Model-set folder (model_set.json).")
    vae: Path | None = Field(None, description="diffusers vae/ folder or Wan2.1_VAE.pth.")
    text_encoder: Path | None = Field(None, description="text_encoder/ folder or models_t5_umt5-xxl-enc-bf16.pth.")
    tokenizer: Path | None = Field(None, description="tokenizer/ folder.")
    size: VideoSize = Field((832, 480), description="Bucket WIDTHxHEIGHT, multiples of 16.")
    frames: Frames = Field(81, description="Frames per clip, 4k+1.")
    device: str = Field("cpu", description="cpu, cuda, cuda:1 ...")
    dtype: str = Field("float32", description="VAE / text encoder compute dtype: float32, bf16, fp16.")
    embed_dtype: str = Field("float32", description="Stored text embeddings: float32 or bf16.")
    label_map: Path | None = Field(None, description="JSON object: raw label -> expert class.")
    overwrite: bool = Field(False, description="Rebuild a cache made with other settings (one made with the same is updated in place).")
    quiet: bool = Field(False, description="No progress bar.")

    @field_validator("size")
    @classmethod
    def _even(cls, v: tuple[int, int]) -> tuple[int, int]:
        return even_size(v)
