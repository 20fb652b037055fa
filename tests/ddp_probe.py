"""`lora-moe` under torchrun with a probe on every training forward (used by test_distributed.py and test_fsdp.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_probe.py stage1 --cpu ...

Each process appends one JSON line per training micro-batch to `$PROBE_DIR/rank-{k}.jsonl`: the
clip ids, sigma, expert, a fingerprint of the noise, the loss, the share of the expert's frozen
weights this process holds (1.0, or about 1/N with `--fsdp`), and for stage 2 the router's local batch
statistics and the load-balance EMAs after the update. It also appends to
`$PROBE_DIR/events-{k}.jsonl` when the main process's held-out evaluation ends and when each
process destroys the process group, and writes its pid to `$PROBE_DIR/pid-{k}`: a SIGUSR1 then
dumps every thread's stack into `$PROBE_DIR/stacks-{k}.txt` (how the test explains a hang). The probe only reads;
training is the real command's. `ddp_probe.py fsdp_check COMMAND ...` first runs test_fsdp.py's
model-level check in the same processes (one launch less). With `PROBE_SIGTERM=K:N`, process K
sends itself SIGTERM during its N-th training micro-batch (a preemption that reaches one process).
"""

import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe.cli import main
from moe.train.fsdp import shard_fraction
from moe.train.stage1 import Stage1Module
from moe.train.stage2 import Stage2Module


def _probe(cls):
    forward = cls.forward
    calls = []

    def probed(self, batch, sigma, noise, expert):
        calls.append(1)
        if os.environ.get("PROBE_SIGTERM") == f"{os.environ['RANK']}:{len(calls)}":
            signal.raise_signal(signal.SIGTERM)
        shard = shard_fraction(self.dits.models[expert])  # before the forward gathers anything
        parts = forward(self, batch, sigma, noise, expert)
        record = {
            "ids": batch["id"],
            "sigma": float(sigma[0]),
            "expert": expert,
            "noise": [float(noise.sum()), float(noise.flatten()[0])],
            "shard": shard,
            "loss": float(parts["loss"].detach()),
        }
        if isinstance(self, Stage2Module):
            with torch.no_grad():
                p = F.softmax(self.routed.router_logits(batch, sigma), dim=-1)
            record |= {
                "top1": F.one_hot(p.argmax(-1), p.shape[-1]).sum(0).tolist(),
                "p_sum": p.sum(0).tolist(),
                "n": len(p),
                "f": self.load_balance.f.tolist(),
                "P": self.load_balance.P.tolist(),
            }
        _append(f"rank-{os.environ['RANK']}.jsonl", record)
        return parts

    cls.forward = probed


def _append(name: str, record: dict) -> None:
    with open(Path(os.environ["PROBE_DIR"]) / name, "a") as f:
        f.write(json.dumps(record) + "\n")


def _event(name: str) -> None:
    _append(f"events-{os.environ['RANK']}.jsonl", {"event": name, "t": time.monotonic()})  # one clock for all processes


def _record(owner, attr: str, event: str, before: bool = False) -> None:
    """Wrap `owner.attr` to record `event` as it starts (`before`) or once it has returned."""
    wrapped = getattr(owner, attr)

    def recorded(*args, **kwargs):
        if before:
            _event(event)
        out = wrapped(*args, **kwargs)
        if not before:
            _event(event)
        return out

    setattr(owner, attr, recorded)


if __name__ == "__main__":
    probe_dir, rank = Path(os.environ["PROBE_DIR"]), os.environ["RANK"]
    stacks = open(probe_dir / f"stacks-{rank}.txt", "w")  # open until the process exits
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    (probe_dir / f"pid-{rank}").write_text(str(os.getpid()))
    argv = sys.argv[1:]
    if argv[0] == "fsdp_check":  # test_fsdp.py's model-level check first, then the command
        from test_fsdp import fsdp_check

        fsdp_check()
        argv = argv[1:]
    _probe(Stage1Module)
    _probe(Stage2Module)
    for cls in (Stage1Module, Stage2Module):
        _record(cls, "evaluate", "evaluated")
    _record(torch.distributed, "destroy_process_group", "destroy_process_group", before=True)
    main(argv)
