"""Pipeline benchmark (issue 8): orchestration overhead, the cached re-run, and S3 transfers.

Measures in one run:
  - the tiny pipeline (`lora-moe-pipeline`, tiny preset, `make demo`'s settings unless
    --small) on a local artifact root with a temporary Prefect server: flow wall time, and the
    time covered by at least one stage command (the merges overlap, so intervals are united,
    not summed); overhead = the difference, absolute and as a share of the flow. The one-time
    creation of the MLflow SQLite store is part of it and reported on its own;
  - the same flow again with nothing changed (every stage Cached): wall time;
  - S3 through the artifact store (put with the sha256 computed in the upload pass, get with
    it verified in the download pass) against plain boto3 `upload_file` / `download_file` of
    the same file with the same TransferConfig on the same endpoint (moto's server, in its own
    process so it does not share this one's GIL); medians of interleaved repeats.
Targets: overhead <= 10% of the tiny pipeline, cached re-run <= 15 s, transfers <= 1.15x boto3.

    python bench/pipeline_bench.py [--small] [--size_gib 1] [--repeats 3] [--dir /tmp/pipeline-bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = {"data": {"synthetic_clips": 8, "frames": 9, "size": "32x32"}, "stage1": {"max_train_epochs": 1}, "stage2": {"max_train_epochs": 1}}


def covered(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def bench_pipeline(root: Path, small: bool) -> None:
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import lora_moe_pipeline
    from tasks.registry.tracking import mlflow_client

    params = {"artifact_root": str(root / "artifacts"), **(SMALL if small else {})}
    with prefect_test_harness(server_startup_timeout=120):
        started = time.monotonic()
        mlflow_client(f"sqlite:///{root / 'artifacts' / 'mlflow.db'}").search_experiments()  # creates the store
        store_s = time.monotonic() - started
        started = time.monotonic()
        first = lora_moe_pipeline(**params)
        wall = time.monotonic() - started + store_s
        commands = covered([(s.started, s.ended) for s in first.stages if s.command_s is not None])
        overhead = wall - commands
        print(
            f"tiny pipeline ({'small' if small else 'make demo'} settings): flow {wall:.1f} s, stage commands "
            f"{commands:.1f} s (sum {sum(s.command_s or 0 for s in first.stages):.1f} s; merges overlap)"
        )
        print(
            f"  orchestration overhead {overhead:.1f} s = {100 * overhead / wall:.1f}% of the flow "
            f"(of which MLflow store creation {store_s:.1f} s, first run on a new store only)   target <= 10%"
        )
        for stage in first.stages:
            print(f"    {stage.name:14s} {stage.state:9s} command {stage.command_s or 0:6.1f} s   task {stage.ended - stage.started:6.1f} s")
        headline = (
            "stage1_overall_improvement_over_base",
            "stage2_learned_roi_improvement_over_stage1",
            "routing_top1_accuracy",
            "hint_correct_vs_wrong_roi_margin",
        )
        print(
            "  eval: "
            + ", ".join(f"{k} {first.metrics[k]:.4f}" for k in headline if k in first.metrics)
            + f"; gate {'passed' if first.gate['passed'] else 'failed'}; registered v{first.registered.version} "
            f"{first.registered.aliases}"
        )
        started = time.monotonic()
        again = lora_moe_pipeline(**params)
        rerun = time.monotonic() - started
        assert again.cached == [s.name for s in again.stages], again.cached
        print(f"cached re-run: {rerun:.2f} s, all {len(again.cached)} stages Cached   target <= 15 s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_s3(root: Path, size_gib: float, repeats: int) -> None:
    import boto3

    from tasks.artifacts.s3 import S3Options, s3_client, transfer_config
    from tasks.artifacts.store import open_store

    port = _free_port()
    env = os.environ | {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    code = (
        "import logging, time; from moto.server import ThreadedMotoServer; "
        "logging.getLogger('werkzeug').setLevel(logging.ERROR); "
        f"s = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False); s.start(); time.sleep(1e9)"
    )
    server = subprocess.Popen([sys.executable, "-c", code], env=env)
    os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        options = S3Options(endpoint_url=endpoint)
        client = s3_client(options)
        client.create_bucket(Bucket="bench")
        store = open_store("s3://bench", options)
        config = transfer_config(options)
        src = root / "file.bin"
        chunk = os.urandom(64 << 20)
        with open(src, "wb") as f:
            for _ in range(int(size_gib * 16)):
                f.write(chunk)
        size = src.stat().st_size
        times: dict[str, list[float]] = {k: [] for k in ("put", "upload_file", "get", "download_file")}
        for i in range(repeats):
            t = time.monotonic()
            ref = store.put(src, f"store/{i}", "bench", "bench")
            times["put"].append(time.monotonic() - t)
            t = time.monotonic()
            boto3.s3.transfer.S3Transfer(client, config).upload_file(str(src), "bench", f"plain/{i}")
            times["upload_file"].append(time.monotonic() - t)
            dest = root / f"got-{i}"
            t = time.monotonic()
            sha, _ = store.get(f"store/{i}", dest, "file")
            times["get"].append(time.monotonic() - t)
            assert sha == ref.sha256
            dest.unlink()
            t = time.monotonic()
            boto3.s3.transfer.S3Transfer(client, config).download_file("bench", f"plain/{i}", str(dest))
            times["download_file"].append(time.monotonic() - t)
            dest.unlink()
            for key in (f"store/{i}", f"plain/{i}"):
                client.delete_object(Bucket="bench", Key=key)
        med = {k: statistics.median(v) for k, v in times.items()}
        gib = size / (1 << 30)
        print(
            f"S3 ({gib:.2f} GiB file, {options.multipart_chunk_mib} MiB parts, {options.max_concurrency} in flight, "
            f"moto at {endpoint}; medians of {repeats}):"
        )
        print(
            f"  put + sha256 {med['put']:.2f} s vs upload_file {med['upload_file']:.2f} s = {med['put'] / med['upload_file']:.2f}x   target <= 1.15x"
        )
        print(
            f"  get + verify {med['get']:.2f} s vs download_file {med['download_file']:.2f} s = "
            f"{med['get'] / med['download_file']:.2f}x   target <= 1.15x"
        )
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="The tests' small settings instead of make demo's.")
    parser.add_argument("--size_gib", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    parser.add_argument("--skip", choices=["pipeline", "s3"], default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # as `python -m flows run` does
    root = Path(tempfile.mkdtemp(prefix="pipeline-bench-", dir=args.dir))
    try:
        if args.skip != "pipeline":
            bench_pipeline(root, args.small)
        if args.skip != "s3":
            bench_s3(root, args.size_gib, args.repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
