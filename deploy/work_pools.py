"""Create (or update) the work pools the deployments run on, on the Prefect API at PREFECT_API_URL.

    python deploy/work_pools.py                          # lora-moe-process, -docker, -kubernetes
    python deploy/work_pools.py --pools process --concurrency 1

    lora-moe-process     one machine: a `prefect worker start --pool lora-moe-process` runs each flow
                         run as a local process that sees the machine's GPUs (the compose stack's worker)
    lora-moe-docker      a docker worker starts each flow run in the worker image with the host's GPUs
                         (job variable `container_create_kwargs`: device_requests; `image`, `volumes`, `env`)
    lora-moe-kubernetes  a kubernetes worker starts each flow run as a Job whose pod gets `gpus`
                         nvidia.com/gpu (job variables `gpus`, `image`, `cache_claim`, `env`)

The pool's concurrency limit is the queue: at most that many flow runs at once (one per GPU
machine or pod), the others wait as Scheduled/Late until a slot frees. The docker and kubernetes
base job templates (`deploy/work-pools/*.json`) are those of prefect-docker 0.7.4 and
prefect-kubernetes 0.8.0 with the worker image, the GPU request, /dev/shm and the download-cache
volume as defaults; the process pool uses Prefect's own template. Their workers need
`pip install prefect-docker` / `prefect-kubernetes` where they run; creating the pools does not.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "work-pools"
KINDS = ("process", "docker", "kubernetes")
POOL_PREFIX = "lora-moe"


def base_job_template(kind: str) -> dict:
    if kind == "process":
        from prefect.workers.process import ProcessWorker

        return ProcessWorker.get_default_base_job_template()
    return json.loads((TEMPLATES / f"{kind}.json").read_text())


def create_work_pools(kinds: list[str], concurrency: int | None) -> list[str]:
    """Create or overwrite `lora-moe-KIND` for each kind; returns the pool names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    names = []
    with get_client(sync_client=True) as client:
        for kind in kinds:
            name = f"{POOL_PREFIX}-{kind}"
            client.create_work_pool(
                WorkPoolCreate(
                    name=name,
                    type=kind,
                    base_job_template=base_job_template(kind),
                    concurrency_limit=concurrency,
                    description=f"wan-lora-moe GPU flow runs ({kind} worker)",
                ),
                overwrite=True,
            )
            names.append(name)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", nargs="+", choices=KINDS, default=list(KINDS), help="Which pools (default: all).")
    parser.add_argument("--concurrency", type=int, default=1, help="Flow runs at once per pool (GPU machines or pods); the rest queue. 0: no limit.")
    args = parser.parse_args(argv)
    try:
        names = create_work_pools(args.pools, args.concurrency or None)
    except Exception as e:  # an unreachable API, a rejected template: one line
        print(f"error: cannot create the work pools: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        return 2
    limit = f"concurrency {args.concurrency}" if args.concurrency else "no concurrency limit"
    print(f"work pools ready ({limit}): {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
