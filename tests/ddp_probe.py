"""`lora-moe` under torchrun with a probe on every training forward (used by test_distributed.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/ddp_probe.py stage1 --cpu ...

Each process appends one JSON line per training micro-batch to `$PROBE_DIR/rank-{k}.jsonl`: the
clip ids, sigma, expert, a fingerprint of the noise, and for stage 2 the router's local batch
statistics and the load-balance EMAs after the update. The probe only reads; training is the
real command's.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from moe.cli import main
from moe.train.stage1 import Stage1Module
from moe.train.stage2 import Stage2Module


def _probe(cls):
    forward = cls.forward

    def probed(self, batch, sigma, noise, expert):
        parts = forward(self, batch, sigma, noise, expert)
        record = {"ids": batch["id"], "sigma": float(sigma[0]), "expert": expert,
                  "noise": [float(noise.sum()), float(noise.flatten()[0])]}
        if isinstance(self, Stage2Module):
            with torch.no_grad():
                p = F.softmax(self.routed.router_logits(batch, sigma), dim=-1)
            record |= {"top1": F.one_hot(p.argmax(-1), p.shape[-1]).sum(0).tolist(), "p_sum": p.sum(0).tolist(),
                       "n": len(p), "f": self.load_balance.f.tolist(), "P": self.load_balance.P.tolist()}
        path = Path(os.environ["PROBE_DIR"]) / f"rank-{os.environ['RANK']}.jsonl"
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return parts

    cls.forward = probed


if __name__ == "__main__":
    _probe(Stage1Module)
    _probe(Stage2Module)
    main(sys.argv[1:])
