"""Merge benchmark (issue 2): streaming merge vs. `cp` + sync, and the merge's peak anonymous memory.

Builds a synthetic bf16 checkpoint with A14B shapes (dim 5120, ffn 13824; three blocks named
37-39 so the default target spec hits every q/k/v/o and ffn.0 in them), a LoRA at the reference
ranks, then measures in one run:
  - `cp` + `sync` of the checkpoint (median of --repeats),
  - the CLI's start-up time (`lora-moe merge` on a tiny checkpoint),
  - `lora-moe merge` on the big checkpoint, less the start-up time,
  - the merge process's peak RssAnon (anonymous memory; file-backed pages excluded), polled.
Targets: merge <= 1.5x cp+sync, peak RssAnon <= 0.35 GiB.

    python bench/merge_bench.py [--blocks 3] [--dir /tmp/merge-bench] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from moe.config.targets import TargetSpec
from moe.files.safetensors_file import TensorInfo, encode_header
from moe.lora.file import LoRAModuleWeights, write_lora_file

DIM, FFN, TEXT, FREQ = 5120, 13824, 4096, 256


def checkpoint_shapes(first_block: int, blocks: int) -> dict[str, tuple[int, ...]]:
    shapes = {
        "patch_embedding.weight": (DIM, 16, 1, 2, 2),
        "patch_embedding.bias": (DIM,),
        "text_embedding.0.weight": (DIM, TEXT),
        "text_embedding.0.bias": (DIM,),
        "text_embedding.2.weight": (DIM, DIM),
        "text_embedding.2.bias": (DIM,),
        "time_embedding.0.weight": (DIM, FREQ),
        "time_embedding.0.bias": (DIM,),
        "time_embedding.2.weight": (DIM, DIM),
        "time_embedding.2.bias": (DIM,),
        "time_projection.1.weight": (6 * DIM, DIM),
        "time_projection.1.bias": (6 * DIM,),
    }
    for b in range(first_block, first_block + blocks):
        for attn in ("self_attn", "cross_attn"):
            for p in "qkvo":
                shapes[f"blocks.{b}.{attn}.{p}.weight"] = (DIM, DIM)
                shapes[f"blocks.{b}.{attn}.{p}.bias"] = (DIM,)
            shapes[f"blocks.{b}.{attn}.norm_q.weight"] = (DIM,)
            shapes[f"blocks.{b}.{attn}.norm_k.weight"] = (DIM,)
        shapes[f"blocks.{b}.norm3.weight"] = (DIM,)
        shapes[f"blocks.{b}.norm3.bias"] = (DIM,)
        shapes[f"blocks.{b}.ffn.0.weight"] = (FFN, DIM)
        shapes[f"blocks.{b}.ffn.0.bias"] = (FFN,)
        shapes[f"blocks.{b}.ffn.2.weight"] = (DIM, FFN)
        shapes[f"blocks.{b}.ffn.2.bias"] = (DIM,)
        shapes[f"blocks.{b}.modulation"] = (1, 6, DIM)
    shapes["head.head.weight"] = (64, DIM)
    shapes["head.head.bias"] = (64,)
    shapes["head.modulation"] = (1, 2, DIM)
    return shapes


def write_synthetic_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Stream random bf16 tensors to disk without holding the checkpoint in memory."""
    tensors, offset = {}, 0
    for k, s in shapes.items():
        n = 2 * torch.Size(s).numel()
        tensors[k] = TensorInfo(dtype="BF16", shape=s, data_offsets=(offset, offset + n))
        offset += n
    g = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(encode_header(tensors, {"format": "pt"}))
        for s in shapes.values():
            numel = torch.Size(s).numel()
            for start in range(0, numel, 1 << 24):
                n = min(1 << 24, numel - start)
                f.write((torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).view(torch.uint8).numpy())


def write_lora(path: Path, shapes: dict[str, tuple[int, ...]], num_layers: int) -> None:
    spec = TargetSpec()
    g = torch.Generator().manual_seed(1)
    modules = {}
    for module, rank in spec.resolve(num_layers).items():
        out_f, in_f = shapes.get(module + ".weight", (None, None))
        if out_f is None:
            continue
        modules[module] = LoRAModuleWeights(
            down=torch.randn(rank, in_f, generator=g) * 0.01, up=torch.randn(out_f, rank, generator=g) * 0.01, alpha=1.0
        )
    write_lora_file(path, modules, spec, "t2v-A14B", dtype=torch.bfloat16)


def rss_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_polled(cmd: list[str]) -> tuple[float, int]:
    """Wall time and peak RssAnon (KiB) of a command, polled every 5 ms."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    peak = 0

    def poll():
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, rss_kib(proc.pid, "RssAnon"))
            time.sleep(0.005)

    t = threading.Thread(target=poll)
    t.start()
    rc = proc.wait()
    wall = time.perf_counter() - t0
    t.join()
    if rc:
        sys.exit(f"command failed ({rc}): {' '.join(cmd)}")
    return wall, peak


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=3, help="A14B-sized blocks in the checkpoint (3 = 2.4 GiB)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temp folder on /tmp)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="merge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    lora_moe = [sys.executable, "-m", "moe"]
    try:
        shapes = checkpoint_shapes(40 - args.blocks, args.blocks)
        ckpt, lora = work / "dit.safetensors", work / "lora.safetensors"
        write_synthetic_checkpoint(ckpt, shapes)
        write_lora(lora, shapes, num_layers=40)
        size = ckpt.stat().st_size
        tiny_shapes = {"blocks.39.self_attn.q.weight": (8, 8)}
        tiny, tiny_lora = work / "tiny.safetensors", work / "tiny_lora.safetensors"
        write_synthetic_checkpoint(tiny, tiny_shapes)
        write_lora(tiny_lora, tiny_shapes, num_layers=40)
        out = work / "merged.safetensors"
        copy = work / "copy.safetensors"
        timed(["cat", str(ckpt)])  # warm the page cache for both contenders alike

        cp_times, merge_times, startups, peaks = [], [], [], []
        for _ in range(args.repeats):  # interleaved so drift affects both alike
            cp_times.append(timed(["sh", "-c", f"cp '{ckpt}' '{copy}' && sync '{copy}'"]))
            copy.unlink()
            startups.append(
                timed(
                    lora_moe
                    + [
                        "merge",
                        "--quiet",
                        "--dit",
                        str(tiny),
                        "--lora_weight",
                        str(tiny_lora),
                        "--save_merged_model",
                        str(work / "t.safetensors"),
                        "--overwrite",
                    ]
                )
            )
            wall, peak = run_polled(lora_moe + ["merge", "--quiet", "--dit", str(ckpt), "--lora_weight", str(lora), "--save_merged_model", str(out)])
            merge_times.append(wall)
            peaks.append(peak)
            out.unlink()
        cp_t, start_t, merge_t = (statistics.median(x) for x in (cp_times, startups, merge_times))
        net = merge_t - start_t
        print(f"checkpoint: {size / 2**30:.2f} GiB bf16, {len(shapes)} tensors, {args.blocks} A14B-sized blocks")
        print(f"cp + sync:             {cp_t:6.2f} s  ({size / cp_t / 2**30:.2f} GiB/s)")
        print(f"CLI start-up:          {start_t:6.2f} s")
        print(f"merge (less start-up): {net:6.2f} s  ({size / net / 2**30:.2f} GiB/s)")
        print(f"merge / (cp + sync):   {net / cp_t:6.2f} x   (target <= 1.5)")
        print(f"peak RssAnon:          {max(peaks) / 2**20:6.3f} GiB (target <= 0.35)")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
