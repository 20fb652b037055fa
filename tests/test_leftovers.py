"""Leftovers and silent garbage (issue 12, class 8): what a killed run leaves is recognisable,
listed by `inspect` and removed by the next run of the same command; LoRA files holding NaN or
inf are refused instead of merging into a NaN DiT."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LockHolder, run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe.files.atomic import temporaries_of
from moe.files.output_lock import lock_path
from moe.wan.file_kind import classify

# A merge that kills itself (SIGKILL: no cleanup runs) after writing its first chunk.
KILLED_MERGE = """
import os, signal, sys
import moe.merge as merge
real = merge._StreamCopier.write
def write(self, data):
    real(self, data)
    os.kill(os.getpid(), signal.SIGKILL)
merge._StreamCopier.write = write
from moe.cli import main
main(sys.argv[1:])
"""


def _merge_argv(r, out):
    return ["merge", "--quiet", "--dit", r["models"].low_noise, "--lora_weight", r["vanilla_lora"], "--save_merged_model", out]


def test_a_killed_merge_is_listed_and_cleared_by_the_next_run(stage2_run, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    killed = subprocess.Popen([sys.executable, "-c", KILLED_MERGE, *map(str, _merge_argv(stage2_run, out))])
    assert killed.wait() == -9
    [tmp] = temporaries_of(out)
    assert not out.exists() and lock_path(out).is_file()

    code, _, err = run_cli(capsys, ["inspect", out])
    assert code == 2 and err.count("\n") == 1
    assert f"{out} does not exist; unfinished temporary (an interrupted write of merged.safetensors): {tmp} (" in err
    code, report, _ = run_cli(capsys, ["inspect", tmp])
    assert code == 0 and report.startswith(f"{tmp}: an unfinished temporary of merged.safetensors, left by an interrupted write")

    code, _, err = run_cli(capsys, _merge_argv(stage2_run, out))
    assert code == 0, err
    assert f"warning: took over the stale lock {lock_path(out)} of pid {killed.pid} (started " in err
    assert f"warning: removed {tmp} (" in err and f"left by an interrupted write of {out}" in err
    assert temporaries_of(out) == [] and not lock_path(out).exists()
    assert classify(out).kind == "merged-dit"


def test_a_run_folder_loses_its_own_leftovers_but_not_a_live_runs(stage2_run, tmp_path, capsys):
    """In a training folder: temporaries of interrupted checkpoint writes and a half-saved state
    go; a temporary whose own file a live run is writing stays; `inspect` lists them first."""
    r = stage2_run
    out = shutil.copytree(r["root"] / "stage1", tmp_path / "s1")
    stale = [out / ".checkpoint-epoch-4.safetensors.tmp-0123abcd", out / ".metrics.json.tmp-89abcdef"]
    for path in stale:
        path.write_bytes(b"\0" * 2048)
    (out / "state-epoch-4.partial").mkdir()
    live_tmp = out / ".export.safetensors.tmp-feedf00d"
    live_tmp.write_bytes(b"\0")
    holder = LockHolder(out / "export.safetensors")
    try:
        code, _, err = run_cli(capsys, ["inspect", out])
        assert code == 2 and all(str(p) in err for p in stale)
        code, _, err = run_cli(
            capsys,
            [
                "stage1",
                "--dit",
                r["models"].low_noise,
                "--dit_high_noise",
                r["models"].high_noise,
                "--dataset",
                r["cache"],
                "--output_dir",
                out,
                "--network_dim",
                "8",
                "--max_train_epochs",
                "4",
                "--resume",
                "--no_progress",
            ],
        )
    finally:
        holder.stop()
    assert code == 0, err
    assert all(f"warning: removed {p} (2.0 kB)" in err for p in stale)
    assert not any(p.exists() for p in stale) and not (out / "state-epoch-4.partial").exists()
    assert live_tmp.exists()
    assert (out / "state-epoch-4").is_dir()  # the resumed run went on from epoch 3


def _poison(src: Path, dst: Path, key_part: str, value: float) -> Path:
    """A copy of `src` with one tensor whose key contains `key_part` set to `value` in one place."""
    with safe_open(str(src), "pt") as f:
        metadata = f.metadata()
    state = load_file(src)
    key = next(k for k in sorted(state) if key_part in k)
    state[key] = state[key].clone()
    state[key].view(-1)[0] = value
    save_file(state, dst, metadata=metadata)
    return dst


NAN, INF = float("nan"), float("inf")
# (case, which file, key part, value, argv from (run, poisoned file, tmp))
NON_FINITE = [
    (
        "merge: NaN in lora_up",
        "vanilla_lora",
        "lora_up",
        NAN,
        lambda r, f, t: ["merge", "--dit", r["models"].low_noise, "--lora_weight", f, "--save_merged_model", t / "m.safetensors"],
    ),
    (
        "merge: inf in lora_down",
        "vanilla_lora",
        "lora_down",
        INF,
        lambda r, f, t: ["merge", "--dit", r["models"].low_noise, "--lora_weight", f, "--save_merged_model", t / "m.safetensors"],
    ),
    (
        "merge: NaN alpha",
        "vanilla_lora",
        "alpha",
        NAN,
        lambda r, f, t: ["merge", "--dit", r["models"].low_noise, "--lora_weight", f, "--save_merged_model", t / "m.safetensors"],
    ),
    (
        "generate: NaN in a stage-1 LoRA",
        "vanilla_lora",
        "lora_up",
        NAN,
        lambda r, f, t: _generate(r, t, "--dit", r["models"].low_noise, "--dit_high_noise", r["models"].high_noise, "--lora_weight", f),
    ),
    (
        "generate: NaN in an expert",
        "lora_moe",
        "experts.hook.lora_up",
        NAN,
        lambda r, f, t: _generate(r, t, "--dit", r["merged_low"], "--dit_high_noise", r["merged_high"], "--lora_moe_weights", f),
    ),
    (
        "generate: inf in the router",
        "lora_moe",
        "router.",
        -INF,
        lambda r, f, t: _generate(r, t, "--dit", r["merged_low"], "--dit_high_noise", r["merged_high"], "--lora_moe_weights", f),
    ),
    (
        "export: NaN timestep gate",
        "lora_moe",
        "timestep_gate.c",
        NAN,
        lambda r, f, t: ["export-expert", "--lora_moe_weights", f, "--expert", "hook", "--out", t / "e.safetensors"],
    ),
]


def _generate(r, tmp, *extra):
    return [
        "generate",
        "--model_set",
        r["root"] / "models",
        "--prompt",
        "x",
        "--infer_steps",
        "1",
        "--video_size",
        "32x32",
        "--video_length",
        "5",
        "--save_path",
        tmp / "v.mp4",
        *extra,
    ]


@pytest.mark.parametrize("case, file, key_part, value, argv", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_non_finite_lora_tensors_are_refused(stage2_run, tmp_path, capsys, case, file, key_part, value, argv):
    src = stage2_run[file]
    bad = _poison(src, tmp_path / f"bad_{src.name}", key_part, value)
    code, _, err = run_cli(capsys, argv(stage2_run, bad, tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    assert f"error: {bad} holds NaN or inf values (in " in err and key_part in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]  # no output, lock or temporary
