"""Typed parameters of the `lora-moe-pipeline` flow (pydantic, so the Prefect UI renders a
validated form with descriptions and defaults).

The training and eval settings are generated from the commands' own configs
(`moe.config.train`, `moe.config.eval`): every option of `Stage1Config` / `Stage2Config` /
`EvalConfig` except the paths and runtime switches the tasks fill in; the promotion gate is
`moe.config.gate.PromotionGate` itself. A setting left empty takes the preset's value: the tiny
presets use exactly what `lora-moe workflow run` uses (`moe.tiny.workflow`), the real ones the
config defaults. The resolved settings go to the child as a YAML `--config` file (the gate as
`--gate FILE`), so the CLI, config files and the UI all spell an option the same way.

What the form (and the API behind it) accepts means what it says (`FormGroup`): every number is
finite and has a range (the configs' own bounds, plus an upper bound for those that have none:
`NUMBER_BOUNDS`, else +-1e6), an unknown key is refused, and so is a null: a field left out takes
the preset's value, a null is never read as "left out" (a bare NaN or Infinity in a JSON number
field reaches the flow as null, and would otherwise train silently with the preset's value).
"""

from __future__ import annotations

import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_serializer, model_validator

from flows import surfaces
from moe.config.eval import EvalConfig
from moe.config.gate import PromotionGate as EvalGate
from moe.config.numbers import MAX_FRAMES, MAX_SIDE, SEED_MAX, PretrainSteps, Seed
from moe.config.presets import PRESETS
from moe.config.train import TARGET_FLAGS, Stage1Config, Stage2Config
from moe.config.workflow import TINY_PRESETS, TINY_PRETRAIN_STEPS, WorkflowConfig, eval_options, stage1_options, stage2_options
from moe.errors import MoeError
from tasks.artifacts.s3 import S3Options
from tasks.registry.tracking import TrackingSettings
from tasks.trust import check_run

Preset = Literal["tiny", "tiny-t2v", "tiny-i2v", "t2v-A14B", "i2v-A14B", "ti2v-5B"]
assert set(Preset.__args__) == set(TINY_PRESETS) | set(PRESETS)

# Filled in by the tasks (inputs fetched by ref, the work folder, resume after a failure, GPUs).
RUNTIME_FIELDS = frozenset(
    {"task", "dit", "dit_high_noise", "dataset", "output_dir", "resume", "progress", "cpu", "model_set", "vae", "text_encoder", "tokenizer"}
)
EVAL_RUNTIME_FIELDS = RUNTIME_FIELDS | {
    "merged_dit",
    "merged_dit_high_noise",
    "lora_moe_weights",
    "model_set",
    "vae",
    "text_encoder",
    "tokenizer",
    "manifest",
    "device",
    "overwrite",
    "gate",
}

_TINY = WorkflowConfig(output_dir=".")
TINY_STAGE1 = stage1_options(_TINY)
TINY_STAGE2 = stage2_options(_TINY) | {"seed": _TINY.seed}
TINY_EVAL = eval_options(_TINY)


# Ranges for the numbers whose config gives no upper bound (or no lower one): sane, generous
# limits that stop a typo (an epoch count of 2**63) before a stage starts. Any other number
# without a bound gets +-DEFAULT_LIMIT.
NUMBER_BOUNDS: dict[str, tuple[float | None, float | None]] = {
    "max_train_epochs": (None, 10_000),
    "batch_size": (None, 1024),
    "gradient_accumulation_steps": (None, 1024),
    "lr_warmup_steps": (None, 10_000_000),
    "learning_rate": (None, 1.0),
    "weight_decay": (None, 10.0),
    "max_grad_norm": (None, 1e6),
    "network_alpha": (None, 4096.0),
    "discrete_flow_shift": (None, 100.0),
    "roi_weight": (None, 100.0),
    "placement_headroom_gib": (None, 1024.0),
    "save_every_n_epochs": (None, 10_000),
    "save_every_n_steps": (None, 100_000_000),
    "save_every_n_minutes": (None, 7 * 24 * 60),
    "save_last_n_states": (None, 10_000),
    "log_every_n_steps": (None, 100_000_000),
    "lambda_teach": (None, 1000.0),
    "lambda_ent": (None, 1000.0),
    "lambda_lb": (None, 1000.0),
    "alpha_expert": (-100.0, 100.0),
    "alpha_base": (-100.0, 100.0),
    "seed": (0, SEED_MAX),
    "sigmas": (0.0, 1.0),
    "max_clips": (None, 1_000_000),
    "bootstrap_samples": (None, 1_000_000),
    "samples": (None, 1000),
    "sample_steps": (None, 1000),
    "sample_frames": (None, MAX_FRAMES),
    "stage1_undertrained_below": (-1.0, 1.0),
    "metric_clips": (None, 100_000),
    "fid_frames": (None, MAX_FRAMES),
    "metric_bootstrap": (None, 100_000),
}
DEFAULT_LIMIT = 1_000_000


def _upper_and_lower(metadata) -> tuple[bool, bool]:
    """Whether pydantic constraints in `metadata` bound a number from above, from below."""
    upper = lower = False
    for item in metadata:
        upper |= any(getattr(item, n, None) is not None for n in ("le", "lt"))
        lower |= any(getattr(item, n, None) is not None for n in ("ge", "gt"))
        inner_upper, inner_lower = _upper_and_lower(getattr(item, "metadata", []))
        upper, lower = upper or inner_upper, lower or inner_lower
    return upper, lower


def bounded(annotation: Any, metadata: list, name: str) -> Any:
    """`annotation` (None taken out) with its constraints, every number in it finite and bounded
    on both sides (`NUMBER_BOUNDS`, else +-DEFAULT_LIMIT) where the config left a side open."""
    if get_origin(annotation) in (Union, types.UnionType):
        kept = [a for a in get_args(annotation) if a is not type(None)]
        annotation = kept[0] if len(kept) == 1 else Union[tuple(kept)]  # noqa: UP007
    if get_origin(annotation) is Annotated:
        base, *inner = get_args(annotation)
        return bounded(base, [*inner, *metadata], name)
    if get_origin(annotation) is tuple:
        items = get_args(annotation)
        if len(items) == 2 and items[1] is Ellipsis:
            item = bounded(items[0], [], name)
            return Annotated[tuple[item, ...], *metadata] if metadata else tuple[item, ...]
    if annotation not in (int, float):
        return Annotated[annotation, *metadata] if metadata else annotation
    low, high = NUMBER_BOUNDS.get(name, (None, None))
    has_upper, has_lower = _upper_and_lower(metadata)
    extra = [Field(allow_inf_nan=False)] if annotation is float else []
    if not has_upper:
        extra.append(Field(le=high if high is not None else DEFAULT_LIMIT))
    if not has_lower:
        extra.append(Field(ge=low if low is not None else -DEFAULT_LIMIT))
    return Annotated[annotation, *metadata, *extra]


def _drop_null_defaults(schema: dict[str, Any]) -> None:
    """The form shows an empty field (not a null to send) for "the preset's value"."""
    for prop in schema.get("properties", {}).values():
        if "default" in prop and prop["default"] is None:
            del prop["default"]


class FormGroup(BaseModel):
    """A group of flow parameters whose empty fields take the preset's value: unknown keys,
    non-finite numbers and nulls are refused (a field is left out, never set to null)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=_drop_null_defaults)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = [k for k, v in data.items() if v is None and k in cls.model_fields]
            if nulls:
                raise ValueError(
                    f"{', '.join(nulls)}: null is not a value; leave the field out to take the preset's value "
                    "(a NaN or Infinity sent as a number arrives as null)"
                )
        return data

    @model_serializer(mode="wrap")
    def _without_empty(self, handler) -> dict[str, Any]:
        """Empty fields are left out (so a dumped group validates again, and the form's default is {})."""
        return {k: v for k, v in handler(self).items() if v is not None}


def settings_model(config: type[BaseModel], name: str, exclude: frozenset[str], tiny: dict[str, Any], doc: str) -> type[BaseModel]:
    """`config`'s fields minus `exclude`, each optional (left out = the preset's value), keeping
    the field's type, constraints and description, with every number bounded (`bounded`)."""
    fields = {}
    for field_name, info in config.model_fields.items():
        if field_name in exclude:
            continue
        typ = bounded(info.annotation, list(info.metadata), field_name)
        default = info.get_default(call_default_factory=True)
        text = (info.description or field_name.replace("_", " ").capitalize()).rstrip(".")
        text += f". Default {default!r}" + (f"; tiny presets {tiny[field_name]!r}." if field_name in tiny else ".")
        fields[field_name] = (typ, Field(None, description=text))
    return create_model(name, __base__=FormGroup, __doc__=doc, **fields)


class PromotionGate(EvalGate):
    """Thresholds a model must meet to be promoted (`moe.config.gate.PromotionGate`, with every
    threshold finite and within -1..1: they are fractions, 0.01 = 1%)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, json_schema_extra=_drop_null_defaults)

    min_stage1_improvement_over_base: float = Field(
        EvalGate.model_fields["min_stage1_improvement_over_base"].default,
        ge=-1,
        le=1,
        description=EvalGate.model_fields["min_stage1_improvement_over_base"].description,
    )
    min_stage2_roi_improvement_over_stage1: float = Field(
        EvalGate.model_fields["min_stage2_roi_improvement_over_stage1"].default,
        ge=-1,
        le=1,
        description=EvalGate.model_fields["min_stage2_roi_improvement_over_stage1"].description,
    )
    min_hint_margin: float = Field(
        EvalGate.model_fields["min_hint_margin"].default, ge=-1, le=1, description=EvalGate.model_fields["min_hint_margin"].description
    )
    # Off unless set: left out of the form's values (never a null, which the form refuses).
    min_hint_accuracy_gain_over_stage1: float = Field(  # type: ignore[assignment]
        None, ge=-1, le=1, description=EvalGate.model_fields["min_hint_accuracy_gain_over_stage1"].description
    )

    @model_serializer(mode="wrap")
    def _without_checks_left_off(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if not (k == "min_hint_accuracy_gain_over_stage1" and v is None)}


Stage1Settings = settings_model(
    Stage1Config,
    "Stage1Settings",
    RUNTIME_FIELDS,
    TINY_STAGE1,
    "Stage-1 (vanilla LoRA) training options: the `lora-moe stage1` flags.",
)
Stage2Settings = settings_model(
    Stage2Config,
    "Stage2Settings",
    RUNTIME_FIELDS | set(TARGET_FLAGS),
    TINY_STAGE2,
    "Stage-2 (LoRA-MoE) training options: the `lora-moe stage2` flags; the LoRA targets and ranks are stage 1's.",
)
EvalSettings = settings_model(
    EvalConfig,
    "EvalSettings",
    EVAL_RUNTIME_FIELDS,
    TINY_EVAL,
    "`lora-moe eval` options (held-out clips, sigma grid, seed, bootstrap, samples); the gate is its own parameter.",
)
Stage1Settings.__module__ = Stage2Settings.__module__ = EvalSettings.__module__ = __name__


def resolve_settings(settings: BaseModel, tiny_preset: bool, tiny_defaults: dict[str, Any]) -> dict[str, Any]:
    """Preset values overridden by what the user set."""
    return (dict(tiny_defaults) if tiny_preset else {}) | settings.model_dump(mode="json", exclude_none=True)


class ModelInputs(BaseModel):
    """Base Wan2.2 checkpoints and components by URI (s3://bucket/key, file:///path or a path).
    All empty with a tiny preset: the embedded tiny model set is made and stored."""

    model_config = ConfigDict(extra="forbid")

    dit: str | None = Field(None, description="Low-noise DiT (the one DiT of ti2v-5B): a .safetensors file or a sharded folder.")
    dit_high_noise: str | None = Field(None, description="High-noise DiT (A14B tasks).")
    vae: str | None = Field(None, description="diffusers vae/ folder or Wan2.1_VAE.pth.")
    text_encoder: str | None = Field(None, description="diffusers text_encoder/ folder or the UMT5 .pth.")
    tokenizer: str | None = Field(None, description="tokenizer/ folder.")
    tiny_seed: Seed = Field(0, description="Seed of the embedded tiny model set.")
    tiny_pretrain_steps: PretrainSteps = Field(
        TINY_PRETRAIN_STEPS,
        description="Steps each tiny base DiT is pre-trained on synthetic clips of its own, as a real base is "
        "pretrained (0: random DiTs). Only for the embedded tiny model set.",
    )

    def given(self) -> dict[str, str]:
        return {k: v for k, v in self.model_dump(exclude={"tiny_seed", "tiny_pretrain_steps"}).items() if v}


class DataSettings(FormGroup):
    """The clips and their latent cache (`prepare-data`)."""

    manifest: str = Field(None, description="Clip manifest (JSONL; videos relative to it) by URI. Empty: the synthetic surgical-like set.")
    size: str = Field(None, description="Cache bucket WIDTHxHEIGHT. Default 832x480; tiny presets 64x64.")
    frames: int = Field(None, ge=1, le=MAX_FRAMES, description="Frames per clip, 4k+1. Default 81; tiny presets 17.")
    dtype: Literal["float32", "bf16", "fp16"] = Field(None, description="VAE/text-encoder dtype. Default bf16; tiny float32.")
    embed_dtype: Literal["float32", "bf16"] = Field(None, description="Stored text embeddings. Default bf16; tiny float32.")
    synthetic_clips: int = Field(WorkflowConfig.model_fields["clips"].default, gt=1, le=100_000, description="Clips of the synthetic set.")
    synthetic_seed: Seed = Field(0, description="Seed of the synthetic set.")
    val_fraction: float = Field(0.2, ge=0, lt=1, description="Share of synthetic clips held out for validation.")

    @field_validator("size")
    @classmethod
    def _check_size(cls, value: str) -> str:
        match = re.fullmatch(r"(\d+)x(\d+)", value)
        if match is None:
            raise ValueError(f"expected WIDTHxHEIGHT such as 832x480, got {value!r}")
        if not all(2 <= int(side) <= MAX_SIDE for side in match.groups()):
            raise ValueError(f"each side must be a whole number >= 2 and <= {MAX_SIDE}, got {value!r}")
        return value

    def resolved(self, tiny_preset: bool) -> dict[str, Any]:
        tiny = {"size": "x".join(map(str, _TINY.size)), "frames": _TINY.frames, "dtype": "float32", "embed_dtype": "float32"}
        real = {"size": "832x480", "frames": 81, "dtype": "bf16", "embed_dtype": "bf16"}
        return (tiny if tiny_preset else real) | self.model_dump(exclude_none=True, include=set(real))


class MergeSettings(FormGroup):
    lora_multiplier: float = Field(1.0, ge=-10, le=10, description="Strength of the stage-1 LoRA folded into both experts.")


class StageResources(FormGroup):
    gpus: int = Field(None, ge=0, le=64, description="GPUs (0: CPU; > 1: accelerate launch). Default: 0 for tiny presets, else 1.")
    timeout_minutes: float = Field(24 * 60, gt=0, le=30 * 24 * 60, description="The stage command is killed (its whole process group) after this.")
    retries: int = Field(1, ge=0, le=5, description="Retries after a failure other than bad input; training resumes from its last saved state.")
    stop_grace_s: float = Field(
        90.0,
        ge=0,
        le=3600,
        description="On a timeout or a cancelled run the stage command gets SIGTERM, then SIGKILL after this "
        "long: a training command saves its state at the next optimizer step (exit code 143) and a retry resumes from it.",
    )


class Resources(BaseModel):
    """GPUs, time limits and retries per stage. A stage's empty `gpus` is taken from the worker's
    environment (LORA_MOE_<STAGE>_GPUS, else LORA_MOE_GPUS: job variables of a deployment), else
    0 for the tiny presets and 1 for the real ones."""

    model_config = ConfigDict(extra="forbid")

    prepare_data: StageResources = StageResources(timeout_minutes=12 * 60, retries=2)
    stage1: StageResources = StageResources()
    merge: StageResources = StageResources(gpus=0, timeout_minutes=6 * 60, retries=2)
    stage2: StageResources = StageResources()
    eval: StageResources = StageResources(timeout_minutes=6 * 60)

    def resolved(self, tiny_preset: bool, environ: dict[str, str]) -> Resources:
        """Every stage's `gpus` filled in: the parameter, else the environment, else the preset's."""
        stages = {}
        for name in type(self).model_fields:
            stage = getattr(self, name)
            if stage.gpus is None:
                stage = stage.model_copy(update={"gpus": _gpus_from_env(name, environ, 0 if tiny_preset else 1)})
            stages[name] = stage
        return type(self)(**stages)


def _gpus_from_env(stage: str, environ: dict[str, str], default: int) -> int:
    for variable in (f"LORA_MOE_{stage.upper()}_GPUS", "LORA_MOE_GPUS"):
        value = environ.get(variable, "").strip()
        if value:
            if not value.isdigit():
                raise MoeError(f"{variable}={value!r} must be a number of GPUs (0 for the CPU)")
            return int(value)
    return default


class StorageSettings(BaseModel):
    """S3 options (for s3:// URIs) and the worker's scratch folder."""

    model_config = ConfigDict(extra="forbid")

    s3: S3Options = S3Options()
    work_dir: str | None = Field(
        None,
        description="Worker scratch and download cache. Default: LORA_MOE_WORK_DIR, else ARTIFACT_ROOT/work for a "
        "local root or ~/.cache/lora-moe for S3.",
    )


class RunPlan(BaseModel):
    """Everything a run resolves before its first stage: where its outputs and MLflow runs go,
    and the options each stage runs with (a setting left empty takes the preset's value)."""

    model_config = ConfigDict(frozen=True)

    preset: str
    task: str  # the model task (tiny-t2v, t2v-A14B ...)
    tiny: bool
    root_uri: str  # the artifact store's root
    local_root: Path | None  # the same as a folder, None for S3
    work_dir: Path
    tracking_uri: str
    data: dict[str, Any]
    stage1: dict[str, Any]
    stage2: dict[str, Any]  # stage 1's targets and ranks included
    eval: dict[str, Any]
    gate: dict[str, Any]
    resources: Resources
    settings: dict[str, Any]  # every setting with where it came from (`surfaces.settings_markdown`)


def plan_run(
    run,
    environ: dict[str, str],
    preset: str,
    artifact_root: str | None,
    models: ModelInputs,
    data: DataSettings,
    stage1: BaseModel,
    merge: MergeSettings,
    stage2: BaseModel,
    evaluation: BaseModel,
    gate: PromotionGate,
    tracking: TrackingSettings,
    storage: StorageSettings,
    resources: Resources,
) -> RunPlan:
    """The flow's parameters resolved against the worker's environment, after the checks that
    come before any server is contacted (the models a preset needs, the trust boundary)."""
    from prefect import get_run_logger

    from tasks.artifacts.store import open_store

    task, tiny = TINY_PRESETS.get(preset, preset), preset in TINY_PRESETS
    check_models(preset, models)
    form_root, artifact_root = artifact_root, artifact_root or environ.get("LORA_MOE_ARTIFACT_ROOT") or "outputs/pipeline"
    check_trust(run, form_root, artifact_root, models, data, {"stage1": stage1, "stage2": stage2}, tracking, storage, environ)
    resources = resources.resolved(tiny, environ)
    local = _local_root(artifact_root)
    work_dir = Path(storage.work_dir or environ.get("LORA_MOE_WORK_DIR") or (local / "work" if local else Path.home() / ".cache" / "lora-moe"))
    given_tracking_uri = tracking.tracking_uri or environ.get("MLFLOW_TRACKING_URI")  # the parameter, else the worker's
    tracking_uri = given_tracking_uri or f"sqlite:///{(local or work_dir) / 'mlflow.db'}"
    if local is None and given_tracking_uri is None:
        get_run_logger().warning(f"no tracking URI for an S3 artifact root: MLflow runs go to {tracking_uri} on this machine only")
    stage1_cfg = resolve_settings(stage1, tiny, TINY_STAGE1)
    stage2_cfg = {k: v for k, v in stage1_cfg.items() if k in TARGET_FLAGS} | resolve_settings(stage2, tiny, TINY_STAGE2)
    data_cfg = data.resolved(tiny)
    eval_cfg = resolve_settings(evaluation, tiny, TINY_EVAL)
    return RunPlan(
        preset=preset,
        task=task,
        tiny=tiny,
        root_uri=open_store(artifact_root, storage.s3).root_uri,
        local_root=local,
        work_dir=work_dir,
        tracking_uri=tracking_uri,
        data=data_cfg,
        stage1=stage1_cfg,
        stage2=stage2_cfg,
        eval=eval_cfg,
        gate=gate.model_dump(mode="json"),
        resources=resources,
        settings=effective_settings(tiny, data, data_cfg, stage1, stage1_cfg, merge, stage2, stage2_cfg, evaluation, eval_cfg, gate, resources),
    )


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
            raise MoeError(
                f"preset {task} needs the base model URIs (models.dit, models.dit_high_noise, models.vae, "
                "models.text_encoder, models.tokenizer); only the tiny presets make their own"
            )
        return
    needed = {"dit", "vae", "text_encoder", "tokenizer"} | ({"dit_high_noise"} if PRESETS[task].boundary is not None else set())
    missing = sorted(needed - set(given))
    if missing:
        raise MoeError(f"models: {', '.join(missing)} not given; pass every base model URI or none (tiny presets only)")


def check_trust(
    run,
    form_root: str | None,
    artifact_root: str,
    models: ModelInputs,
    data: DataSettings,
    stage_settings: dict[str, BaseModel],
    tracking: TrackingSettings,
    storage: StorageSettings,
    environ: dict[str, str],
) -> None:
    """The worker's trust boundary (`tasks.trust`): a deployment run's form cannot redirect the
    worker's credentials or read its files, and every URI lies inside the worker's allow-lists."""
    inputs = {f"models.{k}": v for k, v in models.given().items()} | ({"data.manifest": data.manifest} if data.manifest else {})
    inputs |= {
        f"{name}.sample_prompts": prompts for name, settings in stage_settings.items() if (prompts := getattr(settings, "sample_prompts", None))
    }
    form_outputs = frozenset({"artifact_root"} if form_root else set()) | ({"storage.work_dir"} if storage.work_dir else set())
    check_run(
        environ,
        deployment_run=run.deployment_id is not None,
        artifact_root=artifact_root,
        tracking_uri=tracking.tracking_uri,
        s3_endpoint=storage.s3.endpoint_url,
        s3_profile=storage.s3.profile,
        work_dir=storage.work_dir,
        inputs=inputs,
        form_outputs=form_outputs,
    )


def effective_settings(
    tiny: bool,
    data: DataSettings,
    data_cfg: dict,
    stage1: BaseModel,
    stage1_cfg: dict,
    merge: MergeSettings,
    stage2: BaseModel,
    stage2_cfg: dict,
    evaluation: BaseModel,
    eval_cfg: dict,
    gate: PromotionGate,
    resources: Resources,
) -> dict[str, dict[str, tuple[Any, str]]]:
    """Every setting of the run as its stage will use it, with where it came from (`surfaces`)."""

    def preset(values: dict) -> frozenset[str]:
        return frozenset(values) if tiny else frozenset()

    data_resolved = {"manifest": "(none: synthetic clips)"} | data.model_dump(mode="json", exclude_none=True) | data_cfg
    return {
        "data": surfaces.effective_settings(data, None, data_resolved, preset({"size", "frames", "dtype", "embed_dtype"})),
        "stage1": surfaces.effective_settings(stage1, Stage1Config, stage1_cfg, preset(TINY_STAGE1)),
        "merge": surfaces.effective_settings(merge, None, merge.model_dump(mode="json")),
        "stage2": surfaces.effective_settings(stage2, Stage2Config, stage2_cfg, preset(TINY_STAGE2), inherited=frozenset(TARGET_FLAGS)),
        "eval": surfaces.effective_settings(evaluation, EvalConfig, eval_cfg, preset(TINY_EVAL)),
        "gate": surfaces.effective_settings(gate, None, gate.model_dump(mode="json")),
        "resources": {
            f"{stage}.{field}": (value, "resolved")
            for stage in type(resources).model_fields
            for field, value in getattr(resources, stage).model_dump(mode="json").items()
        },
    }


STAGE_ORDER: tuple[tuple[str, ...], ...] = (
    ("tiny-models", "synth-data"),
    ("prepare-data",),
    ("stage1-train",),
    ("merge-low", "merge-high"),
    ("stage2-train",),
    ("eval",),
    ("register",),
)
StageName = Literal["tiny-models", "synth-data", "prepare-data", "stage1-train", "merge-low", "merge-high", "stage2-train", "eval", "register"]


def forced_stages(force: str | None) -> set[str]:
    """The named stage and every stage after it."""
    if force is None:
        return set()
    level = next(i for i, names in enumerate(STAGE_ORDER) if force in names)
    return {name for names in STAGE_ORDER[level:] for name in names}


__all__ = [
    "DataSettings",
    "EvalSettings",
    "MergeSettings",
    "ModelInputs",
    "Preset",
    "PromotionGate",
    "Resources",
    "RunPlan",
    "S3Options",
    "Stage1Settings",
    "Stage2Settings",
    "StageName",
    "StorageSettings",
    "TrackingSettings",
    "check_models",
    "forced_stages",
    "plan_run",
    "resolve_settings",
]
