"""A complete (tiny) Wan2.2 model set on disk, in the layouts real releases use.

    DIR/high_noise_model.safetensors   original keys (Wan release / ComfyUI style), fp32 or bf16
    DIR/low_noise_model.safetensors
    DIR/vae/ DIR/text_encoder/ DIR/tokenizer/   diffusers folders
    DIR/model_set.json                 the task and file names

Demos and tests use it as stand-in "checkpoints"; nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel

from moe.atomic import write_json_atomic
from moe.config_types import Seed, checked
from moe.errors import MoeError
from moe.file_names import MODEL_SET_FILE
from moe.output_paths import claim_output
from moe.wan.checkpoint import (
    build_random_transformer,
    transformer_state_dict,
    write_checkpoint,
)
from moe.wan.presets import get_preset


class ModelSet(BaseModel):
    task: str
    high_noise: Path
    low_noise: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path

    @classmethod
    def load(cls, folder: str | Path) -> ModelSet:
        folder = Path(folder)
        if folder.is_file():
            raise MoeError(f"{folder} is a file; a model set is a folder holding {MODEL_SET_FILE}")
        try:
            raw = json.loads((folder / MODEL_SET_FILE).read_text())
        except FileNotFoundError:
            raise MoeError(f"{folder} is not a model set (no {MODEL_SET_FILE}); make one with `lora-moe models tiny`") from None
        except (OSError, ValueError) as e:
            raise MoeError(f"cannot read {folder / MODEL_SET_FILE}: {e}") from None
        return cls(**{k: (folder / v if k != "task" else v) for k, v in raw.items()})


def _surgical_calibration_videos(seed: int) -> torch.Tensor:
    """Eight clips of the synthetic surgical set ([8, 3, 9, 64, 64] in [-1, 1]): the tiny VAE's
    latent statistics are calibrated on the domain this stand-in model set serves."""
    from moe.data.synth import plan_dataset, render_clip

    clips = [render_clip(plan).frames for plan in plan_dataset(8, 9, (64, 64), seed=10_000 + seed)]
    return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def write_tiny_model_set(
    out: str | Path, task: str = "tiny-t2v", seed: int = 0, dtype: torch.dtype = torch.float32, overwrite: bool = False
) -> ModelSet:
    """Random-initialised tiny DiTs (two experts, different seeds) plus VAE, text encoder and
    tokenizer; the VAE's latent statistics are calibrated on synthetic surgical clips. An
    existing `out` is replaced only with `overwrite`, and only when it is a model set."""
    from moe.wan.tiny_components import save_components

    preset = get_preset(task)
    if not preset.tiny:
        raise MoeError(f"{task} is a full-size task; `models tiny` makes only tiny-t2v or tiny-i2v sets")
    out = Path(out)
    checked(Seed, seed, "--seed")
    with claim_output(out, flag="--out", overwrite=overwrite, is_ours=lambda p: (p / MODEL_SET_FILE).is_file(), folder=True):
        for name, expert_seed in (("high_noise_model", seed), ("low_noise_model", seed + 1)):
            model = build_random_transformer(preset, expert_seed, dtype)
            write_checkpoint(transformer_state_dict(model), out / f"{name}.safetensors", metadata={"lora_moe.task": task})
        save_components(out, preset, seed, calibration=_surgical_calibration_videos(seed))
        files = {
            "task": task,
            "high_noise": "high_noise_model.safetensors",
            "low_noise": "low_noise_model.safetensors",
            "vae": "vae",
            "text_encoder": "text_encoder",
            "tokenizer": "tokenizer",
        }
        write_json_atomic(out / MODEL_SET_FILE, files)
    return ModelSet.load(out)
