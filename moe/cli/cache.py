"""`lora-moe cache`: encode a manifest's clips into the latent cache the trainers read."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moe.cli.app import app
from moe.cli.options import TASK, CheckedCommand, number
from moe.config_types import Frames


@app.command("cache", cls=CheckedCommand)
def cache(
    manifest: Annotated[Path, typer.Option("--manifest", help="Clip manifest (JSONL).")],
    out: Annotated[Path, typer.Option("--out", help="Cache folder (index.json, clips/).")],
    task: Annotated[str | None, typer.Option("--task", help="Wan task; default: the model set's.", **TASK)] = None,
    model_set: Annotated[
        Path | None, typer.Option("--model_set", help="Model-set folder (model_set.json).")
    ] = None,
    vae: Annotated[
        Path | None, typer.Option("--vae", help="diffusers vae/ folder or Wan2.1_VAE.pth.")
    ] = None,
    text_encoder: Annotated[
        Path | None,
        typer.Option(
            "--text_encoder",
            help="text_encoder/ folder or models_t5_umt5-xxl-enc-bf16.pth.",
        ),
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option("--tokenizer", help="tokenizer/ folder.")] = None,
    size: Annotated[str, typer.Option("--size", help="Bucket WIDTHxHEIGHT, multiples of 16.")] = "832x480",
    frames: Annotated[int, typer.Option("--frames", help="Frames per clip, 4k+1.", **number(Frames))] = 81,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:1 ...")] = "cpu",
    dtype: Annotated[
        str, typer.Option("--dtype", help="VAE / text encoder compute dtype: float32, bf16, fp16.")
    ] = "float32",
    embed_dtype: Annotated[
        str, typer.Option("--embed_dtype", help="Stored text embeddings: float32 or bf16.")
    ] = "float32",
    label_map: Annotated[
        Path | None,
        typer.Option("--label_map", help="JSON object: raw label -> expert class."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Rebuild a cache made with other settings (one made with the same is updated in place).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Encode VAE latents, text embeddings, I2V conditioning, ROI masks and labels per clip;
    clips whose inputs did not change since the last run are skipped."""
    from moe.cli.data import parse_size
    from moe.data.cache import build_cache
    from moe.data.manifest import LabelMap
    from moe.devices import resolve_dtype

    index = build_cache(
        manifest,
        out,
        task,
        vae,
        text_encoder,
        tokenizer,
        model_set=model_set,
        size=parse_size(size),
        frames=frames,
        device=device,
        dtype=resolve_dtype(dtype, "--dtype", ("float32", "bf16", "fp16")),
        embed_dtype=resolve_dtype(embed_dtype, "--embed_dtype", ("float32", "bf16")),
        label_map=LabelMap.from_json_file(label_map) if label_map else None,
        progress=not quiet,
        overwrite=overwrite,
    )
    typer.echo(f"cache {out}: {len(index.clips)} {index.task} clips ({index.report.summary()})")
