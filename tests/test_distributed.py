"""Multi-process data-parallel training (the `accelerate launch` / torchrun path), on the CPU
with the gloo backend: each process takes its share of the batches, gradients are averaged,
the state holds every process's RNG, and only the main process writes weights and metrics."""

import json
import os
import subprocess
import sys

from moe.lora.file import read_lora_file


def test_two_process_stage1_on_cpu(tiny_workspace, tmp_path):
    out = tmp_path / "ddp"
    models = tiny_workspace["models"]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
        "-m", "moe", "stage1", "--cpu", "--dit", str(models.low_noise), "--dit_high_noise", str(models.high_noise),
        "--dataset", str(tiny_workspace["cache"]), "--output_dir", str(out), "--max_train_epochs", "2",
        "--network_dim", "8", "--learning_rate", "0.01", "--no_progress",
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stage 1 done") == 1  # the main process reports, the other does not
    index = json.loads((tiny_workspace["cache"] / "index.json").read_text())
    train_clips = sum(c["split"] == "train" for c in index["clips"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train_steps"] == 2 * -(-train_clips // 2)  # each step consumes one batch per process
    assert {p.name for p in (out / "state-epoch-2").iterdir()} >= {"random_states_0.pkl", "random_states_1.pkl"}
    assert read_lora_file(out / "vanilla_lora.safetensors").ranks()
