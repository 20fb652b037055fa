"""`lora-moe data ...`: build clip data sets (the synthetic set, a Cholec80 import)."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from moe.cli.app import app
from moe.cli.config_command import config_command
from moe.cli.options import CheckedCommand, number
from moe.config.file_names import OVERWRITE_HELP
from moe.config.numbers import MAX_SIDE, Fraction, Frames, PositiveFloat, Seed
from moe.config.tiny import SynthConfig
from moe.data.manifest import LabelMap, read_manifest, summarize
from moe.errors import MoeError

data_app = typer.Typer(
    help="Build clip data sets: a synthetic surgical-like set, or clips cut from Cholec80.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (width, height); both even, as H.264 (yuv420p) requires, and at most MAX_SIDE."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise MoeError(f"--size must look like WIDTHxHEIGHT (e.g. 832x480), got {text!r}")
    width, height = int(match[1]), int(match[2])
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise MoeError(f"--size needs an even width and height (H.264 yuv420p), got {width}x{height}")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise MoeError(f"--size is at most {MAX_SIDE}x{MAX_SIDE}, got {width}x{height}")
    return width, height


def _report(manifest: Path) -> None:
    typer.echo(str(manifest))
    typer.echo(summarize(read_manifest(manifest)))


def _run_synth(cfg: SynthConfig) -> None:
    from moe.tiny.synth import synthesize_dataset

    manifest = synthesize_dataset(
        cfg.output_dir,
        clips=cfg.clips,
        frames=cfg.frames,
        size=cfg.size,
        seed=cfg.seed,
        fps=cfg.fps,
        val_fraction=cfg.val_fraction,
        progress=True,
        overwrite=cfg.overwrite,
    )
    _report(manifest)


config_command(data_app, "synth", SynthConfig, _run_synth, help="Write a procedural surgical-like clip set with exact tip boxes and captions.")


@data_app.command("cholec80", cls=CheckedCommand)
def cholec80(
    root: Path = typer.Option(..., "--root", help="Cholec80 folder (videos/, tool_annotations/)."),
    output_dir: Path = typer.Option(..., "--output_dir", "--out", help="Output folder (clips/ and manifest.jsonl)."),
    frames_per_clip: int = typer.Option(81, "--frames_per_clip", **number(Frames)),
    clip_seconds: float | None = typer.Option(
        None,
        "--clip_seconds",
        help="Source seconds per clip (default: frames / 16).",
        **number(PositiveFloat),
    ),
    stride_seconds: float | None = typer.Option(
        None,
        "--stride_seconds",
        help="Seconds from clip start to start (default: clip length).",
        **number(PositiveFloat),
    ),
    size: str | None = typer.Option(None, "--size", help="Rescale to WIDTHxHEIGHT, e.g. 832x480."),
    videos: str | None = typer.Option(None, "--videos", help="Comma-separated ids, e.g. video01,video02."),
    label_map: Path | None = typer.Option(None, "--label_map", help="JSON object: Cholec80 tool -> expert class."),
    min_presence: float = typer.Option(0.5, "--min_presence", help="Share of a clip's frames a tool must be in.", **number(Fraction)),
    val_fraction: float = typer.Option(0.2, "--val_fraction", help="Share of videos in val.", **number(Fraction)),
    seed: int = typer.Option(0, "--seed", help="Seed of the train/val split.", **number(Seed)),
    overwrite: bool = typer.Option(False, "--overwrite", help=OVERWRITE_HELP),
) -> None:
    """Cut Cholec80 videos into labelled clips; the split keeps each video on one side."""
    from moe.data.cholec80 import import_cholec80

    manifest = import_cholec80(
        root,
        output_dir,
        clip_seconds=clip_seconds,
        frames_per_clip=frames_per_clip,
        stride_seconds=stride_seconds,
        label_map=LabelMap.from_json_file(label_map) if label_map else None,
        videos=[v.strip() for v in videos.split(",") if v.strip()] if videos else None,
        size=parse_size(size) if size else None,
        min_presence=min_presence,
        val_fraction=val_fraction,
        seed=seed,
        progress=True,
        overwrite=overwrite,
    )
    _report(manifest)


@data_app.command("check", cls=CheckedCommand)
def check(
    manifest: Path = typer.Option(..., "--manifest", help="Clip manifest (JSONL)."),
    min_frames: int = typer.Option(81, "--min_frames", help="Frames each clip needs (4k+1).", **number(Frames)),
) -> None:
    """Validate a manifest and decode every clip; lists every bad clip by id in one report."""
    from moe.data.manifest import check_videos

    records = read_manifest(manifest)
    check_videos(records, manifest.parent, min_frames=min_frames)
    typer.echo(f"{manifest}: {len(records)} clips OK (>= {min_frames} frames each)")
