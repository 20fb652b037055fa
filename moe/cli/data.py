"""`lora-moe data ...`: build clip data sets (the synthetic set, a Cholec80 import)."""

from __future__ import annotations

from pathlib import Path

import typer

from moe.cli.app import app
from moe.cli.config_command import config_command
from moe.config.data import Cholec80Config, DataCheckConfig
from moe.config.tiny import SynthConfig
from moe.data.manifest import LabelMap, read_manifest, summarize

data_app = typer.Typer(
    help="Build clip data sets: a synthetic surgical-like set, or clips cut from Cholec80.",
    no_args_is_help=True,
)
app.add_typer(data_app, name="data")


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


def _run_cholec80(cfg: Cholec80Config) -> None:
    from moe.data.cholec80 import import_cholec80

    manifest = import_cholec80(
        cfg.root,
        cfg.output_dir,
        clip_seconds=cfg.clip_seconds,
        frames_per_clip=cfg.frames_per_clip,
        stride_seconds=cfg.stride_seconds,
        label_map=LabelMap.from_json_file(cfg.label_map) if cfg.label_map else None,
        videos=[v.strip() for v in cfg.videos.split(",") if v.strip()] if cfg.videos else None,
        size=cfg.size,
        min_presence=cfg.min_presence,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        progress=True,
        overwrite=cfg.overwrite,
    )
    _report(manifest)


def _run_check(cfg: DataCheckConfig) -> None:
    from moe.data.manifest import check_videos

    records = read_manifest(cfg.manifest)
    check_videos(records, cfg.manifest.parent, min_frames=cfg.min_frames)
    typer.echo(f"{cfg.manifest}: {len(records)} clips OK (>= {cfg.min_frames} frames each)")


config_command(
    data_app, "cholec80", Cholec80Config, _run_cholec80, help="Cut Cholec80 videos into labelled clips; the split keeps each video on one side."
)
config_command(
    data_app, "check", DataCheckConfig, _run_check, help="Validate a manifest and decode every clip; lists every bad clip by id in one report."
)
