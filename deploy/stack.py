"""The server stack without docker, as separate processes on free loopback ports:

    moto      S3 over HTTP (stands in for MinIO): buckets lora-moe (pipeline artifacts) and mlflow
    mlflow    `mlflow server`: SQLite backend store, artifacts on S3, served through the server
              (`--serve-artifacts`, so clients need no S3 access for MLflow's own files)
    prefect   `prefect server start` (SQLite under the stack folder)
    pools     `python deploy/work_pools.py` (the process pool is the one this stack's worker polls)
    deploy    `prefect deploy --all --prefect-file deploy/prefect.yaml` (manual, nightly-retrain)
    worker    `prefect worker start --pool lora-moe-process`: runs each flow run as a process here

    python deploy/stack.py up [--dir outputs/stack] [--no_ui]     (`make stack`; Ctrl-C stops it all)
    python deploy/stack.py ui [--dir outputs/demo]                (`make ui`: the two UIs on a local run)

`ui` opens what a local run wrote (`make demo`, `python -m flows run`): the Prefect server on the
run's database (PREFECT_HOME=DIR/prefect, its UI pointed at its own API) and the MLflow UI on
DIR/mlflow.db, each on a free loopback port.

`tests/test_stack.py` drives the same `Stack`. Every process the stack starts, and everything
those start (flow runs, stage commands, server workers), carries LORA_MOE_STACK_ID in its
environment; `stop()` ends them by pid (SIGTERM, then SIGKILL) and `leftovers()` lists any that
survived, so nothing outlives the stack.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POOL = "lora-moe-process"
ARTIFACT_BUCKET, MLFLOW_BUCKET = "lora-moe", "mlflow"
MARKER = "LORA_MOE_STACK_ID"
GRACE_S = 10.0
# Inherited settings that would point the stack's processes elsewhere (or hand them this
# user's real AWS identity: the stack's S3 is moto, which takes the stack's own credentials).
_DROPPED = ("PREFECT_", "MLFLOW_", "AWS_", "LORA_MOE_")


def free_port(preferred: int = 0) -> int:
    """`preferred` when it is free on the loopback, else any free port."""
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The ports the tools use by default: the links a local run writes into its reports (MLflow
# artifact pages, plots, the contact sheet) point at http://127.0.0.1:5000, so `ui` serves MLflow
# there when it can.
PREFECT_PORT, MLFLOW_PORT = 4200, 5000


@dataclass
class Service:
    name: str
    command: list[str]
    health_url: str | None
    env: dict[str, str]
    process: subprocess.Popen | None = None
    log: Path | None = None

    def start(self, logs: Path) -> None:
        self.log = logs / f"{self.name}.log"
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env, cwd=ROOT, process_group=0
            )

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace") if self.log and self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with code {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.health_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"{self.name} did not answer {self.health_url} within {timeout_s:.0f} s:\n{self.tail()}")


@dataclass
class Stack:
    root: Path
    ui: bool = True
    scheduler: bool = True  # the server's scheduler service: it turns deployment schedules into runs
    base_env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    services: dict[str, Service] = field(default_factory=dict)

    def __post_init__(self):
        self.root = Path(self.root).absolute()
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.stack_id = uuid.uuid4().hex
        self.ports = {name: free_port() for name in ("moto", "mlflow", "prefect")}
        env = {k: v for k, v in self.base_env.items() if not k.startswith(_DROPPED)}
        env |= {
            "AWS_ACCESS_KEY_ID": "lora-moe-stack",
            "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),  # moto takes any
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        self.env = env | {MARKER: self.stack_id, "PYTHONUNBUFFERED": "1"}

    # -- addresses -------------------------------------------------------------------------------

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['moto']}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['mlflow']}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.ports['prefect']}/api"

    @property
    def artifact_root(self) -> str:
        return f"s3://{ARTIFACT_BUCKET}/pipeline"

    @property
    def client_env(self) -> dict[str, str]:
        """The environment of everything that talks to the stack: the worker (and so its flow
        runs), `prefect deploy`, `lora-moe registry`, `lora-moe generate --model`."""
        return self.env | {
            "PREFECT_API_URL": self.prefect_api,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "AWS_ENDPOINT_URL_S3": self.s3_url,
            "LORA_MOE_ARTIFACT_ROOT": self.artifact_root,
            "LORA_MOE_WORK_DIR": str(self.root / "worker"),
            "PREFECT_HOME": str(self.root / "prefect-client"),  # no profile of this machine's user applies
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }

    # -- start -----------------------------------------------------------------------------------

    def start_servers(self, timeout_s: float = 300) -> None:
        """moto, MLflow and Prefect, started together; returns when all three answer."""
        py = sys.executable
        servers = [
            Service("moto", [py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.ports["moto"])], f"{self.s3_url}/moto-api/", self.env),
            Service(
                "mlflow",
                [
                    py,
                    "-m",
                    "mlflow",
                    "server",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.ports["mlflow"]),
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.root / 'mlflow.db'}",
                    "--artifacts-destination",
                    f"s3://{MLFLOW_BUCKET}/",
                    "--serve-artifacts",
                ],
                f"{self.mlflow_url}/health",
                self.env | {"MLFLOW_S3_ENDPOINT_URL": self.s3_url},
            ),
            Service(
                "prefect",
                [py, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.ports["prefect"])],
                f"{self.prefect_api}/health",
                self.env
                | {
                    "PREFECT_HOME": str(self.root / "prefect"),
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_UI_ENABLED": str(self.ui).lower(),
                    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": str(self.scheduler).lower(),
                    "PREFECT_UI_API_URL": self.prefect_api,
                },
            ),
        ]
        for service in servers:
            self.services[service.name] = service
            service.start(self.logs)
        with ThreadPoolExecutor(len(servers)) as pool:
            list(pool.map(lambda s: s.wait_healthy(timeout_s), servers))
        self._create_buckets()

    def _create_buckets(self) -> None:
        import boto3

        s3 = boto3.client(
            "s3",
            endpoint_url=self.s3_url,
            aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
        )
        for bucket in (ARTIFACT_BUCKET, MLFLOW_BUCKET):
            s3.create_bucket(Bucket=bucket)

    def run_tool(self, name: str, command: list[str], timeout_s: float = 300) -> str:
        """A command against the stack (its output in logs/NAME.log); raises with its tail on failure."""
        log = self.logs / f"{name}.log"
        done = subprocess.run(command, capture_output=True, text=True, env=self.client_env, cwd=ROOT, timeout=timeout_s)
        log.write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command[1:4])} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
        return done.stdout

    def deploy(self) -> None:
        """The work pools (the documented script) and the deployments of deploy/prefect.yaml."""
        self.run_tool("work-pools", [sys.executable, "deploy/work_pools.py"])
        self.run_tool("deploy", [sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml"])

    def start_worker(self, timeout_s: float = 120) -> None:
        """A process worker on the stack's pool; returns when the API lists it as online."""
        env = self.client_env | {
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_WORKER_PREFETCH_SECONDS": "5",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": self.env.get("OMP_NUM_THREADS", "1"),
        }
        worker = Service(
            "worker", [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", f"stack-{self.stack_id[:8]}"], None, env
        )
        self.services["worker"] = worker
        worker.start(self.logs)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if worker.process.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.process.returncode}:\n{worker.tail()}")
            workers = self.api("POST", f"/work_pools/{POOL}/workers/filter", {})
            if any(w["name"] == f"stack-{self.stack_id[:8]}" and w.get("status") == "ONLINE" for w in workers):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the worker did not come online within {timeout_s:.0f} s:\n{worker.tail()}")

    def up(self) -> None:
        self.start_servers()
        self.deploy()
        self.start_worker()

    def api(self, method: str, path: str, body: dict | None = None) -> dict | list:
        """One Prefect REST call (JSON in, JSON out)."""
        return api_call(f"{self.prefect_api}{path}", method, body)

    # -- stop ------------------------------------------------------------------------------------

    def processes(self) -> list[int]:
        """Pids of every live process carrying this stack's marker (what it started, at any depth)."""
        needle = f"{MARKER}={self.stack_id}".encode()
        found = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if needle in environ.read_bytes().split(b"\0") and _alive(int(environ.parent.name)):
                    found.append(int(environ.parent.name))
            except OSError:  # gone, or not ours to read
                continue
        return found

    def stop(self, grace_s: float = GRACE_S) -> list[int]:
        """End the worker (and its flow runs) first, then the servers: SIGTERM, SIGKILL after
        `grace_s`. Returns the pids it signalled."""
        signalled = []
        for group in (["worker"], ["prefect", "mlflow", "moto"]):
            pids = [s.process.pid for name, s in self.services.items() if name in group and s.process]
            if group == ["worker"]:
                pids = sorted(set(pids) | (set(self.processes()) - self._server_trees()))
            else:
                pids = sorted(set(pids) | set(self.processes()))
            _terminate(pids, grace_s)
            signalled += pids
        for service in self.services.values():
            if service.process is not None:
                try:
                    service.process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
        return signalled

    def _server_trees(self) -> set[int]:
        """Pids of the servers and their descendants (ended after the worker)."""
        servers = {s.process.pid for name, s in self.services.items() if name != "worker" and s.process}
        parents = _parents()
        tree = set()
        for pid in self.processes():
            p = pid
            while p in parents and p not in servers and p > 1:
                p = parents[p]
            if p in servers:
                tree.add(pid)
        return tree

    def leftovers(self) -> list[int]:
        return self.processes()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> str:
        return "\n".join(
            [
                f"Prefect UI/API   http://127.0.0.1:{self.ports['prefect']}   (PREFECT_API_URL={self.prefect_api})",
                f"MLflow           {self.mlflow_url}",
                f"S3 (moto)        {self.s3_url}   buckets {ARTIFACT_BUCKET}, {MLFLOW_BUCKET}",
                f"work pool        {POOL} (a process worker is running; logs in {self.logs})",
                "deployments      lora-moe-pipeline/manual, lora-moe-pipeline/nightly-retrain",
                "",
                "To use it from another shell:",
                *(
                    f"  export {k}={v}"
                    for k, v in self.client_env.items()
                    if k
                    in (
                        "PREFECT_API_URL",
                        "MLFLOW_TRACKING_URI",
                        "AWS_ENDPOINT_URL_S3",
                        "AWS_ACCESS_KEY_ID",
                        "AWS_SECRET_ACCESS_KEY",
                        "LORA_MOE_WORK_DIR",
                    )
                ),
            ]
        )


RETRY_STATUS = (408, 429, 502, 503)  # what Prefect's own client retries: a busy SQLite server answers 503


def api_call(url: str, method: str, body: dict | None = None, attempts: int = 6) -> dict | list:
    """One JSON REST call, retried with backoff (0.5 s, 1 s, 2 s ...) on the statuses Prefect's
    client retries; any other error status is raised at once (urllib's HTTPError)."""
    for attempt in range(attempts):
        request = urllib.request.Request(
            url, method=method, data=None if body is None else json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            if e.code not in RETRY_STATUS or attempt == attempts - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _parents() -> dict[int, int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return parents


def _terminate(pids: list[int], grace_s: float) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def local_uis(run_dir: Path, base_env: dict[str, str] | None = None) -> list[Service]:
    """The Prefect server (with its UI) on a local run's database and the MLflow UI on its store."""
    run_dir = Path(run_dir).absolute()
    if not (run_dir / "mlflow.db").is_file():
        raise RuntimeError(f"{run_dir} holds no local run (no mlflow.db): run `make demo` first, or pass --dir")
    env = {k: v for k, v in (base_env or dict(os.environ)).items() if not k.startswith(_DROPPED)} | {"PYTHONUNBUFFERED": "1"}
    prefect, mlflow = free_port(PREFECT_PORT), free_port(MLFLOW_PORT)
    api = f"http://127.0.0.1:{prefect}/api"
    py = sys.executable
    return [
        Service(
            "prefect",
            [py, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(prefect)],
            f"{api}/health",
            env
            | {
                "PREFECT_HOME": str(run_dir / "prefect"),
                "PREFECT_UI_API_URL": api,
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
            },
        ),
        Service(
            "mlflow",
            [
                py,
                "-m",
                "mlflow",
                "ui",
                "--host",
                "127.0.0.1",
                "--port",
                str(mlflow),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{run_dir / 'mlflow.db'}",
            ],
            f"http://127.0.0.1:{mlflow}/health",
            env,
        ),
    ]


def serve_uis(run_dir: Path) -> int:
    """`ui`: start both, print where they are, stop both on Ctrl-C or SIGTERM."""
    try:
        services = local_uis(run_dir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logs = Path(run_dir).absolute() / "ui-logs"
    logs.mkdir(exist_ok=True)

    def start() -> None:
        for service in services:
            service.start(logs)
        for service in services:
            service.wait_healthy(300)
        prefect, mlflow = (service.health_url.removesuffix("/api/health").removesuffix("/health") for service in services)
        print(f"Prefect UI  {prefect}\nMLflow UI   {mlflow}\n(logs in {logs}; Ctrl-C stops both)", flush=True)
        if not mlflow.endswith(f":{MLFLOW_PORT}"):
            print(
                f"note: port {MLFLOW_PORT} is taken, so the MLflow links inside the run's reports (images in the "
                f"Prefect artifacts) do not reach this MLflow UI; stop what holds port {MLFLOW_PORT} to fix them",
                flush=True,
            )

    return run_until_stopped(start, lambda: _terminate([s.process.pid for s in services if s.process], GRACE_S))


def run_until_stopped(start, stop) -> int:
    """`start()`, then wait for Ctrl-C or SIGTERM, then `stop()` (also when starting failed)."""
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        start()
        while not stopping:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start the wan-lora-moe server stack on this machine (no docker).")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="Start everything and keep it running until Ctrl-C.")
    up.add_argument("--dir", type=Path, default=ROOT / "outputs" / "stack", help="Stack folder (databases, logs, cache).")
    up.add_argument("--no_ui", "--no-ui", action="store_true", help="Start Prefect without its UI.")
    up.add_argument(
        "--no_scheduler", "--no-scheduler", action="store_true", help="Start Prefect without its scheduler: nightly-retrain makes no runs of its own."
    )
    ui = sub.add_parser("ui", help="Open the Prefect and MLflow UIs on a local run's stores until Ctrl-C.")
    ui.add_argument("--dir", type=Path, default=ROOT / "outputs" / "demo", help="The run's artifact root (make demo's).")
    args = parser.parse_args(argv)
    if args.command == "ui":
        return serve_uis(args.dir)
    stack = Stack(args.dir, ui=not args.no_ui, scheduler=not args.no_scheduler)

    def start() -> None:
        stack.up()
        print(stack.describe(), flush=True)
        print("\nstack is up; Ctrl-C stops it", flush=True)

    def stop() -> None:
        stack.stop()
        left = stack.leftovers()
        print(f"stack stopped{'; still running: ' + ', '.join(map(str, left)) if left else ''}", flush=True)

    return run_until_stopped(start, stop)


if __name__ == "__main__":
    sys.exit(main())
