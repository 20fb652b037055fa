"""Options of the commands over LoRA files: `export-expert`, `convert-lora`, `inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from moe.config.file_names import OVERWRITE_HELP
from moe.config.numbers import FiniteFloat, Fraction


class ExportExpertConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    lora_moe_weights: Path = Field(description="Stage-2 LoRA-MoE file.")
    expert: str = Field(description="scissors, hook, suction or other.")
    out: Path = Field(description="Output vanilla LoRA file.")
    bake_sigma: Fraction = Field(0.0, description="Bake the timestep gate w_e(sigma) in at this sigma (0: full strength).")
    bake: bool = Field(True, description="Bake the timestep gate in (--no_bake: w = 1).")
    alpha_expert: FiniteFloat = Field(1.0, description="Strength of the expert.")
    save_format: Literal["diffusers", "musubi", "default", "peft"] = Field("diffusers", description="diffusers (= default), musubi or peft.")
    musubi_copy: bool = Field(False, description="Also write OUT_musubi.safetensors (musubi-tuner's form).")
    overwrite: bool = Field(False, description=OVERWRITE_HELP)


class ConvertLoRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    src: Path = Field(description="A vanilla LoRA in any form lora-moe reads.", json_schema_extra={"argument": "IN"})
    to: Literal["default", "musubi", "peft"] = Field(
        description="default (diffusers, ComfyUI), musubi (musubi-tuner, ComfyUI) or peft (diffusers' own)."
    )
    out: Path = Field(description="Output .safetensors file (a new path).")
    overwrite: bool = Field(False, description=OVERWRITE_HELP)


class InspectConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="A .safetensors file or checkpoint folder.", json_schema_extra={"argument": "PATH"})
