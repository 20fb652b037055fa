"""`lora-moe generate`'s options: a stage-1 or stage-2 video from DiTs, an adapter and prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from moe.config.numbers import Frames, Seed, VideoSize
from moe.config.presets import Task
from moe.config.runtime_options import DiTRuntimeOptions

# The fields that name files generation reads: --save_path may be none of them.
INPUT_FIELDS = ("dit", "dit_high_noise", "lora_weight", "lora_moe_weights", "model_set", "vae", "text_encoder", "tokenizer", "image")
MODEL_FIELDS = ("dit", "dit_high_noise", "lora_weight", "lora_moe_weights", "model_set", "vae", "text_encoder", "tokenizer")  # --model's


class GenerateConfig(DiTRuntimeOptions):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # no nan/inf in any float option

    task: Task = "tiny-t2v"
    model: str | None = Field(
        None,
        description="A registered model, models:/NAME@ALIAS or models:/NAME/VERSION: its DiTs, LoRA-MoE and "
        "components are fetched (sha256 verified) instead of --dit/--lora_moe_weights/--model_set.",
    )
    dit: Path | None = Field(None, description="Low-noise DiT (base for --lora_weight, merged for --lora_moe_weights).")
    dit_high_noise: Path | None = Field(None, description="High-noise DiT (A14B tasks).")
    lora_weight: Path | None = Field(None, description="Stage 1: a vanilla LoRA applied to both DiTs.")
    lora_multiplier: float = 1.0
    lora_moe_weights: Path | None = Field(None, description="Stage 2: a LoRA-MoE file.")
    instrument_hint: str | None = Field(None, description="Force one expert (scissors, hook, suction, other).")
    alpha_expert: float = Field(1.0, description="Strength of the expert mixture.")
    alpha_base: float | None = Field(None, description="Accepted and ignored: there is no base_lora.")
    routing_beta: float = Field(0.5, ge=0, lt=1, description="Gate smoothing across sampling steps.")
    model_set: Path | None = Field(None, description="Folder with vae/, text_encoder/, tokenizer/.")
    vae: Path | None = None
    text_encoder: Path | None = None
    tokenizer: Path | None = None
    prompt: str = Field(description="What to generate.")
    negative_prompt: str = ""
    image: Path | None = Field(None, description="First frame (I2V tasks).")
    video_size: VideoSize = Field((64, 64), description="WIDTHxHEIGHT (multiples of 16).")
    video_length: Frames = Field(17, description="Frames, 4k+1.")
    infer_steps: int = Field(20, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100, description="CFG for the low-noise DiT (default: the task's).")
    guidance_scale_high_noise: float | None = Field(None, ge=0, le=100, description="CFG for the high-noise DiT.")
    flow_shift: float | None = Field(None, gt=0, le=100, description="Sampling shift (default: the task's).")
    seed: Seed = 0
    fps: float = Field(16.0, gt=0, le=240)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = Field("float32", description="float32, bfloat16 or float16.")
    save_path: Path = Field(description="Output MP4.")
    overwrite: bool = Field(False, description="Replace an existing MP4 that lora-moe wrote at --save_path.")

    @model_validator(mode="after")
    def _one_adapter(self) -> GenerateConfig:
        if self.model is not None:
            given = [f"--{name}" for name in MODEL_FIELDS if getattr(self, name) is not None]
            if given:
                raise ValueError(f"--model supplies the DiTs, the LoRA-MoE and the components: drop {', '.join(given)}")
            return self
        if self.dit is None:
            raise ValueError("pass --dit (and --dit_high_noise) with an adapter, or a registered model as --model models:/NAME@ALIAS")
        if self.lora_weight is not None and self.lora_moe_weights is not None:
            raise ValueError("pass either --lora_weight (stage 1) or --lora_moe_weights (stage 2), not both")
        if self.instrument_hint is not None and self.lora_moe_weights is None:
            raise ValueError("--instrument_hint needs --lora_moe_weights")
        return self
