"""Multi-process data-parallel training (the `accelerate launch` / torchrun path), on the CPU
with the gloo backend and two processes: each process takes its share of the batches with its
own noise and the shared sigma, the warmup counts optimizer steps, the load-balance EMAs cover
every process's data, the state holds every process's RNG, a resume is exact, and only the main
process writes weights and metrics. `tests/ddp_probe.py` records what each process trained on."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

PROBE = Path(__file__).with_name("ddp_probe.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], probe_dir: Path, timeout: float = 300, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `ddp_probe.py` on two processes. A run takes 15-40 s; one still going after `timeout`
    has hung: each worker's threads' stacks (SIGUSR1, see the probe) go into the failure."""
    probe_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(PROBE),
        *args,
        "--cpu",
        "--no_progress",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PROBE_DIR": str(probe_dir)} | (env or {})
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True) as run:
        try:
            stdout, stderr = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for pid_file in probe_dir.glob("pid-*"):
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGUSR1)
            time.sleep(2)
            os.killpg(run.pid, signal.SIGKILL)
            run.communicate()
            stacks = "".join(f"--- {f.name}\n{f.read_text()[:6000]}" for f in sorted(probe_dir.glob("stacks-*")))
            pytest.fail(f"two-process run hung for {timeout} s; the workers' stacks:\n{stacks}")
    assert run.returncode == 0 or not check, stderr[-3000:]
    return subprocess.CompletedProcess(cmd, run.returncode, stdout, stderr)


def _records(probe_dir: Path) -> list[list[dict]]:
    return [[json.loads(line) for line in (probe_dir / f"rank-{r}.jsonl").read_text().splitlines()] for r in (0, 1)]


def _events(probe_dir: Path) -> list[dict[str, float]]:
    return [{e["event"]: e["t"] for e in map(json.loads, (probe_dir / f"events-{r}.jsonl").read_text().splitlines())} for r in (0, 1)]


def _train_clips(cache: Path) -> int:
    return sum(c["split"] == "train" for c in json.loads((cache / "index.json").read_text())["clips"])


@pytest.fixture(scope="module")
def two_process_stage1(tiny_workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp1")
    models = tiny_workspace["models"]
    args = [
        "stage1",
        "--dit",
        str(models.low_noise),
        "--dit_high_noise",
        str(models.high_noise),
        "--dataset",
        str(tiny_workspace["cache"]),
        "--max_train_epochs",
        "2",
        "--save_every_n_epochs",
        "1",
        "--network_dim",
        "8",
        "--learning_rate",
        "0.01",
        "--lr_warmup_steps",
        "4",
    ]
    done = _torchrun([*args, "--output_dir", str(root / "straight")], root / "probe")
    return {
        "root": root,
        "args": args,
        "stdout": done.stdout,
        "out": root / "straight",
        "records": _records(root / "probe"),
        "events": _events(root / "probe"),
    }


def test_no_process_tears_down_while_another_still_works(two_process_stage1):
    """Every process destroys the process group only after the main process's held-out
    evaluation, the last work of the run (the documented shutdown: together, once nothing more
    is sent). Before, the other process destroyed it while the main one was still evaluating.
    A CI run once hung after "stage 1 done" until it was killed, with no stacks to say where;
    `_torchrun` now collects them if it happens again."""
    rank0, rank1 = two_process_stage1["events"]
    assert rank0["evaluated"] < rank0["destroy_process_group"]
    assert "evaluated" not in rank1  # only the main process evaluates
    assert rank1["destroy_process_group"] > rank0["evaluated"]


def test_each_process_draws_its_own_noise_and_shares_sigma(two_process_stage1, tiny_workspace):
    rank0, rank1 = two_process_stage1["records"]
    positions = -(-_train_clips(tiny_workspace["cache"]) // 2)
    assert len(rank0) == len(rank1) == 2 * positions
    for a, b in zip(rank0, rank1):
        assert a["sigma"] == b["sigma"] and a["expert"] == b["expert"]  # same DiT at the same time
        assert a["noise"] != b["noise"]  # before: rank k got rank 0's noise tensor
    for epoch in (slice(0, positions), slice(positions, None)):  # every clip in every epoch, over both processes
        seen = {i for r in (rank0[epoch], rank1[epoch]) for x in r for i in x["ids"]}
        assert len(seen) == _train_clips(tiny_workspace["cache"])
    assert {r["expert"] for r in rank0} == {"high", "low"}


def test_warmup_counts_optimizer_steps(two_process_stage1):
    """--lr_warmup_steps 4 with two processes: the lr reaches its peak at optimizer step 4 (before,
    accelerate stepped the scheduler once per process and warmup ended at step 2)."""
    events = next((two_process_stage1["out"] / "logs").rglob("events.out.tfevents.*"))
    lr = {e.step: e.value for e in EventAccumulator(str(events)).Reload().Scalars("train/lr")}
    assert [round(lr[s] / 0.01, 4) for s in (1, 2, 3, 4)] == [0.25, 0.5, 0.75, 1.0]
    assert max(lr, key=lr.get) == 4 and all(lr[s] < 0.01 for s in lr if s > 4)


def test_outputs_state_and_exact_resume(two_process_stage1, tiny_workspace):
    out, root = two_process_stage1["out"], two_process_stage1["root"]
    assert two_process_stage1["stdout"].count("stage 1 done") == 1  # the main process reports, the other does not
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 * -(-_train_clips(tiny_workspace["cache"]) // 2)  # one batch per process per step
    state = out / "state-epoch-2"
    assert {"rng-0.safetensors", "rng-1.safetensors", "rng-0.json", "rng-1.json", "state.json"} <= {p.name for p in state.iterdir()}
    assert json.loads((state / "state.json").read_text())["num_processes"] == 2
    assert not list(state.glob("*.pkl")) and not list(state.glob("*.bin"))

    resumed = root / "resumed"
    resumed.mkdir()
    shutil.copytree(out / "state-epoch-1", resumed / "state-epoch-1")  # as if stopped after epoch 1
    _torchrun([*two_process_stage1["args"], "--output_dir", str(resumed), "--resume"], root / "probe-resumed")
    a, b = load_file(out / "vanilla_lora.safetensors"), load_file(resumed / "vanilla_lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = _records(root / "probe-resumed")
    assert [r["noise"] for r in again[1]] == [r["noise"] for r in two_process_stage1["records"][1][len(again[1]) :]]


def test_sigterm_to_one_process_stops_both_mid_epoch_and_the_resume_is_exact(two_process_stage1):
    """SIGTERM reaches one process only (rank 1, in its 5th micro-batch of the first epoch): both
    agree at the next optimizer step, save one state with both processes' noise streams and exit
    with 143, nobody hanging at the next all-reduce; `--resume` with two processes ends with the
    uninterrupted run's weights and trains on the same clips with the same noise from there on."""
    from moe.train.state_names import latest_state

    root, straight = two_process_stage1["root"], two_process_stage1["records"]
    out = root / "sigterm"
    stopped = _torchrun([*two_process_stage1["args"], "--output_dir", str(out)], root / "probe-sigterm", env={"PROBE_SIGTERM": "1:5"}, check=False)
    assert stopped.returncode != 0
    assert stopped.stderr.count("error: training stopped by SIGTERM at step 5 (5 micro-batches into epoch 1)") == 2
    state = out / "state-epoch-0-step-00000005"
    assert latest_state(out) == state and not (out / "vanilla_lora.safetensors").exists()
    progress = json.loads((state / "state.json").read_text())["progress"]
    assert (progress["step"], progress["batch"], progress["processes"]) == (5, 5, 2)
    assert [len(r) for r in _records(root / "probe-sigterm")] == [5, 5]  # both stopped after the same step

    _torchrun([*two_process_stage1["args"], "--output_dir", str(out), "--resume"], root / "probe-sigterm-resumed")
    a, b = load_file(two_process_stage1["out"] / "vanilla_lora.safetensors"), load_file(out / "vanilla_lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = _records(root / "probe-sigterm-resumed")
    for rank in (0, 1):
        assert [r["noise"] for r in again[rank]] == [r["noise"] for r in straight[rank][5:]]
        assert [r["ids"] for r in again[rank]] == [r["ids"] for r in straight[rank][5:]]


def test_load_balance_statistics_cover_every_process(merged_workspace, tmp_path):
    """The f and P EMAs are updated from both processes' batches and agree on both (before, DDP
    re-broadcast rank 0's buffers on every forward, so they followed rank 0's data only)."""
    args = [
        "stage2",
        "--dit",
        str(merged_workspace["merged_low"]),
        "--dit_high_noise",
        str(merged_workspace["merged_high"]),
        "--dataset",
        str(merged_workspace["cache"]),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_train_epochs",
        "1",
        "--network_dim",
        "8",
        "--learning_rate",
        "0.01",
    ]
    _torchrun(args, tmp_path / "probe")
    rank0, rank1 = _records(tmp_path / "probe")
    experts = len(rank0[0]["f"])
    f = P = torch.full((experts,), 1.0 / experts, dtype=torch.float64)
    for a, b in zip(rank0, rank1, strict=True):
        n = a["n"] + b["n"]
        f = 0.99 * f + 0.01 * (torch.tensor(a["top1"]) + torch.tensor(b["top1"])).double() / n
        P = 0.99 * P + 0.01 * (torch.tensor(a["p_sum"]) + torch.tensor(b["p_sum"])).double() / n
        for r in (a, b):
            torch.testing.assert_close(torch.tensor(r["f"]).double(), f, rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.tensor(r["P"]).double(), P, rtol=0, atol=1e-6)
