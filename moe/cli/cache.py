"""`lora-moe cache`: encode a manifest's clips into the latent cache the trainers read."""

from __future__ import annotations

import typer

from moe.cli.app import app
from moe.cli.config_command import config_command
from moe.config.cache import CacheConfig


def _run_cache(cfg: CacheConfig) -> None:
    from moe.data.cache import build_cache
    from moe.data.manifest import LabelMap
    from moe.runtime.devices import resolve_dtype

    index = build_cache(
        cfg.manifest,
        cfg.output_dir,
        cfg.task,
        cfg.vae,
        cfg.text_encoder,
        cfg.tokenizer,
        model_set=cfg.model_set,
        size=cfg.size,
        frames=cfg.frames,
        device=cfg.device,
        dtype=resolve_dtype(cfg.dtype, "--dtype", ("float32", "bf16", "fp16")),
        embed_dtype=resolve_dtype(cfg.embed_dtype, "--embed_dtype", ("float32", "bf16")),
        label_map=LabelMap.from_json_file(cfg.label_map) if cfg.label_map else None,
        progress=not cfg.quiet,
        overwrite=cfg.overwrite,
    )
    typer.echo(f"cache {cfg.output_dir}: {len(index.clips)} {index.task} clips ({index.report.summary()})")


config_command(
    app,
    "cache",
    CacheConfig,
    _run_cache,
    help="Encode VAE latents, text embeddings, I2V conditioning, ROI masks and labels per clip; clips whose inputs "
    "did not change since the last run are skipped.",
)
