"""The deployments' pull step (`deploy/prefect.yaml`), run by Prefect in each flow-run process
before the flow is imported.

The flow's code is not pulled from anywhere: it is the project installed where the worker runs
(the worker image, or the virtual environment a process worker runs in), and the deployments'
entrypoint is a module path. What the step does instead: refuse a worker whose installed
version is not the one the deployments were made from (a stale image would otherwise run old
code against new parameters), and move the flow run into the worker's scratch folder, so no
folder of the deploying machine is ever part of a deployment.
"""

from __future__ import annotations

import os
from pathlib import Path


def worker_work_dir() -> Path:
    """The worker's scratch folder: LORA_MOE_WORK_DIR (the image sets /cache), else ~/.cache/lora-moe."""
    return Path(os.environ.get("LORA_MOE_WORK_DIR") or Path.home() / ".cache" / "lora-moe")


def check_installed(package_version: str) -> dict[str, str]:
    """Prefect pull step: the installed wan-lora-moe must be `package_version`; returns the
    working directory for the flow run (`directory`, as `set_working_directory` does)."""
    import moe

    if moe.__version__ != package_version:
        raise RuntimeError(
            f"this worker runs wan-lora-moe {moe.__version__}, but the deployment was made for {package_version}: "
            "rebuild the worker image (or reinstall the project on the worker), or deploy again from this version"
        )
    work = worker_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    return {"directory": str(work)}
