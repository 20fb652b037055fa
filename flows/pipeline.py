"""The `lora-moe-pipeline` flow (SPEC section 9):

    synth-data (embedded default) | resolve-inputs (URIs)  -> [check-new-data]  -> [tiny-models]
      -> prepare-data -> stage1-train -> merge-low || merge-high -> stage2-train -> eval -> register

Scheduled retraining (`only_new_data`, the `nightly-retrain` deployment): the data fingerprint is
computed first and compared with the one recorded on the current `champion`; when they are equal
the run completes at once with a markdown artifact "no new clips since version N" and trains
nothing. `stage2_from_champion` starts stage 2 from the champion's merged DiTs instead of
training stage 1 and merging again (`champion-stage1`; the README weighs the trade-off).

Stages hand each other refs (URI + sha256) through the artifact store; each stage is cached on
its inputs' hashes, its config and the package version (`tasks.stages.caching`), so a re-run skips
what did not change and a failed run resumes at the failed stage. One MLflow parent run per
flow run, a nested run per stage that ran, one registry version per run that registered (with a
model card; a Prefect event when `champion` moves to it). What a person sees of a run in the
Prefect UI (name, tags, settings, summary, report) is `flows.surfaces`. The flow process never
imports torch: every stage is a child process (`tasks.stages.launcher`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from pydantic import BaseModel

from flows import surfaces
from flows.params import (
    DataSettings,
    EvalSettings,
    MergeSettings,
    ModelInputs,
    Preset,
    PromotionGate,
    Resources,
    RunPlan,
    Stage1Settings,
    Stage2Settings,
    StageName,
    StageResources,
    StorageSettings,
    TrackingSettings,
    forced_stages,
    plan_run,
)
from moe.config.file_names import EVAL_REPORT_FILE
from tasks.artifacts.refs import ArtifactRef
from tasks.artifacts.s3 import endpoint_url
from tasks.registry.tracking import (
    StageRun,
    TrackingContext,
    artifact_url,
    bound_mlflow_requests,
    clip_datasets,
    end_run,
    log_datasets,
    pin_mlflow_s3_endpoint,
    start_pipeline_run,
)
from tasks.registry.versions import RegistryEntry
from tasks.stages import prefect_tasks as stages
from tasks.stages.caching import StoreResultStorage
from tasks.stages.launcher import terminate_all
from tasks.stages.runner import StageContext

FLOW_NAME = "lora-moe-pipeline"


class StageReport(BaseModel):
    name: str
    state: str  # Completed, Cached, ...
    command_s: float | None = None  # wall time of its child commands (None when cached)
    started: float | None = None
    ended: float | None = None


class PipelineSummary(BaseModel):
    flow_run_id: str
    artifact_root: str
    tracking_uri: str
    mlflow_run_url: str
    registry_url: str
    registered: RegistryEntry  # a skipped run: the champion it left in place
    data_fingerprint: str
    stages: list[StageReport]
    artifacts: dict[str, ArtifactRef]
    metrics: dict[str, float]
    gate: dict[str, Any]
    skipped: str | None = None  # why nothing was trained ("no new clips since version N")
    stage1_from_version: str | None = None  # stage 2 started from this champion's merged DiTs
    report_url: str | None = None  # report.md in the parent MLflow run's artifacts (its UI page)
    task: str = ""  # the model task (tiny-t2v, t2v-A14B ...)

    @property
    def cached(self) -> list[str]:
        return [s.name for s in self.stages if s.state == "Cached"]


def signature_problem(parameters: dict[str, Any]) -> str | None:
    """One line naming the parameters the flow does not take (None: there are none)."""
    import difflib
    import inspect

    known = list(inspect.signature(lora_moe_pipeline.fn).parameters)
    unknown = [name for name in parameters if name not in known]
    if not unknown:
        return None
    guesses = [f" (did you mean {match[0]!r}?)" if (match := difflib.get_close_matches(name, known, n=1)) else "" for name in unknown]
    names = ", ".join(f"{name!r}{guess}" for name, guess in zip(unknown, guesses))
    return f"unknown parameter{'s' if len(unknown) > 1 else ''} {names}; {FLOW_NAME} takes: {', '.join(known)}"


def explain_crash(flow, flow_run, state) -> None:
    """`on_crashed` hook (run by the worker when a flow-run process dies): a run that never
    started because its parameters do not fit the flow's signature (Prefect binds them before
    the flow can validate anything, so the process dies with the reason in a traceback only)
    is marked Failed with that reason as its one-line state message."""
    from prefect import get_client
    from prefect.states import Failed

    problem = signature_problem(dict(flow_run.parameters or {}))
    if problem is None:
        return
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Failed(message=f"Invalid parameters: {problem}"), force=True)


class _Runner:
    """Calls the stage tasks with this run's options: result storage in the artifact root,
    `refresh_cache` for forced stages, per-stage GPUs (resolved) and timeout; records each
    stage's state."""

    def __init__(self, ctx: StageContext, results: StoreResultStorage, forced: set[str]):
        self.ctx, self.results, self.forced = ctx, results, forced
        self.reports: list[StageReport] = []

    def task(self, task, resources: StageResources | None):
        options = {"retries": resources.retries} if resources is not None else {}
        return task.with_options(result_storage=self.results, refresh_cache=task.name in self.forced or None, **options)

    def context(self, resources: StageResources | None) -> StageContext:
        if resources is None:
            return self.ctx
        return self.ctx.model_copy(
            update={"gpus": resources.gpus, "timeout_s": resources.timeout_minutes * 60, "stop_grace_s": resources.stop_grace_s}
        )

    def _record(self, name: str, state, value):
        timing = getattr(value, "timing", None)
        self.reports.append(
            StageReport(
                name=name,
                state=state.name,
                command_s=timing.command_s if timing is not None and state.name != "Cached" else None,
                started=timing.started if timing is not None else None,
                ended=timing.ended if timing is not None else None,
            )
        )
        return value

    def __call__(self, task, *args, resources: StageResources | None = None, **kwargs):
        state = self.task(task, resources)(*args, ctx=self.context(resources), return_state=True, **kwargs)
        return self._record(task.name, state, state.result())

    def submit(self, task, *args, resources: StageResources | None = None, **kwargs):
        """Start a task concurrently; `result()` waits for it."""
        return task.name, self.task(task, resources).submit(*args, ctx=self.context(resources), **kwargs)

    def result(self, submitted):
        name, future = submitted
        future.wait()
        return self._record(name, future.state, future.result())


@flow(
    name=FLOW_NAME,
    persist_result=False,
    log_prints=True,
    on_crashed=[explain_crash],
    flow_run_name=surfaces.run_name,
    description="Two-stage Wan2.2 LoRA-MoE: data -> stage 1 -> merge both experts -> stage 2 -> eval -> registry.",
)
def lora_moe_pipeline(
    preset: Preset = "tiny",
    artifact_root: str | None = None,
    models: ModelInputs = ModelInputs(),
    data: DataSettings = DataSettings(),
    stage1: Stage1Settings = Stage1Settings(),
    merge: MergeSettings = MergeSettings(),
    stage2: Stage2Settings = Stage2Settings(),
    evaluation: EvalSettings = EvalSettings(),
    gate: PromotionGate = PromotionGate(),
    tracking: TrackingSettings = TrackingSettings(),
    storage: StorageSettings = StorageSettings(),
    resources: Resources = Resources(),
    force: StageName | None = None,
    only_new_data: bool = False,
    stage2_from_champion: bool = False,
) -> PipelineSummary:
    """Train, evaluate and register a LoRA-MoE.

    Args:
        preset: tiny (= tiny-t2v), tiny-i2v, t2v-A14B, i2v-A14B or ti2v-5B. The tiny presets make their own model
            set and synthetic data when no URIs are given, and train with `lora-moe workflow run`'s settings.
        artifact_root: s3://bucket/prefix or a local folder: every stage's outputs (write-once, under
            runs/FLOW_RUN_ID/), the stage cache records and, for a local root, the MLflow database. Empty:
            the worker's LORA_MOE_ARTIFACT_ROOT, else outputs/pipeline.
        models: Base DiTs and components by URI (empty with a tiny preset: the embedded tiny set).
        data: Clip manifest URI (empty: synthetic clips) and latent-cache settings.
        stage1: Stage-1 training options (the `lora-moe stage1` flags); empty = the preset's value.
        merge: How the stage-1 LoRA is folded into both experts.
        stage2: Stage-2 training options (the `lora-moe stage2` flags); targets and ranks are stage 1's.
        evaluation: `lora-moe eval` options (held-out clips, seed, bootstrap, samples); empty = the preset's value.
        gate: The promotion gate: thresholds a model must pass to take the registry alias `champion`.
        tracking: MLflow tracking URI, experiment and registered model name.
        storage: S3 options (endpoint, checksums, retries, part size) and the worker's scratch folder.
        resources: GPUs, timeout and retries per stage.
        force: Recompute this stage and every stage after it, even when cached.
        only_new_data: Compare the data fingerprint with the one recorded on the current champion first, and
            train nothing when they are equal (the run completes with "no new clips since version N").
        stage2_from_champion: Start stage 2 from the champion's merged DiTs (skipping stage 1 and the merges)
            when there is a champion trained on the same base DiTs. Faster, but stage 1 never sees the new clips.
    """
    run = FlowRunContext.get().flow_run
    plan = plan_run(run, dict(os.environ), preset, artifact_root, models, data, stage1, merge, stage2, evaluation, gate, tracking, storage, resources)
    options = {"force": force or "", "only_new_data": only_new_data, "stage2_from_champion": stage2_from_champion}
    name = tracking.registered_model
    with tracked_run(plan, run, tracking, storage, force, options) as (ctx, call):
        given = models.given()
        inputs = call(stages.resolve_inputs, plan.task, given, data.manifest) if given or data.manifest else stages.InputRefs()
        synth = (data.synthetic_clips, plan.data["frames"], plan.data["size"], data.synthetic_seed, data.val_fraction)
        dataset = inputs.dataset or call(stages.synth_data, *synth).dataset
        if only_new_data and not (check := call(stages.check_new_data, name, dataset)).new:
            return _skipped(ctx, call, check, name, plan.root_uri)
        model_refs = inputs.models or call(stages.tiny_models, plan.task, models.tiny_seed, models.tiny_pretrain_steps).models
        prepared = call(stages.prepare_data, dataset, model_refs, plan.data, resources=plan.resources.prepare_data)
        cache, fingerprint = prepared.cache, prepared.data_fingerprint
        surfaces.tag_flow_run(f"data:{fingerprint[:12]}")
        training_data = clip_datasets(dataset, cache, "training")
        log_datasets(plan.tracking_uri, ctx.parent_run_id, training_data)
        previous = call(stages.champion_stage1, name, model_refs) if stage2_from_champion else None
        merged = from_champion(previous) if previous else train_stage1_and_merge(call, plan, model_refs, cache, merge)
        s2 = call(stages.stage2_train, plan.task, merged.low, merged.high, cache, plan.stage2, models=model_refs, resources=plan.resources.stage2)
        for run_id in merged.training_run_ids + [s2.mlflow_run_id]:  # the training runs' "Datasets"
            log_datasets(plan.tracking_uri, run_id, training_data)
        dits = (model_refs, merged.low, merged.high, s2.weights)
        ev = call(stages.evaluate, *dits, cache, dataset, plan.eval, plan.gate, resources=plan.resources.eval)
        artifacts, producers = registered_artifacts(model_refs, cache, merged, s2, ev)
        reg = call(stages.register, name, plan.task, artifacts, ev, fingerprint, merged.from_version, dataset=dataset, producers=producers)
        return finish_run(plan, ctx, call, reg.entry, ev, merged, s2, artifacts, fingerprint, training_data, storage)


class MergedDiTs(BaseModel):
    """What stage 2 starts from: this run's stage 1 and merges, or a champion's."""

    vanilla: ArtifactRef
    low: ArtifactRef
    high: ArtifactRef | None
    stage1_metrics: dict[str, Any] = {}
    training_run_ids: list[str] = []  # the MLflow runs that trained on this run's clips
    producers: dict[str, str] = {}  # artifact -> the MLflow run that made it
    from_version: str | None = None  # the champion whose merged DiTs these are


def registered_artifacts(model_refs, cache: ArtifactRef, merged: MergedDiTs, s2, ev) -> tuple[dict[str, ArtifactRef], dict[str, str]]:
    """What a registry version holds (artifact name -> ref) and which MLflow run made each (lineage)."""
    artifacts = (
        {f"base_{k}": v for k, v in model_refs.refs().items()}
        | {
            "latent_cache": cache,
            "vanilla_lora": merged.vanilla,
            "merged_low_noise": merged.low,
            "lora_moe": s2.weights,
            "eval_report": ev.report,
        }
        | ({"merged_high_noise": merged.high} if merged.high else {})
    )
    return artifacts, merged.producers | {"lora_moe": s2.mlflow_run_id, "eval_report": ev.mlflow_run_id}


def train_stage1_and_merge(call: _Runner, plan: RunPlan, model_refs, cache: ArtifactRef, merge: MergeSettings) -> MergedDiTs:
    """Stage 1, then its LoRA merged into both experts at once (merge-low || merge-high)."""
    s1 = call(stages.stage1_train, model_refs, cache, plan.stage1, resources=plan.resources.stage1)
    merges = [
        call.submit(task, plan.task, dit, s1.weights, merge.lora_multiplier, name, resources=plan.resources.merge)
        for task, dit, name in (
            (stages.merge_low, model_refs.dit, "merged_low_noise"),
            (stages.merge_high, model_refs.dit_high_noise, "merged_high_noise"),
        )
        if dit is not None
    ]
    low, *high = [call.result(future) for future in merges]
    producers = {"vanilla_lora": s1.mlflow_run_id, "merged_low_noise": low.mlflow_run_id}
    return MergedDiTs(
        vanilla=s1.weights,
        low=low.merged,
        high=high[0].merged if high else None,
        stage1_metrics=s1.metrics,
        training_run_ids=[s1.mlflow_run_id],
        producers=producers | ({"merged_high_noise": high[0].mlflow_run_id} if high else {}),
    )


def from_champion(previous) -> MergedDiTs:
    get_run_logger().info(f"stage 2 starts from champion v{previous.version}'s merged DiTs (stage 1 and merges reused)")
    return MergedDiTs(vanilla=previous.vanilla_lora, low=previous.merged_low_noise, high=previous.merged_high_noise, from_version=previous.version)


@contextlib.contextmanager
def tracked_run(
    plan: RunPlan, run, tracking: TrackingSettings, storage: StorageSettings, force: str | None, options: dict[str, Any]
) -> Iterator[tuple[TrackingContext, _Runner]]:
    """The run's surroundings: its tags and settings artifact, the parent MLflow run (with a
    bound on MLflow's retries, so a dead tracking server fails the run in minutes), the stage
    runner; at the end, a failed parent run on an error and no stage command left running."""
    logger = get_run_logger()
    surfaces.tag_flow_run(f"task:{plan.task}", f"preset:{plan.preset}")
    create_markdown_artifact(
        surfaces.settings_markdown(f"{FLOW_NAME} ({plan.task})", plan.settings),
        key=surfaces.SETTINGS_KEY,
        description="The settings every stage runs with, and where each came from",
    )
    unbound_requests = bound_mlflow_requests(tracking)
    try:
        mlflow_ctx = start_pipeline_run(
            tracking,
            plan.tracking_uri,
            f"{plan.root_uri}/mlflow-artifacts",
            tags={
                "prefect.flow_run_id": str(run.id),
                "prefect.flow_run_name": run.name,
                "preset": plan.preset,
                "artifact_root": plan.root_uri,
                "mlflow.source.name": "flows.pipeline:lora_moe_pipeline",
                "mlflow.source.type": "JOB",
            },
            params={"preset": plan.preset, **surfaces.plain_settings({k: v for k, v in plan.settings.items() if k != "resources"}), **options},
            ui_url=tracking.resolved_ui_url(plan.tracking_uri, dict(os.environ)),
            flow_run_ended=_flow_run_ended,
        )
    except BaseException:
        unbound_requests()
        raise
    logger.info(f"MLflow run {mlflow_ctx.run_url(mlflow_ctx.parent_run_id)} ({plan.tracking_uri})")
    ctx = StageContext(
        artifact_root=plan.root_uri,
        s3=storage.s3,
        work_dir=str(plan.work_dir),
        run_prefix=f"runs/{run.id}",
        tracking=mlflow_ctx,
        flow_run_id=str(run.id),
    )
    call = _Runner(ctx, StoreResultStorage.saved(plan.root_uri, storage.s3), forced_stages(force))
    unpin_endpoint = pin_mlflow_s3_endpoint(endpoint_url(storage.s3) if plan.local_root is None else None)
    try:
        yield mlflow_ctx, call
    except BaseException:
        _end_quietly(mlflow_ctx, "FAILED")
        raise
    finally:
        unpin_endpoint()
        unbound_requests()
        stopped = terminate_all()
        if stopped:
            logger.warning(f"stopped stage commands still running: {', '.join(stopped)}")


def finish_run(
    plan: RunPlan,
    ctx: TrackingContext,
    call: _Runner,
    entry: RegistryEntry,
    ev,
    merged: MergedDiTs,
    s2,
    artifacts: dict[str, ArtifactRef],
    data_fingerprint: str,
    training_data,
    storage: StorageSettings,
) -> PipelineSummary:
    """The run's summary, written to the parent MLflow run and as the Prefect artifacts."""
    report_dir = _log_report(ctx, ev.report, plan.work_dir, storage)
    metrics = (
        ev.metrics
        | {f"stage1/{k}": v for k, v in merged.stage1_metrics.items() if isinstance(v, (int, float))}
        | {f"stage2/{k}": v for k, v in s2.metrics.items() if isinstance(v, (int, float))}
    )
    run = FlowRunContext.get().flow_run
    summary = PipelineSummary(
        flow_run_id=str(run.id),
        artifact_root=plan.root_uri,
        tracking_uri=plan.tracking_uri,
        task=plan.task,
        mlflow_run_url=ctx.run_url(ctx.parent_run_id),
        registry_url=_version_url(ctx, entry),
        registered=entry,
        data_fingerprint=data_fingerprint,
        stages=call.reports,
        artifacts=artifacts,
        metrics={k: float(v) for k, v in metrics.items()},
        gate=ev.gate,
        stage1_from_version=merged.from_version,
        report_url=ctx.artifact_page_url(ctx.parent_run_id, f"{surfaces.REPORT_PREFIX}/report.md"),
    )
    new_version = "register" not in summary.cached
    _finish_parent_run(ctx, summary, ev.metrics, training_data[0] if new_version else None)
    _publish(summary, ctx, report_dir)
    surfaces.tag_flow_run(
        f"registered:v{entry.version}",
        f"gate:{'passed' if ev.gate.get('passed') else 'failed'}",
        *(["champion"] if entry.champion_moved and new_version else []),
    )
    return summary


def _flow_run_ended(flow_run_id: str) -> bool | None:
    """Whether Prefect records this flow run in a final state (None: it does not know the run)."""
    from uuid import UUID

    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(UUID(flow_run_id)).state
    except Exception:  # another Prefect server's run, or none at all
        return None
    return None if state is None else state.is_final()


def _version_url(ctx: TrackingContext, entry: RegistryEntry) -> str:
    return ctx.version_url(entry.name, entry.version)


def _skipped(ctx: TrackingContext, call: _Runner, check: stages.NewDataCheck, model_name: str, root_uri: str) -> PipelineSummary:
    """The early end of a run whose data the champion was already trained on."""
    why = f"no new clips since version {check.champion_version}"
    run = FlowRunContext.get().flow_run
    champion = RegistryEntry(name=model_name, version=check.champion_version, aliases=["champion"], champion_decision=f"unchanged: {why}")
    summary = PipelineSummary(
        flow_run_id=str(run.id),
        artifact_root=root_uri,
        tracking_uri=ctx.tracking_uri,
        mlflow_run_url=ctx.run_url(ctx.parent_run_id),
        registry_url=_version_url(ctx, champion),
        registered=champion,
        data_fingerprint=check.data_fingerprint,
        stages=call.reports,
        artifacts={},
        metrics={},
        gate={},
        skipped=why,
    )
    get_run_logger().info(f"{why} (data fingerprint {check.data_fingerprint[:16]}): nothing to train")
    create_markdown_artifact(
        "\n".join(
            [
                f"# {FLOW_NAME}: {why}",
                f"The data fingerprint `{check.data_fingerprint[:16]}` equals the one recorded on "
                f"[{model_name} v{check.champion_version}]({summary.registry_url}) (`champion`), so nothing was trained "
                "and the champion stays. Add clips to the manifest (or change it) and the next run trains.",
            ]
        ),
        key=surfaces.SUMMARY_KEY,
        description=why,
    )
    StageRun(ctx, ctx.parent_run_id).set_tags(
        {"skipped": why, "data_fingerprint": check.data_fingerprint, "champion_version": check.champion_version}
    )
    surfaces.tag_flow_run(f"data:{check.data_fingerprint[:12]}", "skipped")
    end_run(ctx, ctx.parent_run_id, "FINISHED")
    return summary


def _log_report(ctx: TrackingContext, report: ArtifactRef, work_dir: Path, storage: StorageSettings) -> Path | None:
    """The eval folder (report.md, plots, eval_report.json, samples) into the parent MLflow run
    under `eval/`, also when the eval stage was cached; returns it as a local folder (None when
    it could not be fetched: the summary then goes without the report)."""
    from tasks.artifacts.download_cache import DownloadCache

    try:
        folder = DownloadCache(work_dir / "downloads", storage.s3).fetch(report)
        StageRun(ctx, ctx.parent_run_id).log_artifact(folder, surfaces.REPORT_PREFIX)
        return folder
    except Exception as e:  # a view of the report; the stages and the registry version are complete
        get_run_logger().warning(f"could not attach the eval report to the MLflow run: {e}")
        return None


def _finish_parent_run(ctx: TrackingContext, summary: PipelineSummary, eval_metrics: dict[str, float], clips=None) -> None:
    """The parent run: what was registered (tags), every metric, the refs as artifacts.json.
    `clips`: the clips' dataset input when this run registered a new version: then the eval
    metrics are also the version's logged model's metrics, measured on those clips."""
    import time

    from mlflow.entities import Metric

    parent = StageRun(ctx, ctx.parent_run_id)
    parent.set_tags(
        {
            "registered_model": summary.registered.name,
            "registered_version": summary.registered.version,
            "data_fingerprint": summary.data_fingerprint,
            "cached_stages": ",".join(summary.cached) or "none",
            "gate.passed": str(bool(summary.gate.get("passed"))).lower(),
        }
        | ({"stage1_from_version": summary.stage1_from_version} if summary.stage1_from_version else {})
    )
    model_id = summary.registered.model_id if clips is not None else None
    linked = {k for k in eval_metrics if k in summary.metrics} if model_id else set()
    parent.log_metrics({k: v for k, v in summary.metrics.items() if k not in linked})
    if linked:
        now = int(time.time() * 1000)
        parent.client.log_batch(
            ctx.parent_run_id,
            metrics=[
                Metric(k, float(summary.metrics[k]), now, 0, model_id=model_id, dataset_name=clips.dataset.name, dataset_digest=clips.dataset.digest)
                for k in sorted(linked)
            ],
        )
    parent.client.log_dict(ctx.parent_run_id, {k: json.loads(r.model_dump_json()) for k, r in summary.artifacts.items()}, "artifacts.json")
    end_run(ctx, ctx.parent_run_id, "FINISHED")


def _end_quietly(ctx: TrackingContext, status: str) -> None:
    try:
        end_run(ctx, ctx.parent_run_id, status)
    except Exception as e:  # the failure that got us here matters more
        logging.getLogger(__name__).warning(f"could not end MLflow run {ctx.parent_run_id}: {e}")


def _publish(summary: PipelineSummary, ctx: TrackingContext, report_dir: Path | None) -> None:
    """The run's Prefect artifacts: the summary (the gate's checks first, then what was
    registered, stage states, artifacts, links), the eval report with its plots (links into the
    parent MLflow run's artifacts) and a table of the metrics."""
    entry = summary.registered
    if "register" in summary.cached:
        champion = "registered by an earlier run (nothing changed since)"
    elif entry.champion_moved:
        champion = "`champion` moved to it" + (f" from v{entry.previous_champion}" if entry.previous_champion else "")
    else:
        champion = "`champion` stays" + (f" on v{entry.previous_champion}" if entry.previous_champion else "")

    def url_of(path: str) -> str:  # an eval file, as the parent MLflow run's copy
        return artifact_url(ctx.ui_url, ctx.parent_run_id, f"{surfaces.REPORT_PREFIX}/{path}")

    report_json = report_dir / EVAL_REPORT_FILE if report_dir is not None else None
    sheet = json.loads(report_json.read_text()).get("contact_sheet") if report_json is not None and report_json.is_file() else None
    lines = [
        f"# {FLOW_NAME}: {entry.name} v{entry.version}",
        "",
        *surfaces.gate_lines(summary.gate, summary.report_url),
        "",
        *surfaces.glance_lines(summary.metrics, url_of(sheet) if sheet else None),
        "## Registered",
        "",
        f"**{entry.name} v{entry.version}** (aliases: {', '.join(entry.aliases) or 'none'}): {entry.champion_decision}; {champion}.",
        *(
            [f"Stage 2 started from champion v{summary.stage1_from_version}'s merged DiTs (stage 1 not retrained)."]
            if summary.stage1_from_version
            else []
        ),
        f"[MLflow run]({summary.mlflow_run_url}) · [registry version]({summary.registry_url})"
        + (f" · [eval report]({summary.report_url})" if summary.report_url else "")
        + f" · data fingerprint `{summary.data_fingerprint[:16]}`",
        "",
        "| stage | state | command s |",
        "|---|---|---|",
        *(f"| {s.name} | {s.state} | {'' if s.command_s is None else f'{s.command_s:.1f}'} |" for s in summary.stages),
        "",
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {v:.6g} |" for k, v in summary.metrics.items()),
        "",
        "| artifact | URI | sha256 |",
        "|---|---|---|",
        *(f"| {k} | `{r.uri}` | `{r.sha256[:16]}` |" for k, r in summary.artifacts.items()),
    ]
    verdict = "gate passed" if summary.gate.get("passed") else "gate FAILED"
    create_markdown_artifact(
        "\n".join(lines), key=surfaces.SUMMARY_KEY, description=f"{entry.name} v{entry.version}: {verdict}; what this run produced"
    )
    report = report_dir / "report.md" if report_dir is not None else None
    if report is not None and report.is_file():
        create_markdown_artifact(
            surfaces.rewrite_links(report.read_text(), url_of),
            key=surfaces.REPORT_KEY,
            description=f"Eval report of {entry.name} v{entry.version} (plots from the MLflow run)",
        )
    create_table_artifact(
        [{"metric": k, "value": v} for k, v in summary.metrics.items()], key=surfaces.METRICS_KEY, description="Eval and held-out metrics"
    )
