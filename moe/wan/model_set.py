"""A Wan2.2 model set on disk, in the layouts real releases use (`moe.tiny.model_set` writes tiny ones).

    DIR/high_noise_model.safetensors   original keys (Wan release / ComfyUI style), fp32 or bf16
    DIR/low_noise_model.safetensors
    DIR/vae/ DIR/text_encoder/ DIR/tokenizer/   diffusers folders
    DIR/model_set.json                 the task, file names and how the DiTs were pre-trained

`--model_set DIR` names one folder instead of --vae, --text_encoder and --tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from moe.config.file_names import MODEL_SET_FILE
from moe.errors import MoeError


class ModelSet(BaseModel):
    task: str
    high_noise: Path
    low_noise: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    pretrain: dict | None = None  # `moe.tiny.pretrain`'s settings and losses; None: random DiTs

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
        return cls(**{k: (folder / v if k not in ("task", "pretrain") else v) for k, v in raw.items()})
