"""The pipeline's Prefect tasks, one per stage, each thin: fetch inputs by ref (verified), run
one `lora-moe` command, store the outputs, return refs and metrics.

    tiny-models, synth-data   the embedded default's inputs (`models tiny`, `data synth`)
    resolve-inputs            inputs given by URI -> refs (sha256 via the download cache)
    prepare-data              manifest + clips -> latent cache (`lora-moe cache`)
    stage1-train              vanilla LoRA (`lora-moe stage1`)
    check-new-data            the data fingerprint vs the champion's (scheduled retraining)
    champion-stage1           the champion's stage 1 and merged DiTs, to start stage 2 from
    merge-low, merge-high     the LoRA folded into each expert (`lora-moe merge`), concurrently
    stage2-train              LoRA-MoE (`lora-moe stage2`)
    eval                      `lora-moe eval` with the promotion gate
    register                  MLflow registry version (model card, tags, aliases), lineage, promotion event

Retries: transfers and merges are safe to repeat; a training retry continues from the last
saved state (`--resume`), found in the stage's work folder (keyed by its cache key, so a new
flow run of a failed stage resumes the same way). Bad input (exit code 2) is never retried.
"""

from __future__ import annotations

import json
import math
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from moe.config.file_names import EVAL_REPORT_FILE, METRICS_FILE, MODEL_SET_FILE, TRAIN_LOG_FILE, VANILLA_LORA_FILE
from moe.data.manifest import read_manifest
from moe.errors import MoeError
from tasks.artifacts.download_cache import DownloadCache
from tasks.artifacts.refs import ArtifactRef, DatasetRef, FolderManifest
from tasks.registry.card import OTHER_LICENCE, DataCard, ModelCard, weak_experts
from tasks.registry.tracking import clip_datasets, code_version, log_datasets, mlflow_client, record_lineage, ref_tags
from tasks.registry.versions import (
    CHAMPION,
    LORA_MOE_FILE,
    RegistryEntry,
    current_version,
    download_bundle,
    promotion_event,
    read_bundle,
    register_bundle,
    version_tags,
    write_bundle,
)
from tasks.stages.caching import stage_cache_key
from tasks.stages.launcher import StageFailed
from tasks.stages.runner import StageContext, StageTiming, open_stage, saved_states


def _retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry crashes, timeouts and transfer errors, not exit code 2."""
    try:
        state.result()
    except StageFailed as e:
        return not e.user_error
    except Exception:
        return True
    return False


CACHED = dict(cache_key_fn=stage_cache_key, persist_result=True, result_serializer="json")
SAFE_RETRIES = dict(retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_bad_input)
TRAINING_RETRIES = dict(retries=1, retry_delay_seconds=5, retry_condition_fn=_retry_unless_bad_input)


class ModelRefs(BaseModel):
    task: str
    dit: ArtifactRef
    dit_high_noise: ArtifactRef | None = None
    vae: ArtifactRef
    text_encoder: ArtifactRef
    tokenizer: ArtifactRef

    def refs(self) -> dict[str, ArtifactRef]:
        return {k: v for k, v in self if isinstance(v, ArtifactRef)}

    def component_paths(self, stage) -> dict[str, Path]:
        """The VAE, text encoder and tokenizer, fetched and verified: options of a stage command."""
        return {"vae": stage.fetch(self.vae), "text_encoder": stage.fetch(self.text_encoder), "tokenizer": stage.fetch(self.tokenizer)}


class InputRefs(BaseModel):
    models: ModelRefs | None = None
    dataset: DatasetRef | None = None


class TinyModels(BaseModel):
    models: ModelRefs
    timing: StageTiming


class SyntheticData(BaseModel):
    dataset: DatasetRef
    timing: StageTiming


class PreparedData(BaseModel):
    cache: ArtifactRef
    data_fingerprint: str
    timing: StageTiming


class TrainResult(BaseModel):
    weights: ArtifactRef
    metrics: dict[str, Any]
    metrics_file: ArtifactRef
    logs: ArtifactRef | None
    train_log: ArtifactRef
    resumed_from: str | None
    mlflow_run_id: str
    timing: StageTiming


class MergeResult(BaseModel):
    merged: ArtifactRef
    mlflow_run_id: str
    timing: StageTiming


class EvalResult(BaseModel):
    report: ArtifactRef  # the eval folder: eval_report.json, report.md, plots/, samples/
    metrics: dict[str, float]
    gate: dict[str, Any]
    mlflow_run_id: str
    timing: StageTiming


class NewDataCheck(BaseModel):
    data_fingerprint: str
    champion_version: str | None  # None: there is no champion yet
    champion_fingerprint: str | None

    @property
    def new(self) -> bool:
        return self.champion_fingerprint != self.data_fingerprint


class ChampionStage1(BaseModel):
    """What stage 2 reuses from the champion: its vanilla LoRA and merged DiTs (refs)."""

    version: str
    vanilla_lora: ArtifactRef
    merged_low_noise: ArtifactRef
    merged_high_noise: ArtifactRef | None = None


class RegisterResult(BaseModel):
    entry: RegistryEntry
    bundle: dict[str, Any]
    mlflow_run_id: str
    timing: StageTiming


# -- inputs --------------------------------------------------------------------------------------


def _children(folder: ArtifactRef, manifest: FolderManifest, names: dict[str, tuple[str, str]]) -> dict[str, ArtifactRef]:
    """Refs to files or sub-folders of a stored folder: {name: (relative path, kind)}."""
    refs = {}
    for name, (relative, kind) in names.items():
        files = [f for f in manifest.files if f.path == relative]
        if files:
            refs[name] = folder.child(relative, files[0].sha256, files[0].size, kind)
        else:
            inner = FolderManifest(
                files=[
                    f.model_copy(update={"path": f.path.removeprefix(relative + "/")}) for f in manifest.files if f.path.startswith(relative + "/")
                ]
            )
            refs[name] = folder.child(relative, inner.sha256, inner.size, kind).model_copy(update={"layout": "folder"})
    return refs


@task(name="tiny-models", task_run_name="tiny-models", **CACHED, **SAFE_RETRIES)
def tiny_models(task: str, seed: int, pretrain_steps: int, ctx: StageContext) -> TinyModels:
    """The embedded tiny Wan2.2 model set (its DiTs pre-trained `pretrain_steps` on synthetic
    clips), stored like any other input."""
    with open_stage(ctx) as stage:
        out = stage.work / "models"
        stage.run_command("models tiny", {"task": task, "output_dir": out, "seed": seed, "pretrain_steps": pretrain_steps, "overwrite": True}, gpus=0)
        folder = stage.put(out, "model_set")
        layout = json.loads((out / MODEL_SET_FILE).read_text())
        manifest = stage.store.folder_manifest(stage.store.key(folder.uri))
        parts = {
            "dit": (layout["low_noise"], "dit"),
            "dit_high_noise": (layout["high_noise"], "dit"),
            "vae": (layout["vae"], "vae"),
            "text_encoder": (layout["text_encoder"], "text_encoder"),
            "tokenizer": (layout["tokenizer"], "tokenizer"),
        }
        models = ModelRefs(task=layout["task"], **_children(folder, manifest, parts))
        return TinyModels(models=models, timing=stage.timing())


@task(name="synth-data", task_run_name="synth-data", **CACHED, **SAFE_RETRIES)
def synth_data(clips: int, frames: int, size: str, seed: int, val_fraction: float, ctx: StageContext) -> SyntheticData:
    """The procedural surgical-like clip set (`lora-moe data synth`)."""
    with open_stage(ctx) as stage:
        out = stage.work / "data"
        stage.run_command(
            "data synth",
            {"output_dir": out, "clips": clips, "frames": frames, "size": size, "seed": seed, "val_fraction": val_fraction, "overwrite": True},
            gpus=0,
        )
        folder = stage.put(out, "dataset")
        manifest = stage.store.folder_manifest(stage.store.key(folder.uri))
        names = {f.path: (f.path, "manifest" if f.path == "manifest.jsonl" else "clip") for f in manifest.files}
        refs = _children(folder, manifest, names)
        dataset = DatasetRef(manifest=refs.pop("manifest.jsonl"), files=refs)
        return SyntheticData(dataset=dataset, timing=stage.timing())


@task(name="resolve-inputs", task_run_name="resolve-inputs", cache_policy=NO_CACHE, **SAFE_RETRIES)
def resolve_inputs(task: str, models: dict[str, str], manifest: str | None, ctx: StageContext) -> InputRefs:
    """Inputs given by URI -> refs. It runs every time (an input may have changed at the same
    URI) and is cheap when nothing did: unchanged objects are not hashed again."""
    from prefect import get_run_logger

    cache = DownloadCache(Path(ctx.work_dir) / "downloads", ctx.s3)
    model_refs = None
    if models:
        kinds = {"dit": "dit", "dit_high_noise": "dit", "vae": "vae", "text_encoder": "text_encoder", "tokenizer": "tokenizer"}
        model_refs = ModelRefs(task=task, **{k: cache.resolve(uri, kinds[k]) for k, uri in models.items()})
    dataset = None
    if manifest:
        manifest_ref = cache.resolve(manifest, "manifest")
        records = read_manifest(cache.fetch(manifest_ref))
        base = manifest_ref.uri.rsplit("/", 1)[0]
        relative = sorted({r.video for r in records} | {r.mask for r in records if r.mask})
        with ThreadPoolExecutor(max_workers=ctx.s3.max_concurrency) as pool:
            refs = list(pool.map(lambda rel: cache.resolve(f"{base}/{rel}", "clip"), relative))
        dataset = DatasetRef(manifest=manifest_ref, files=dict(zip(relative, refs)))
        get_run_logger().info(f"dataset {manifest_ref.uri}: {len(records)} clips, fingerprint {dataset.fingerprint[:16]}")
    return InputRefs(models=model_refs, dataset=dataset)


@task(name="check-new-data", task_run_name="check-new-data", cache_policy=NO_CACHE, **SAFE_RETRIES)
def check_new_data(model_name: str, dataset: DatasetRef, ctx: StageContext) -> NewDataCheck:
    """The data fingerprint against the one recorded on the current champion (its registry
    version's `data_fingerprint` tag). Runs before any training stage."""
    from prefect import get_run_logger

    champion = current_version(mlflow_client(ctx.tracking.tracking_uri), model_name, CHAMPION)
    check = NewDataCheck(
        data_fingerprint=dataset.fingerprint,
        champion_version=str(champion.version) if champion else None,
        champion_fingerprint=champion.tags.get("data_fingerprint") if champion else None,
    )
    get_run_logger().info(
        f"data fingerprint {check.data_fingerprint[:16]}; "
        + (
            f"champion v{check.champion_version} was trained on {str(check.champion_fingerprint)[:16]}"
            if champion
            else f"{model_name} has no champion yet"
        )
    )
    return check


@task(name="champion-stage1", task_run_name="champion-stage1", cache_policy=NO_CACHE, **SAFE_RETRIES)
def champion_stage1(model_name: str, models: ModelRefs, ctx: StageContext) -> ChampionStage1 | None:
    """The champion's vanilla LoRA and merged DiTs, from its bundle, for a stage-2-only retrain;
    None when there is no champion (then everything trains). The champion must have been merged
    from these very base DiTs."""
    import tempfile

    client = mlflow_client(ctx.tracking.tracking_uri)
    champion = current_version(client, model_name, CHAMPION)
    if champion is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        refs = read_bundle(download_bundle(champion, Path(tmp), ctx.tracking.tracking_uri))["artifacts"]
    for name, ref in (("base_dit", models.dit), ("base_dit_high_noise", models.dit_high_noise)):
        theirs = refs.get(name, {}).get("sha256")
        if (ref.sha256 if ref else None) != theirs:
            raise MoeError(
                f"stage2_from_champion: champion v{champion.version} was merged from another {name} "
                f"(sha256 {str(theirs)[:12]}..., this run's {ref.sha256[:12] if ref else 'none'}...); "
                "train stage 1 again (stage2_from_champion: false)"
            )
    return ChampionStage1(
        version=str(champion.version),
        **{name: ArtifactRef.model_validate(refs[name]) for name in ("vanilla_lora", "merged_low_noise", "merged_high_noise") if name in refs},
    )


@task(name="prepare-data", task_run_name="prepare-data", **CACHED, **SAFE_RETRIES)
def prepare_data(dataset: DatasetRef, models: ModelRefs, settings: dict[str, Any], ctx: StageContext) -> PreparedData:
    """Manifest + clips -> latent cache (VAE latents, text embeddings, ROI masks, labels)."""
    with open_stage(ctx, {"data_fingerprint": dataset.fingerprint}) as stage:
        manifest = stage.fetch_dataset(dataset)
        out = stage.work / "cache"
        device = "cuda" if stage.ctx.gpus else "cpu"
        stage.run_command(
            "cache",
            {
                "task": models.task,
                "manifest": manifest,
                "output_dir": out,
                **models.component_paths(stage),
                "size": settings["size"],
                "frames": settings["frames"],
                "dtype": settings["dtype"],
                "embed_dtype": settings["embed_dtype"],
                "device": device,
                "quiet": True,
            },
            gpus=0,
        )
        cache = stage.put(out, "latent_cache")
        stage.mlflow.log_params({"data": settings})
        stage.mlflow.set_tags(ref_tags("latent_cache", cache))
        return PreparedData(cache=cache, data_fingerprint=dataset.fingerprint, timing=stage.timing())


# -- training and merges -------------------------------------------------------------------------


def start_options(out: Path) -> tuple[dict[str, bool], Path | None]:
    """How a training stage starts in its work folder `out`: a retry (or a re-run of a failed
    stage) continues from the newest saved state, an epoch's or a step's (`resume`); without one
    it starts again, replacing only what an earlier attempt of this stage wrote (`overwrite`)."""
    states = saved_states(out)
    return ({"resume": True}, states[-1]) if states else ({"overwrite": True}, None)


def _train(
    stage, command: str, config: dict[str, Any], inputs: dict[str, Any], weights_file: str, kind: str, components: ModelRefs | None = None
) -> TrainResult:
    """One training command. With `sample_prompts` in `config` (a file on the worker; a relative
    path is taken from the worker's working folder, the command runs in the stage's work folder)
    the samples during training use `components`' VAE, text encoder and tokenizer (fetched and
    verified); the `samples/` folder goes to the stage's MLflow run and its latest samples to a
    Prefect markdown artifact."""
    out = stage.work / "out"
    out.mkdir(exist_ok=True)
    start, state = start_options(out)
    if state is not None:
        stage.logger.info(f"resuming from {state.name} in {out}")
    child_config = dict(config) | inputs | {"output_dir": out} | start | ({} if stage.ctx.gpus else {"cpu": True})
    if config.get("sample_prompts"):
        prompts = Path(config["sample_prompts"]).expanduser().resolve()
        if not prompts.is_file():
            raise StageFailed(f"sample_prompts {config['sample_prompts']}: no such file on this worker ({prompts})", returncode=2)
        child_config["sample_prompts"] = str(prompts)
        child_config |= components.component_paths(stage) if components is not None else {}
        stage.mlflow.log_artifact(prompts, "samples")
    stage.run_command(command, child_config, train_log=out / TRAIN_LOG_FILE)
    stage.mlflow.log_params(config)
    _log_samples(stage, out)
    stage.mlflow.log_train_log(out / TRAIN_LOG_FILE)
    metrics = json.loads((out / METRICS_FILE).read_text())
    stage.mlflow.log_metrics(metrics, prefix="val/")
    weights = stage.put(out / weights_file, kind)
    stage.mlflow.log_artifact(out / weights_file)
    stage.mlflow.log_artifact(out / METRICS_FILE)
    logs = stage.put(out / "logs", "tensorboard_logs") if (out / "logs").is_dir() else None
    if logs is not None:
        stage.mlflow.log_artifact(out / "logs", "tensorboard")
    stage.mlflow.set_tags(ref_tags(kind, weights))
    return TrainResult(
        weights=weights,
        metrics=metrics,
        metrics_file=stage.put(out / METRICS_FILE, "metrics"),
        logs=logs,
        train_log=stage.put(out / TRAIN_LOG_FILE, "train_log"),
        resumed_from=state.name if state is not None else None,
        mlflow_run_id=stage.mlflow.run_id,
        timing=stage.timing(),
    )


def _log_samples(stage, out: Path) -> None:
    """The run's `samples/` (samples during training) into its MLflow run, and a Prefect markdown
    artifact listing the latest sampling point's prompts and files."""
    from prefect.artifacts import create_markdown_artifact

    from moe.train.sampling import SAMPLES_DIR, parse_sample_name

    folder = out / SAMPLES_DIR
    files = {f.name: parse_sample_name(f.name) for f in folder.glob("*.mp4")} if folder.is_dir() else {}
    files = {name: where for name, where in files.items() if where is not None}
    if not files:
        return
    stage.mlflow.log_artifact(folder, SAMPLES_DIR)
    epoch, step = max(files.values(), key=lambda w: w[1])[:2]
    prompts = {}
    log = out / TRAIN_LOG_FILE
    for line in log.read_text().splitlines() if log.is_file() else ():
        record = json.loads(line)
        if record.get("event") == "sample":
            prompts[record["prompt_index"]] = record["prompt"] + (f" (hint: {record['hint']})" if record.get("hint") else "")
    rows = [
        f"| {index} | {prompts.get(index, '?').replace('|', '/')} | {epoch} | {step} | `{SAMPLES_DIR}/{name}` |"
        for name, (_, s, index) in sorted(files.items(), key=lambda kv: kv[1][2])
        if s == step
    ]
    url = stage.ctx.tracking.run_url(stage.mlflow.run_id)
    markdown = "\n".join(
        [
            f"### {stage.name}: samples at epoch {epoch}, step {step}",
            "",
            f"{len(files)} sample videos in all, in the MLflow run's artifacts under `{SAMPLES_DIR}/` ([run]({url})).",
            "",
            "| prompt # | prompt | epoch | step | file |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    create_markdown_artifact(markdown, key=f"{stage.name}-samples", description=f"{stage.name}: latest samples during training")


@task(name="stage1-train", task_run_name="stage1-train", **CACHED, **TRAINING_RETRIES)
def stage1_train(models: ModelRefs, cache: ArtifactRef, config: dict[str, Any], ctx: StageContext) -> TrainResult:
    """The vanilla LoRA, trained across both experts (`lora-moe stage1`)."""
    with open_stage(ctx) as stage:
        inputs = {"task": models.task, "dit": stage.fetch(models.dit), "dataset": stage.fetch(cache)}
        if models.dit_high_noise is not None:
            inputs["dit_high_noise"] = stage.fetch(models.dit_high_noise)
        return _train(stage, "stage1", config, inputs, VANILLA_LORA_FILE, "vanilla_lora", components=models)


@task(name="merge", **CACHED, **SAFE_RETRIES)
def merge(task: str, dit: ArtifactRef, vanilla_lora: ArtifactRef, lora_multiplier: float, output_name: str, ctx: StageContext) -> MergeResult:
    """The LoRA folded into one expert (`lora-moe merge`); runs as merge-low and merge-high."""
    with open_stage(ctx) as stage:
        name = output_name + (".safetensors" if dit.layout == "file" else "")
        out = stage.work / name
        if out.is_file():  # a retry: the merge refuses to overwrite its output
            out.unlink()
        shutil.rmtree(out, ignore_errors=True)
        stage.run_command(
            "merge",
            {
                "dit": stage.fetch(dit),
                "lora_weight": stage.fetch(vanilla_lora),
                "save_merged_model": out,
                "lora_multiplier": lora_multiplier,
                "task": task,
                "quiet": True,
            },
        )
        merged = stage.put(out, "merged_dit")
        stage.mlflow.log_params({"lora_multiplier": lora_multiplier})
        stage.mlflow.set_tags(ref_tags("merged_dit", merged) | ref_tags("base_dit", dit) | ref_tags("vanilla_lora", vanilla_lora))
        return MergeResult(merged=merged, mlflow_run_id=stage.mlflow.run_id, timing=stage.timing())


merge_low = merge.with_options(name="merge-low", task_run_name="merge-low")
merge_high = merge.with_options(name="merge-high", task_run_name="merge-high")


@task(name="stage2-train", task_run_name="stage2-train", **CACHED, **TRAINING_RETRIES)
def stage2_train(
    task: str,
    merged_low: ArtifactRef,
    merged_high: ArtifactRef | None,
    cache: ArtifactRef,
    config: dict[str, Any],
    ctx: StageContext,
    models: ModelRefs | None = None,
) -> TrainResult:
    """Experts + router + timestep gates on the merged DiTs (`lora-moe stage2`); `models` gives
    the VAE, text encoder and tokenizer for samples during training."""
    with open_stage(ctx) as stage:
        inputs = {"task": task, "dit": stage.fetch(merged_low), "dataset": stage.fetch(cache)}
        if merged_high is not None:
            inputs["dit_high_noise"] = stage.fetch(merged_high)
        return _train(stage, "stage2", config, inputs, LORA_MOE_FILE, "lora_moe", components=models)


# -- evaluation and registry ---------------------------------------------------------------------


@task(name="eval", task_run_name="eval", **CACHED, **SAFE_RETRIES)
def evaluate(
    models: ModelRefs,
    merged_low: ArtifactRef,
    merged_high: ArtifactRef | None,
    lora_moe: ArtifactRef,
    cache: ArtifactRef,
    dataset: DatasetRef,
    config: dict[str, Any],
    gate: dict[str, Any],
    ctx: StageContext,
) -> EvalResult:
    """`lora-moe eval`: held-out losses of base, stage 1 and stage 2, routing, plots, samples, gate."""
    with open_stage(ctx) as stage:
        out = stage.work / "eval"
        inputs = {
            "merged_dit": merged_low,
            "merged_dit_high_noise": merged_high,
            "lora_moe_weights": lora_moe,
            "dataset": cache,
            "dit": models.dit,
            "dit_high_noise": models.dit_high_noise,
        }
        paths = {name: stage.fetch(ref) for name, ref in inputs.items() if ref is not None}
        stage.run_command(
            "eval",
            dict(config)
            | paths
            | models.component_paths(stage)
            | {
                "gate": stage.write_config("gate.yaml", gate),
                "task": models.task,
                "manifest": stage.fetch_dataset(dataset),
                "output_dir": out,
                "device": "cuda" if stage.ctx.gpus else "cpu",
                "overwrite": True,
                "progress": False,
            },
        )
        report = json.loads((out / EVAL_REPORT_FILE).read_text())
        for flag, ref in inputs.items():  # the report records what it measured: the refs' bytes
            recorded = report["inputs"].get(flag, {}).get("sha256")
            if ref is not None and recorded not in (None, ref.sha256):
                raise StageFailed(f"eval measured {flag} with sha256 {recorded[:12]}..., not the ref's {ref.sha256[:12]}...")
        stored = stage.put(out, "eval_report")
        stage.mlflow.log_params({"eval": config, "gate": gate})
        stage.mlflow.log_metrics(report["metrics"])
        stage.mlflow.log_artifact(out, "eval")
        log_datasets(ctx.tracking.tracking_uri, stage.mlflow.run_id, clip_datasets(dataset, cache, "evaluation"))
        stage.mlflow.set_tags(ref_tags("eval_report", stored) | {"gate.passed": str(report["gate"]["passed"]).lower()})
        return EvalResult(report=stored, metrics=report["metrics"], gate=report["gate"], mlflow_run_id=stage.mlflow.run_id, timing=stage.timing())


@task(name="register", task_run_name="register", **CACHED)
def register(
    model_name: str,
    task: str,
    artifacts: dict[str, ArtifactRef],
    evaluation: EvalResult,
    data_fingerprint: str,
    based_on: str | None,
    ctx: StageContext,
    dataset: DatasetRef | None = None,
    producers: dict[str, str] | None = None,
) -> RegisterResult:
    """One registry version: the bundle with its model card and artifacts.json, a dozen tags
    (`version_tags`), aliases; the lineage of its parts as MLflow logged models; the Prefect event
    `lora-moe.champion.promoted` when `champion` moved to it. The version points at the pipeline's
    parent run. `based_on`: the champion version whose stage 1 this model's stage 2 started from;
    `dataset`: the clips (for the card's data and licence); `producers`: artifact name -> the
    MLflow run of the stage that wrote it (the lineage's edges)."""
    with open_stage(ctx) as stage:
        bundle_dir = stage.work / "bundle"
        shutil.rmtree(bundle_dir, ignore_errors=True)  # a retry writes it again
        lora_moe_file = stage.fetch(artifacts["lora_moe"])
        bundle = write_bundle(
            bundle_dir,
            task=task,
            lora_moe_file=lora_moe_file,
            artifacts=artifacts,
            data_fingerprint=data_fingerprint,
            metrics=evaluation.metrics,
            gate=evaluation.gate,
            based_on={"version": based_on, "reused": ["vanilla_lora", "merged_low_noise", "merged_high_noise"]} if based_on else None,
        )
        report = json.loads((stage.fetch(evaluation.report) / EVAL_REPORT_FILE).read_text())
        gate, code, parent = evaluation.gate, code_version(), ctx.tracking.parent_run_id
        tags = version_tags(
            task=task,
            data_fingerprint=data_fingerprint,
            gate=gate,
            metrics=evaluation.metrics,
            lora_moe_sha256=artifacts["lora_moe"].sha256,
            flow_run_id=ctx.flow_run_id,
            code=code,
            based_on=based_on,
            weak=sorted(weak_experts(report)),
        )
        data = (
            DataCard.of(dataset)
            if dataset is not None
            else DataCard(source="manifest", manifest_uri="?", fingerprint=data_fingerprint, clips=0, licence=OTHER_LICENCE)
        )
        card = ModelCard(
            task=task,
            data=data,
            metrics=evaluation.metrics,
            gate=gate,
            report=report,
            code=code,
            based_on=based_on,
            run_url=ctx.tracking.run_url(parent),
            flow_run_id=ctx.flow_run_id,
        )
        entry = register_bundle(
            mlflow_client(ctx.tracking.tracking_uri),
            model_name,
            ctx.tracking.experiment_id,
            parent,
            bundle_dir,
            tags,
            gate["passed"],
            gate["primary_metric"],
            math.nan if gate["primary_value"] is None else float(gate["primary_value"]),
            gate["higher_is_better"],
            run_link=ctx.tracking.run_url(parent),
            card=card,
            artifacts=artifacts,
            model_tags={k: tags[k] for k in ("task", "data_fingerprint", "gate.passed")},
        )
        stage.logger.info(f"registered {entry.name} v{entry.version}, aliases {entry.aliases}: {entry.champion_decision}")
        stage.mlflow.set_tags({"registered_model": entry.name, "registered_version": entry.version})
        try:  # what the registry shows beside the version; the version itself is complete
            record_lineage(ctx.tracking.tracking_uri, ctx.tracking.experiment_id, artifacts, producers or {}, entry.model_id, parent)
        except Exception as e:
            stage.logger.warning(f"could not record the lineage of {entry.name} v{entry.version} in MLflow: {e}")
        event = promotion_event(
            entry, gate=gate, metrics=evaluation.metrics, data_fingerprint=data_fingerprint, task=task, run_url=ctx.tracking.run_url(parent)
        )
        if event is not None:
            from prefect.events import emit_event

            emit_event(**event)
            stage.logger.info(f"emitted {event['event']} for {entry.name} v{entry.version} (champion was {entry.previous_champion or 'none'})")
        return RegisterResult(entry=entry, bundle=bundle, mlflow_run_id=stage.mlflow.run_id, timing=stage.timing())
