"""The `lora-moe-pipeline` flow (SPEC section 9):

    synth-data (embedded default) | resolve-inputs (URIs)  -> [check-new-data]  -> [tiny-models]
      -> prepare-data -> stage1-train -> merge-low || merge-high -> stage2-train -> eval -> register

Scheduled retraining (`only_new_data`, the `nightly-retrain` deployment): the data fingerprint is
computed first and compared with the one recorded on the current `champion`; when they are equal
the run completes at once with a markdown artifact "no new clips since version N" and trains
nothing. `stage2_from_champion` starts stage 2 from the champion's merged DiTs instead of
training stage 1 and merging again (`champion-stage1`; the README weighs the trade-off).

Stages hand each other refs (URI + sha256) through the artifact store; each stage is cached on
its inputs' hashes, its config and the package version (`tasks.caching`), so a re-run skips
what did not change and a failed run resumes at the failed stage. One MLflow parent run per
flow run, a nested run per stage that ran, one registry version per run that registered. The
flow process never imports torch: every stage is a child process (`tasks.launcher`).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext
from pydantic import BaseModel

from flows.params import (
    TINY_EVAL,
    TINY_STAGE1,
    TINY_STAGE2,
    DataSettings,
    EvalSettings,
    MergeSettings,
    ModelInputs,
    Preset,
    PromotionGate,
    Resources,
    Stage1Settings,
    Stage2Settings,
    StageName,
    StageResources,
    StorageSettings,
    TrackingSettings,
    forced_stages,
    resolve_settings,
)
from moe.errors import MoeError
from moe.train.config import TARGET_FLAGS
from moe.wan.presets import PRESETS
from moe.workflow import TINY_PRESETS
from tasks import stages
from tasks.artifacts.refs import ArtifactRef
from tasks.artifacts.s3 import endpoint_url
from tasks.artifacts.store import open_store
from tasks.caching import StoreResultStorage
from tasks.launcher import terminate_all
from tasks.registry import RegistryEntry
from tasks.stage import StageContext
from tasks.trust import check_run
from tasks.tracking import (
    StageRun,
    TrackingContext,
    bound_mlflow_requests,
    end_run,
    pin_mlflow_s3_endpoint,
    ref_tags,
    start_pipeline_run,
)

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

    @property
    def cached(self) -> list[str]:
        return [s.name for s in self.stages if s.state == "Cached"]


def _local_root(uri: str) -> Path | None:
    if uri.startswith("s3://"):
        return None
    from tasks.artifacts.local import local_path

    return local_path(uri)


def check_models(preset: str, models: ModelInputs) -> None:
    """Either every base model URI the preset needs, or none with a tiny preset."""
    task, tiny = TINY_PRESETS.get(preset, preset), preset in TINY_PRESETS
    given = models.given()
    if not given:
        if not tiny:
            raise MoeError(f"preset {task} needs the base model URIs (models.dit, models.dit_high_noise, models.vae, "
                           "models.text_encoder, models.tokenizer); only the tiny presets make their own")
        return
    needed = {"dit", "vae", "text_encoder", "tokenizer"} | ({"dit_high_noise"} if PRESETS[task].boundary is not None else set())
    missing = sorted(needed - set(given))
    if missing:
        raise MoeError(f"models: {', '.join(missing)} not given; pass every base model URI or none (tiny presets only)")


def check_trust(run, artifact_root: str, models: ModelInputs, data: DataSettings, tracking: TrackingSettings,
                storage: StorageSettings) -> None:
    """The worker's trust boundary (`tasks.trust`): a deployment run's form cannot redirect the
    worker's credentials, and every URI lies inside the worker's allow-lists."""
    inputs = {f"models.{k}": v for k, v in models.given().items()} | ({"data.manifest": data.manifest} if data.manifest else {})
    check_run(dict(os.environ), deployment_run=run.deployment_id is not None, artifact_root=artifact_root,
              tracking_uri=tracking.tracking_uri, s3_endpoint=storage.s3.endpoint_url, s3_profile=storage.s3.profile,
              work_dir=storage.work_dir, inputs=inputs)


def signature_problem(parameters: dict[str, Any]) -> str | None:
    """One line naming the parameters the flow does not take (None: there are none)."""
    import difflib
    import inspect

    known = list(inspect.signature(lora_moe_pipeline.fn).parameters)
    unknown = [name for name in parameters if name not in known]
    if not unknown:
        return None
    guesses = [f" (did you mean {match[0]!r}?)" if (match := difflib.get_close_matches(name, known, n=1)) else ""
               for name in unknown]
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
        return self.ctx.model_copy(update={"gpus": resources.gpus, "timeout_s": resources.timeout_minutes * 60,
                                           "stop_grace_s": resources.stop_grace_s})

    def _record(self, name: str, state, value):
        timing = getattr(value, "timing", None)
        self.reports.append(StageReport(
            name=name, state=state.name,
            command_s=timing.command_s if timing is not None and state.name != "Cached" else None,
            started=timing.started if timing is not None else None, ended=timing.ended if timing is not None else None,
        ))
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


@flow(name=FLOW_NAME, persist_result=False, log_prints=True, on_crashed=[explain_crash],
      description="Two-stage Wan2.2 LoRA-MoE: data -> stage 1 -> merge both experts -> stage 2 -> eval -> registry.")
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
    logger = get_run_logger()
    run = FlowRunContext.get().flow_run
    task_name = TINY_PRESETS.get(preset, preset)
    tiny = preset in TINY_PRESETS
    check_models(preset, models)
    artifact_root = artifact_root or os.environ.get("LORA_MOE_ARTIFACT_ROOT") or "outputs/pipeline"
    check_trust(run, artifact_root, models, data, tracking, storage)  # before any server is contacted
    resources = resources.resolved(tiny, dict(os.environ))
    local = _local_root(artifact_root)
    root_uri = open_store(artifact_root, storage.s3).root_uri
    work_dir = Path(storage.work_dir or os.environ.get("LORA_MOE_WORK_DIR") or (
        local / "work" if local else Path.home() / ".cache" / "lora-moe"))
    given_tracking_uri = tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")  # the parameter, else the worker's
    tracking_uri = given_tracking_uri or f"sqlite:///{(local or work_dir) / 'mlflow.db'}"
    if local is None and given_tracking_uri is None:
        logger.warning(f"no tracking URI for an S3 artifact root: MLflow runs go to {tracking_uri} on this machine only")

    stage1_cfg = resolve_settings(stage1, tiny, TINY_STAGE1)
    stage2_cfg = {k: v for k, v in stage1_cfg.items() if k in TARGET_FLAGS} | resolve_settings(stage2, tiny, TINY_STAGE2)
    data_cfg = data.resolved(tiny)
    eval_cfg = resolve_settings(evaluation, tiny, TINY_EVAL)
    gate_cfg = gate.model_dump(mode="json")

    unbound_requests = bound_mlflow_requests(tracking)  # a dead tracking server fails the run in minutes
    try:
        mlflow_ctx = start_pipeline_run(
            tracking, tracking_uri, f"{root_uri}/mlflow-artifacts",
            tags={"prefect.flow_run_id": str(run.id), "prefect.flow_run_name": run.name, "preset": preset,
                  "artifact_root": root_uri},
            params={"preset": preset, "data": data_cfg, "stage1": stage1_cfg, "merge": merge.model_dump(), "stage2": stage2_cfg,
                    "eval": eval_cfg, "gate": gate_cfg, "force": force or "", "only_new_data": only_new_data,
                    "stage2_from_champion": stage2_from_champion},
            ui_url=tracking.resolved_ui_url(tracking_uri, dict(os.environ)), flow_run_ended=_flow_run_ended,
        )
    except BaseException:
        unbound_requests()
        raise
    logger.info(f"MLflow run {mlflow_ctx.run_url(mlflow_ctx.parent_run_id)} ({tracking_uri})")
    ctx = StageContext(artifact_root=root_uri, s3=storage.s3, work_dir=str(work_dir), run_prefix=f"runs/{run.id}",
                       tracking=mlflow_ctx, flow_run_id=str(run.id))
    call = _Runner(ctx, StoreResultStorage.saved(root_uri, storage.s3), forced_stages(force))
    unpin_endpoint = pin_mlflow_s3_endpoint(endpoint_url(storage.s3) if local is None else None)
    try:
        inputs = stages.InputRefs()
        if models.given() or data.manifest:
            inputs = call(stages.resolve_inputs, task_name, models.given(), data.manifest)
        dataset = inputs.dataset or call(stages.synth_data, data.synthetic_clips, data_cfg["frames"], data_cfg["size"],
                                         data.synthetic_seed, data.val_fraction).dataset
        if only_new_data:  # before any training stage
            check = call(stages.check_new_data, tracking.registered_model, dataset)
            if not check.new:
                return _skipped(mlflow_ctx, call, check, tracking.registered_model, root_uri)
        model_refs = inputs.models or call(stages.tiny_models, task_name, models.tiny_seed).models
        prepared = call(stages.prepare_data, dataset, model_refs, data_cfg, resources=resources.prepare_data)
        previous = call(stages.champion_stage1, tracking.registered_model, model_refs) if stage2_from_champion else None
        if stage2_from_champion and previous is None:
            logger.warning(f"stage2_from_champion: {tracking.registered_model} has no champion yet, so stage 1 trains")
        if previous is None:
            s1 = call(stages.stage1_train, model_refs, prepared.cache, stage1_cfg, resources=resources.stage1)
            merges = [call.submit(task, task_name, dit, s1.weights, merge.lora_multiplier, name, resources=resources.merge)
                      for task, dit, name in ((stages.merge_low, model_refs.dit, "merged_low_noise"),
                                              (stages.merge_high, model_refs.dit_high_noise, "merged_high_noise"))
                      if dit is not None]
            low, *high = [call.result(future) for future in merges]
            vanilla, merged_low, merged_high = s1.weights, low.merged, high[0].merged if high else None
            stage1_metrics = s1.metrics
        else:
            logger.info(f"stage 2 starts from champion v{previous.version}'s merged DiTs (stage 1 and merges reused)")
            vanilla, merged_low, merged_high = previous.vanilla_lora, previous.merged_low_noise, previous.merged_high_noise
            stage1_metrics = {}
        s2 = call(stages.stage2_train, task_name, merged_low, merged_high, prepared.cache, stage2_cfg,
                  resources=resources.stage2)
        ev = call(stages.evaluate, model_refs, merged_low, merged_high, s2.weights, prepared.cache, dataset, eval_cfg,
                  gate_cfg, resources=resources.eval)
        artifacts = {f"base_{k}": v for k, v in model_refs.refs().items()} | {
            "latent_cache": prepared.cache, "vanilla_lora": vanilla, "merged_low_noise": merged_low,
            "lora_moe": s2.weights, "eval_report": ev.report,
        } | ({"merged_high_noise": merged_high} if merged_high else {})
        based_on = previous.version if previous else None
        reg = call(stages.register, tracking.registered_model, task_name, artifacts, ev, prepared.data_fingerprint, based_on)
        metrics = ev.metrics | {f"stage1/{k}": v for k, v in stage1_metrics.items() if isinstance(v, (int, float))} | {
            f"stage2/{k}": v for k, v in s2.metrics.items() if isinstance(v, (int, float))}
        summary = PipelineSummary(
            flow_run_id=str(run.id), artifact_root=root_uri, tracking_uri=tracking_uri,
            mlflow_run_url=mlflow_ctx.run_url(mlflow_ctx.parent_run_id),
            registry_url=_version_url(mlflow_ctx, reg.entry), registered=reg.entry,
            data_fingerprint=prepared.data_fingerprint, stages=call.reports, artifacts=artifacts,
            metrics={k: float(v) for k, v in metrics.items()}, gate=ev.gate, stage1_from_version=based_on,
        )
        _finish_parent_run(mlflow_ctx, summary)
        _publish(summary)
        return summary
    except BaseException:
        _end_quietly(mlflow_ctx, "FAILED")
        raise
    finally:
        unpin_endpoint()
        unbound_requests()
        stopped = terminate_all()
        if stopped:
            logger.warning(f"stopped stage commands still running: {', '.join(stopped)}")


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
    return f"{ctx.ui_url.rstrip('/')}/#/models/{entry.name}/versions/{entry.version}"


def _skipped(ctx: TrackingContext, call: _Runner, check: stages.NewDataCheck, model_name: str, root_uri: str) -> PipelineSummary:
    """The early end of a run whose data the champion was already trained on."""
    why = f"no new clips since version {check.champion_version}"
    run = FlowRunContext.get().flow_run
    champion = RegistryEntry(name=model_name, version=check.champion_version, aliases=["champion"],
                             champion_decision=f"unchanged: {why}")
    summary = PipelineSummary(
        flow_run_id=str(run.id), artifact_root=root_uri, tracking_uri=ctx.tracking_uri,
        mlflow_run_url=ctx.run_url(ctx.parent_run_id), registry_url=_version_url(ctx, champion), registered=champion,
        data_fingerprint=check.data_fingerprint, stages=call.reports, artifacts={}, metrics={}, gate={}, skipped=why,
    )
    get_run_logger().info(f"{why} (data fingerprint {check.data_fingerprint[:16]}): nothing to train")
    create_markdown_artifact(
        "\n".join([
            f"# {FLOW_NAME}: {why}",
            f"The data fingerprint `{check.data_fingerprint[:16]}` equals the one recorded on "
            f"[{model_name} v{check.champion_version}]({summary.registry_url}) (`champion`), so nothing was trained "
            "and the champion stays. Add clips to the manifest (or change it) and the next run trains.",
        ]),
        key="lora-moe-pipeline-summary", description=why,
    )
    StageRun(ctx, ctx.parent_run_id).set_tags({"skipped": why, "data_fingerprint": check.data_fingerprint,
                                               "champion_version": check.champion_version})
    end_run(ctx, ctx.parent_run_id, "FINISHED")
    return summary


def _finish_parent_run(ctx: TrackingContext, summary: PipelineSummary) -> None:
    parent = StageRun(ctx, ctx.parent_run_id)
    tags = {"registered_model": summary.registered.name, "registered_version": summary.registered.version,
            "data_fingerprint": summary.data_fingerprint, "cached_stages": ",".join(summary.cached) or "none"} | (
                {"stage1_from_version": summary.stage1_from_version} if summary.stage1_from_version else {})
    for name, ref in summary.artifacts.items():
        tags |= ref_tags(name, ref)
    parent.set_tags(tags)
    parent.log_metrics(summary.metrics)
    end_run(ctx, ctx.parent_run_id, "FINISHED")


def _end_quietly(ctx: TrackingContext, status: str) -> None:
    try:
        end_run(ctx, ctx.parent_run_id, status)
    except Exception as e:  # the failure that got us here matters more
        logging.getLogger(__name__).warning(f"could not end MLflow run {ctx.parent_run_id}: {e}")


def _publish(summary: PipelineSummary) -> None:
    """A markdown artifact (what was registered, stage states, artifacts, links) and a table
    artifact of the eval metrics, on the flow run."""
    entry = summary.registered
    lines = [
        f"# {FLOW_NAME}",
        f"Registered **{entry.name} v{entry.version}** (aliases: {', '.join(entry.aliases) or 'none'}): {entry.champion_decision}.",
        *([f"Stage 2 started from champion v{summary.stage1_from_version}'s merged DiTs (stage 1 not retrained)."]
          if summary.stage1_from_version else []),
        f"[MLflow run]({summary.mlflow_run_url}) · [registry version]({summary.registry_url}) · data fingerprint "
        f"`{summary.data_fingerprint[:16]}`",
        "", "| stage | state | command s |", "|---|---|---|",
        *(f"| {s.name} | {s.state} | {'' if s.command_s is None else f'{s.command_s:.1f}'} |" for s in summary.stages),
        "", "| metric | value |", "|---|---|",
        *(f"| {k} | {v:.6g} |" for k, v in summary.metrics.items()),
        "", "| artifact | URI | sha256 |", "|---|---|---|",
        *(f"| {k} | `{r.uri}` | `{r.sha256[:16]}` |" for k, r in summary.artifacts.items()),
    ]
    create_markdown_artifact("\n".join(lines), key="lora-moe-pipeline-summary", description="What this run produced")
    create_table_artifact([{"metric": k, "value": v} for k, v in summary.metrics.items()], key="eval-metrics",
                          description="Eval and held-out metrics")
