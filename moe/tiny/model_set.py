"""`lora-moe models tiny`: a complete tiny Wan2.2 model set (both experts, VAE, text encoder,
tokenizer) in the layouts real releases use; demos and tests use it as stand-in checkpoints,
nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from moe.config.file_names import MODEL_SET_FILE
from moe.config.numbers import Seed, checked
from moe.config.presets import get_preset
from moe.errors import MoeError
from moe.files.atomic import write_json_atomic
from moe.files.output_paths import claim_output
from moe.wan.checkpoint import build_random_transformer, transformer_state_dict, write_checkpoint
from moe.wan.model_set import ModelSet


def _surgical_calibration_videos(seed: int) -> torch.Tensor:
    """Eight clips of the synthetic surgical set ([8, 3, 9, 64, 64] in [-1, 1]): the tiny VAE's
    latent statistics are calibrated on the domain this stand-in model set serves."""
    from moe.tiny.synth import plan_dataset, render_clip

    clips = [render_clip(plan).frames for plan in plan_dataset(8, 9, (64, 64), seed=10_000 + seed)]
    return torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0


def write_tiny_model_set(
    out: str | Path,
    task: str = "tiny-t2v",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
    pretrain_steps: int = 0,
    progress: bool = False,
) -> ModelSet:
    """Tiny DiTs (two experts, different seeds) plus VAE, text encoder and tokenizer; the VAE's
    latent statistics are calibrated on synthetic surgical clips. With `pretrain_steps` > 0 both
    DiTs are then pre-trained on synthetic clips of their own (`moe.tiny.pretrain`, in fp32,
    then cast to `dtype`), so the stand-in base can draw the instruments as a real pretrained
    Wan2.2 can; 0 keeps the random weights. An existing `out` is replaced only with `overwrite`,
    and only when it is a model set."""
    from moe.tiny.components import save_components
    from moe.tiny.pretrain import PretrainConfig, PretrainSteps

    preset = get_preset(task)
    if not preset.tiny:
        raise MoeError(f"{task} is a full-size task; `models tiny` makes only tiny-t2v or tiny-i2v sets")
    out = Path(out)
    checked(Seed, seed, "--seed")
    pretrain = PretrainConfig(steps=checked(PretrainSteps, pretrain_steps, "--pretrain_steps"), seed=seed)
    with claim_output(out, flag="--output_dir", overwrite=overwrite, is_ours=lambda p: (p / MODEL_SET_FILE).is_file(), folder=True):
        paths = save_components(out, preset, seed, calibration=_surgical_calibration_videos(seed))
        experts = {
            "high_noise": build_random_transformer(preset, seed, torch.float32 if pretrain.steps else dtype),
            "low_noise": build_random_transformer(preset, seed + 1, torch.float32 if pretrain.steps else dtype),
        }
        record = None
        if pretrain.steps:
            record = _pretrain(experts, preset, pretrain, paths, progress)
        for name, model in experts.items():
            for p in model.parameters():  # as build_random_transformer casts (a no-op without pre-training)
                p.data = p.data.to(dtype)
            write_checkpoint(transformer_state_dict(model), out / f"{name}_model.safetensors", metadata={"lora_moe.task": task})
        files = {
            "task": task,
            "high_noise": "high_noise_model.safetensors",
            "low_noise": "low_noise_model.safetensors",
            "vae": "vae",
            "text_encoder": "text_encoder",
            "tokenizer": "tokenizer",
        }
        if record is not None:
            files["pretrain"] = record
        write_json_atomic(out / MODEL_SET_FILE, files)
    return ModelSet.load(out)


def _pretrain(experts: dict, preset, cfg, paths: dict[str, Path], progress: bool) -> dict:
    """Pre-train the DiTs with the components just written, loaded as the latent cache loads
    them; returns what `model_set.json` records about it."""
    from moe.tiny.pretrain import PRETRAIN_DATA_SEED, pretrain_experts
    from moe.wan.component_loaders import load_text_encoder, load_tokenizer, load_vae, tiny_vae_kwargs

    components = (
        load_vae(paths["vae"], config=tiny_vae_kwargs(preset)),
        load_text_encoder(paths["text_encoder"]),
        load_tokenizer(paths["tokenizer"]),
    )
    losses = pretrain_experts(experts, preset, cfg, components, progress=progress)
    return cfg.model_dump(mode="json") | {"data_seed": PRETRAIN_DATA_SEED + cfg.seed, "losses": losses}
