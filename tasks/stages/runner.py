"""What every stage task does around its one `lora-moe` command: fetch inputs by ref (verified,
through the worker's download cache), run the child in a work folder, store outputs under the
run's prefix, log into a nested MLflow run, and follow a training child's progress.

    WORK_DIR/stages/STAGE/KEY/   the child's folder, KEY = the stage's cache key (a re-run of a
                                 failed stage finds its last saved state here and resumes)
    WORK_DIR/stages/STAGE/KEY.lock  one run at a time in that folder (`tasks.stages.lock`)
    WORK_DIR/downloads/          the download cache (`DownloadCache`)
    ROOT/runs/FLOW_RUN_ID/STAGE/ the stored outputs (write-once)
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import yaml
from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from pydantic import BaseModel, Field

from moe.train.state_names import resumable_states
from tasks.artifacts.download_cache import DownloadCache
from tasks.artifacts.refs import ArtifactRef, DatasetRef
from tasks.artifacts.s3 import S3Options
from tasks.artifacts.store import open_store
from tasks.registry.tracking import StageRun, TrackingContext, stage_run
from tasks.stages.caching import stage_key
from tasks.stages.launcher import CommandResult, run_command, stage_command
from tasks.stages.lock import StageLock


class StageContext(BaseModel):
    """Where and how a stage runs; the flow fills it in. Not part of any cache key."""

    artifact_root: str
    s3: S3Options = S3Options()
    work_dir: str
    run_prefix: str = Field(description="Key prefix of this flow run's outputs: runs/FLOW_RUN_ID.")
    tracking: TrackingContext
    gpus: int = 0
    timeout_s: float | None = None
    stop_grace_s: float = Field(90.0, description="SIGTERM, then SIGKILL after this long (a training child saves its state).")
    flow_run_id: str = ""


class StageTiming(BaseModel):
    started: float  # time.time()
    ended: float
    command_s: float = Field(description="Wall time of the stage's child commands.")


class Stage:
    def __init__(self, name: str, ctx: StageContext, key: str, mlflow: StageRun, lock: StageLock):
        self.name, self.ctx, self.key, self.mlflow, self.lock = name, ctx, key, mlflow, lock
        self.store = open_store(ctx.artifact_root, ctx.s3)
        self.downloads = DownloadCache(Path(ctx.work_dir) / "downloads", ctx.s3)
        self.work = lock.folder
        self.work.mkdir(parents=True, exist_ok=True)
        self.logger = get_run_logger()
        self.started = time.time()
        self.commands: list[CommandResult] = []

    def fetch(self, ref: ArtifactRef) -> Path:
        path = self.downloads.fetch(ref)
        self.logger.info(f"input {ref.kind} {ref.uri} (sha256 {ref.sha256[:12]}) -> {path}")
        return path

    def fetch_dataset(self, dataset: DatasetRef) -> Path:
        """The manifest and its clips, verified, laid out as the manifest names them (links into
        the download cache) under the work folder; returns the local manifest."""
        folder = self.work / "data"
        files = {dataset.manifest.name: dataset.manifest, **dataset.files}
        for relative, ref in files.items():
            link = folder / relative
            link.parent.mkdir(parents=True, exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(self.downloads.fetch(ref))
        self.logger.info(f"dataset {dataset.manifest.uri}: {len(files)} files verified, fingerprint {dataset.fingerprint[:16]}")
        return folder / dataset.manifest.name

    def write_config(self, name: str, values: dict) -> Path:
        """A YAML file of options for the child (paths written as strings)."""
        path = self.work / name
        path.write_text(yaml.safe_dump(json.loads(json.dumps(values, default=str)), sort_keys=False))
        return path

    def run_command(self, command: str, options: dict, gpus: int | None = None, train_log: Path | None = None) -> CommandResult:
        """`lora-moe COMMAND --config FILE`: every option in one YAML file (the command's own
        config, validated by it), so the child sees exactly the settings the run records."""
        config = self.write_config(f"{command.replace(' ', '-')}.yaml", options)
        return self.run([*command.split(), "--config", config], gpus=gpus, train_log=train_log)

    def run(self, args: list, gpus: int | None = None, train_log: Path | None = None) -> CommandResult:
        """`lora-moe ARGS...` as a child; with `train_log`, a progress artifact follows it."""
        command = stage_command([str(a) for a in args], self.ctx.gpus if gpus is None else gpus)
        self.logger.info("running: " + " ".join(command))
        progress = TrainingProgress(train_log, self.name) if train_log is not None else None
        result = run_command(
            command,
            self.name,
            self.logger.info,
            timeout_s=self.ctx.timeout_s,
            on_tick=progress.update if progress else None,
            cwd=self.work,
            grace_s=self.ctx.stop_grace_s,
            keep_fds=(self.lock.fd,),
        )  # the child holds the folder's lock too, until it exits
        self.logger.info(f"{self.name} command finished in {result.wall_s:.1f} s")
        self.commands.append(result)
        return result

    def put(self, path: Path, kind: str, name: str | None = None) -> ArtifactRef:
        key = f"{self.ctx.run_prefix}/{self.name}/{name or path.name}"
        ref = self.store.put(path, key, kind, producer=f"{self.name}@{self.ctx.flow_run_id}")
        self.logger.info(f"stored {kind} {ref.uri} (sha256 {ref.sha256[:12]}, {ref.size} bytes)")
        return ref

    def timing(self) -> StageTiming:
        return StageTiming(started=self.started, ended=time.time(), command_s=sum(c.wall_s for c in self.commands))


@contextlib.contextmanager
def open_stage(ctx: StageContext, tags: dict[str, str] | None = None) -> Iterator[Stage]:
    """The running task's `Stage`, inside its nested MLflow run, holding its work folder's lock
    (taken before the MLflow run, so a run that waits and then finds the stage done elsewhere
    leaves no run behind)."""
    run_ctx = TaskRunContext.get()
    name = run_ctx.task.name
    key = stage_key(name, run_ctx.parameters)
    work = Path(ctx.work_dir) / "stages" / name / key.rsplit("-", 1)[-1][:16]
    lock = StageLock(work, {"flow_run_id": ctx.flow_run_id, "task_run_id": str(run_ctx.task_run.id)})
    lock.acquire(ctx.timeout_s, get_run_logger().info, refresh=bool(run_ctx.task.refresh_cache))
    outcome = "failed"
    try:
        with stage_run(ctx.tracking, name, (tags or {}) | {"prefect.task_run_id": str(run_ctx.task_run.id)}) as mlflow:
            stage = Stage(name, ctx, key, mlflow, lock)
            if run_ctx.task.refresh_cache and run_ctx.task_run.run_count <= 1:
                # Forced recompute: start clean rather than resume an earlier run's state.
                shutil.rmtree(stage.work, ignore_errors=True)
                stage.work.mkdir(parents=True)
            yield stage
        outcome = "completed"
    finally:
        lock.finish(outcome)


def saved_states(output_dir: Path) -> list[Path]:
    """The states a resumed run continues from, oldest first: `state-epoch-N/` and
    `state-epoch-N-step-S/` (`moe.train.state_names`, which `--resume` reads the same way)."""
    return resumable_states(output_dir)


class TrainingProgress:
    """A Prefect progress artifact that follows a training child's `train_log.jsonl`."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage = path, stage
        self.offset, self.artifact_id, self.last = 0, None, None

    def update(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            f.seek(self.offset)
            for line in f:
                if line.endswith("\n"):
                    self.offset += len(line.encode())
                    record = json.loads(line)
                    if record.get("total_steps"):
                        self.last = record
        if self.last is None:
            return
        done = 100.0 * self.last["step"] / self.last["total_steps"]
        loss = self.last.get("train/loss", self.last.get("loss"))
        text = f"{self.stage}: step {self.last['step']}/{self.last['total_steps']}, epoch {self.last.get('epoch', 0)}" + (
            f", loss {loss:.4f}" if isinstance(loss, float) else ""
        )
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(done, key=f"{self.stage}-progress", description=text)
        else:
            update_progress_artifact(self.artifact_id, done, description=text)
