"""Checkpoints by optimizer steps and by time, pruning to the newest K states, a resume in the
middle of an epoch that ends bit for bit where an uninterrupted run does (stage 1 and stage 2),
SIGTERM to a training command (state saved, exit code 143, resumed exactly), and the pipeline's
retry of a training stage resuming from the newest state (issue 18, item 3). The two-process
resume after a SIGTERM is in test_distributed.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe.config.train import Stage1Config, Stage2Config
from moe.errors import EXIT_STOPPED
from moe.train.stage1 import Stage1Module, train_stage1
from moe.train.stage2 import train_stage2
from moe.train.state_names import latest_state, resumable_states, state_name

# Two epochs of 2-clip batches, two micro-batches per optimizer step: saves fall between
# windows, and a resume crosses an epoch end.
STAGE1 = dict(
    network_dim=8,
    learning_rate=5e-3,
    max_train_epochs=2,
    batch_size=2,
    gradient_accumulation_steps=2,
    seed=3,
    val_sigmas=(0.5,),
    save_every_n_steps=2,
)


def _cfg1(ws, out, **kw):
    return Stage1Config(
        **(
            dict(dit=ws["models"].low_noise, dit_high_noise=ws["models"].high_noise, dataset=ws["cache"], output_dir=out, progress=False)
            | STAGE1
            | kw
        )
    )


def _events(out: Path, event: str) -> list[dict]:
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if r["event"] == event]


def _same_file(a: Path, b: Path) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{len(different)} of {len(x)} tensors differ, e.g. {different[0]}"


@pytest.fixture(scope="module")
def straight1(tiny_workspace, tmp_path_factory):
    """The uninterrupted stage-1 run the resumed ones are compared with."""
    out = tmp_path_factory.mktemp("ckpt") / "straight"
    metrics = train_stage1(_cfg1(tiny_workspace, out))
    return {"out": out, "metrics": metrics, "steps_per_epoch": metrics["train_steps"] // 2}


def test_step_states_at_window_ends_and_a_mid_epoch_resume_is_exact(straight1, tiny_workspace, tmp_path):
    out, per_epoch = straight1["out"], straight1["steps_per_epoch"]
    total = 2 * per_epoch
    assert per_epoch >= 3
    # Every 2nd optimizer step, except at an epoch end, whose state-epoch-N stands for it.
    expected = [
        state_name(s // per_epoch) if s % per_epoch == 0 else state_name(s // per_epoch, s)
        for s in range(1, total + 1)
        if s % 2 == 0 or s % per_epoch == 0
    ]
    assert [p.name for p in resumable_states(out)] == expected
    assert [e["state"] for e in _events(out, "state")] == expected
    assert latest_state(out).name == "state-epoch-2"
    for state in resumable_states(out):
        progress = json.loads((state / "state.json").read_text())["progress"]
        done_in_epoch = progress["step"] - progress["epoch"] * per_epoch
        assert progress["batch"] == (2 * done_in_epoch if "-step-" in state.name else 0)  # whole windows only
        assert sorted(p.name for p in state.iterdir()) == sorted(
            ["state.json", "trainable.safetensors", "optimizer.safetensors", "rng-0.safetensors", "rng-0.json"]
        )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-epoch-1.safetensors", "checkpoint-epoch-2.safetensors"]

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    first = state_name(0, 2)  # two optimizer steps (four micro-batches) into the first epoch
    shutil.copytree(out / first, resumed / first)
    metrics = train_stage1(_cfg1(tiny_workspace, resumed, resume=True))
    _same_file(out / "vanilla_lora.safetensors", resumed / "vanilla_lora.safetensors")
    assert metrics["train_steps"] == total and metrics["val_loss_final"] == straight1["metrics"]["val_loss_final"]
    start = _events(resumed, "start")[0]
    assert (start["step"], start["epoch"], start["batch"]) == (2, 0, 4)
    untimed = lambda events: [{k: v for k, v in e.items() if k != "time"} for e in events]  # noqa: E731
    assert untimed(_events(resumed, "epoch")) == untimed(_events(out, "epoch"))  # the first epoch's loss too


def test_time_based_states_and_pruning_to_the_newest_k(tiny_workspace, tmp_path, monkeypatch):
    """A clock that advances 25 s per optimizer step and --save_every_n_minutes 1: a state at the
    first step a minute after the last one (steps 3, 6, 9 ...), each epoch state restarting the
    count; --save_last_n_states 2 keeps the newest two, the weights files all."""
    import moe.train.loop as loop

    clock = [0.0]
    monkeypatch.setattr(loop, "_clock", lambda: clock[0])
    monkeypatch.setattr(Stage1Module, "on_step", lambda self, step, total: clock.__setitem__(0, clock[0] + 25.0), raising=False)
    out = tmp_path / "timed"
    metrics = train_stage1(
        _cfg1(tiny_workspace, out, gradient_accumulation_steps=1, save_every_n_steps=None, save_every_n_minutes=1, save_last_n_states=2)
    )
    per_epoch = metrics["train_steps"] // 2
    expected, last = [], 0
    for step in range(1, 2 * per_epoch + 1):
        if step % per_epoch == 0:
            expected.append(state_name(step // per_epoch))
            last = step
        elif (step - last) * 25 >= 60:
            expected.append(state_name(step // per_epoch, step))
            last = step
    assert len(expected) >= 5 and any("-step-" in name for name in expected)
    assert [e["state"] for e in _events(out, "state")] == expected
    assert [p.name for p in resumable_states(out)] == expected[-2:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-epoch-1.safetensors", "checkpoint-epoch-2.safetensors"]


def test_stage2_mid_epoch_resume_is_exact(merged_workspace, tmp_path):
    """Router, gates, experts, the load-balance EMAs and the teacher-forcing schedule all continue
    from a state two optimizer steps into the epoch."""

    def cfg(out, **kw):
        return Stage2Config(
            dit=merged_workspace["merged_low"],
            dit_high_noise=merged_workspace["merged_high"],
            dataset=merged_workspace["cache"],
            output_dir=out,
            network_dim=8,
            max_train_epochs=1,
            batch_size=2,
            learning_rate=1e-2,
            save_every_n_steps=2,
            val_sigmas=(0.5,),
            progress=False,
            **kw,
        )

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_stage2(cfg(straight))
    resumed.mkdir()
    shutil.copytree(straight / state_name(0, 2), resumed / state_name(0, 2))
    train_stage2(cfg(resumed, resume=True))
    _same_file(straight / "lora_moe_stage2.safetensors", resumed / "lora_moe_stage2.safetensors")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (straight, resumed))
    assert a["routing_accuracy"] == b["routing_accuracy"] and a["train_steps"] == b["train_steps"]


def test_sigterm_saves_a_state_and_the_resumed_run_ends_exactly(straight1, tiny_workspace, tmp_path):
    """SIGTERM to a running `lora-moe stage1`: it saves a state at the next optimizer-step
    boundary, says so in one `error:` line and exits with 143; `--resume` then ends with the
    uninterrupted run's weights."""
    ws, out = tiny_workspace, tmp_path / "stopped"
    flags = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in STAGE1.items()]
    cmd = [
        sys.executable,
        "-m",
        "moe",
        "stage1",
        "--dit",
        str(ws["models"].low_noise),
        "--dit_high_noise",
        str(ws["models"].high_noise),
        "--dataset",
        str(ws["cache"]),
        "--output_dir",
        str(out),
        *flags,
        "--no_progress",
    ]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ | {"OMP_NUM_THREADS": "1"})
    log = out / "train_log.jsonl"
    deadline = time.monotonic() + 240
    while not (log.is_file() and '"event": "step"' in log.read_text()):  # training has begun
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=240)
    assert child.returncode == EXIT_STOPPED == 143, stderr[-3000:]
    stopped = _events(out, "stopped")
    assert len(stopped) == 1 and stopped[0]["step"] < straight1["metrics"]["train_steps"]
    stop, state = stopped[0], out / stopped[0]["state"]
    where = f"{stop['batch']} micro-batches into epoch {stop['epoch'] + 1}" if stop["batch"] else f"after epoch {stop['epoch']}"
    assert stderr.strip().splitlines()[-1] == (
        f"error: training stopped by SIGTERM at step {stop['step']} ({where}); its state is saved to {state}: run the "
        "same command with --resume to continue from there"
    )
    assert latest_state(out) == state and not (out / "vanilla_lora.safetensors").exists()

    train_stage1(_cfg1(ws, out, resume=True))
    _same_file(straight1["out"] / "vanilla_lora.safetensors", out / "vanilla_lora.safetensors")


def test_a_retried_training_stage_resumes_from_the_newest_state(tmp_path):
    """The pipeline's training stage passes --resume when its work folder holds a state, epoch's
    or step's, naming the newest by optimizer step (not the largest number in the name)."""
    from tasks.stages.prefect_tasks import start_options

    out = tmp_path / "out"
    out.mkdir()
    assert start_options(out) == ({"overwrite": True}, None)
    (out / "state-nonfinite-step-3").mkdir()  # not resumable
    assert start_options(out) == ({"overwrite": True}, None)
    for name in ("state-epoch-1", "state-epoch-1-step-00000007", "state-epoch-0-step-00000003"):
        (out / name).mkdir()
    assert start_options(out) == ({"resume": True}, out / "state-epoch-1-step-00000007")
    (out / "state-epoch-2").mkdir()  # step 10, say: newer than step 7 of the second epoch
    assert start_options(out) == ({"resume": True}, out / "state-epoch-2")
