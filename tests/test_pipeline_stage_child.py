"""A real training child under the launcher: its `train_log.jsonl` (what the pipeline mirrors to
MLflow and turns into a progress artifact), a resumed run appending to it, and a progress bar
that writes a log file a line per interval, not a line per step."""

import json
import sys

import pytest

from tasks.stages.launcher import run_command, stage_command


def test_training_child_writes_a_machine_readable_log(tiny_workspace, tmp_path):
    models = tiny_workspace["models"]
    out = tmp_path / "stage1"
    args = [
        "stage1",
        "--dit",
        models.low_noise,
        "--dit_high_noise",
        models.high_noise,
        "--dataset",
        tiny_workspace["cache"],
        "--output_dir",
        out,
        "--network_dim",
        "4",
        "--learning_rate",
        "0.01",
    ]
    lines = []
    run_command(stage_command([str(a) for a in args + ["--max_train_epochs", "2"]]), "stage1-train", lines.append, timeout_s=600)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    start, steps, epochs = log[0], [r for r in log if r["event"] == "step"], [r for r in log if r["event"] == "epoch"]
    assert start["event"] == "start" and start["step"] == 0 and start["max_epochs"] == 2
    assert [r["step"] for r in steps] == list(range(1, start["total_steps"] + 1))
    assert [(r["epoch"], r["saved_state"]) for r in epochs] == [(1, True), (2, True)]
    per_epoch = start["total_steps"] // 2
    # the epoch's mean step loss (summed in float32 on the device; the steps are logged as float64)
    assert epochs[0]["loss"] == pytest.approx(sum(r["train/loss"] for r in steps[:per_epoch]) / per_epoch, rel=1e-6)
    assert {"train/lr", "train/grad_norm", "train/sigma"} <= set(steps[0])
    # A log file gets a line after the first step, at each tenth of the way and at the end (moe/runtime/progress.py),
    # not one per step.
    assert sum("stage1:" in line for line in lines) <= 12 < start["total_steps"], lines

    run_command(stage_command([str(a) for a in args + ["--max_train_epochs", "3", "--resume"]]), "stage1-train", lambda _: None, timeout_s=600)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    starts = [r for r in log if r["event"] == "start"]
    assert len(starts) == 2 and starts[1]["epoch"] == 2 and starts[1]["step"] == start["total_steps"]
    assert [r["epoch"] for r in log if r["event"] == "epoch"] == [1, 2, 3]
    assert sys.executable  # the children ran with this interpreter
