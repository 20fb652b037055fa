"""A training run's output folder, claimed for the whole run (`moe.files.output_paths`).

An existing run folder is continued with `--resume`, replaced with `--overwrite` (which removes
only the files a run of this stage writes, so a resumed run never picks up a stale state) or
refused. Only the main process of a multi-process run claims the folder: the others wait for it
in the process group's rendezvous.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from moe.config.file_names import METRICS_FILE, TRAIN_LOG_FILE
from moe.config.train import TrainConfig
from moe.errors import MoeError
from moe.files.atomic import remove_path
from moe.files.output_paths import claim_output
from moe.files.safetensors_file import read_header
from moe.train.state_names import latest_state

# What a run writes into its folder besides the weights file (see `moe.train.loop`);
# `state-epoch-*` covers the step states too (`state-epoch-N-step-S`, `moe.train.state_names`).
RUN_PATTERNS = (
    "{run}_config.json",
    METRICS_FILE,
    TRAIN_LOG_FILE,
    "checkpoint-epoch-*.safetensors",
    "state-epoch-*",
    "state-nonfinite-step-*",
    "logs/{run}",
    "samples",
)


def is_main_process() -> bool:
    """Rank 0 of a torchrun / accelerate launch (set in the environment before any process
    group exists), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


def run_files(output_dir: Path, run: str, weights_file: str) -> list[Path]:
    found = [output_dir / weights_file, output_dir / f"{Path(weights_file).stem}_musubi.safetensors"]
    for pattern in RUN_PATTERNS:
        found += output_dir.glob(pattern.format(run=run))
    return [p for p in found if p.exists()]


def holds_run(folder: Path, run: str) -> bool:
    """Whether `folder` holds a run of this stage: its `{run}_config.json`, or (a state copied
    in to resume from) states and no other stage's config. Stage 1 and 2 share file names
    (metrics.json, state-epoch-N), so the config file is what tells them apart."""
    if (folder / f"{run}_config.json").is_file():
        return True
    return latest_state(folder) is not None and not list(folder.glob("*_config.json"))


def check_resume_state(output_dir: Path) -> None:
    """The state `--resume` would load, checked file by file, so that a truncated state is one
    line instead of a SafetensorError from inside accelerate."""
    state = latest_state(output_dir)
    if state is None:
        return  # the loop says there is nothing to resume
    for file in sorted(state.rglob("*")):
        try:
            if file.suffix == ".safetensors":
                read_header(file)
            elif file.suffix == ".json":
                json.loads(file.read_text())
        except (MoeError, ValueError) as e:
            raise MoeError(
                f"cannot resume from {state}: {e}. Delete {state.name} to resume from the one before, or start again with --overwrite"
            ) from None


@contextlib.contextmanager
def claim_run_dir(cfg: TrainConfig, run: str, weights_file: str) -> Iterator[None]:
    """Hold `cfg.output_dir` for the run (main process only; see the module docstring)."""
    if not is_main_process():
        yield
        return
    if cfg.resume and cfg.overwrite:
        raise MoeError("--resume continues the run in --output_dir and --overwrite replaces it; pass one of them")
    out = cfg.output_dir
    inputs = {"--dit": cfg.dit, "--dit_high_noise": cfg.dit_high_noise, "--dataset": cfg.dataset}
    claim = claim_output(
        out,
        flag="--output_dir",
        inputs=inputs,
        overwrite=cfg.overwrite,
        reuse=cfg.resume,
        folder=True,
        is_ours=lambda p: holds_run(p, run),
        hint="pass --resume to continue it, --overwrite to replace it, or choose another --output_dir",
    )
    with claim:
        if cfg.overwrite:
            for path in run_files(out, run, weights_file):
                remove_path(path)
        for partial in out.glob("state-*.partial"):  # the loop's temporaries, stale under our lock
            remove_path(partial)
        if cfg.resume:
            check_resume_state(out)
        yield
