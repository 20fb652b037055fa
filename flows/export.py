"""The `export-champion` flow: a registered version's LoRAs in every tool's form, with a README
that says which file goes where. The `export-champion` deployment (`deploy/prefect.yaml`) runs
it when the pipeline emits `lora-moe.champion.promoted` (the version comes from the event).

    stage1/vanilla_lora.safetensors            the stage-1 LoRA (default form: diffusers, ComfyUI)
    stage1/vanilla_lora_musubi.safetensors     the same in musubi-tuner's form (musubi, ComfyUI)
    experts/EXPERT.safetensors                 each stage-2 expert as a vanilla LoRA (`export-expert`)
    experts/EXPERT_musubi.safetensors          ... in musubi-tuner's form
    [*_peft.safetensors                        with "peft" in `forms`: diffusers' own saved form]
    README.md, export.json                     which file goes where; the source version and hashes

The flow process never imports torch: every file is written by a `lora-moe` command
(`convert-lora`, `export-expert`) run as a child through `tasks.stages.launcher`, as the pipeline's
stages are. Inputs are the version's bundle (its LoRA-MoE file, checked against the sha256 the
version recorded) and the stage-1 LoRA its bundle names (fetched and verified by sha256). The
export folder is stored under ARTIFACT_ROOT/exports/MODEL/vVERSION/FLOW_RUN_ID/ and the version
gets the tag `exported_to`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext
from pydantic import BaseModel, Field

from moe.config.instruments import INSTRUMENT_CLASSES
from moe.errors import MoeError
from tasks.artifacts.refs import ArtifactRef
from tasks.registry.tracking import DEFAULT_MODEL_NAME

FLOW_NAME = "export-champion"
Form = Literal["default", "musubi", "peft"]
Expert = Literal[tuple(INSTRUMENT_CLASSES)]  # type: ignore[valid-type]
SUFFIX = {"default": "", "musubi": "_musubi", "peft": "_peft"}


class ExportSummary(BaseModel):
    model: str
    version: str
    export: ArtifactRef  # the folder
    files: dict[str, str]  # relative path -> sha256
    readme: str


def _tracking_uri(given: str | None, local_root: Path | None, work_dir: Path) -> str:
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(local_root or work_dir) / 'mlflow.db'}"


def readme(model: str, version: str, task_name: str, files: dict[str, str], bundle: dict) -> str:
    """README.md of an export: which file goes where in diffusers, ComfyUI and musubi-tuner."""
    refs = bundle.get("artifacts", {})

    def uri(name: str) -> str:
        return f"`{refs[name]['uri']}` (sha256 `{refs[name]['sha256'][:16]}`)" if name in refs else "(not recorded)"

    def listed(prefix: str) -> list[str]:
        return [f"- `{path}`" for path in sorted(files) if path.startswith(prefix)]

    return "\n".join(
        [
            f"# LoRAs of {model} v{version} (`{task_name}`)",
            "",
            "Written by the `export-champion` flow (`lora-moe convert-lora`, `lora-moe export-expert`). Forms: "
            "*default* (`diffusion_model.*` keys: diffusers `load_lora_weights`, ComfyUI LoraLoader), *musubi* "
            "(`lora_unet_*` keys: musubi-tuner `--lora_weight`, ComfyUI), *peft* (diffusers' own saved form: diffusers "
            'only). The README of wan-lora-moe, "LoRA files across tools", has the details.',
            "",
            "## Stage 1: a LoRA on the base Wan2.2 DiTs",
            "",
            *listed("stage1/"),
            "",
            "Apply it to the **base** DiTs, both experts:",
            f"- base low-noise DiT {uri('base_dit')}",
            f"- base high-noise DiT {uri('base_dit_high_noise')}",
            "",
            'diffusers: `pipe.load_lora_weights("stage1/vanilla_lora.safetensors", load_into_transformer_2=True)`. '
            "ComfyUI: `models/loras/`, a LoraLoaderModelOnly on each of the two diffusion models. musubi-tuner: "
            "`--lora_weight stage1/vanilla_lora_musubi.safetensors`.",
            "",
            "## Stage 2: one LoRA per instrument expert, on the MERGED DiTs",
            "",
            *listed("experts/"),
            "",
            "Each expert is a vanilla LoRA (gate g = 1, its timestep gate baked in) and a delta on the **merged** DiTs "
            "(stage 1 folded in), not on the base ones:",
            f"- merged low-noise DiT {uri('merged_low_noise')}",
            f"- merged high-noise DiT {uri('merged_high_noise')}",
            "",
            "ComfyUI: put the merged DiTs in `models/diffusion_models/` and an expert in `models/loras/`. musubi-tuner: "
            "`--dit MERGED_LOW --dit_high_noise MERGED_HIGH --lora_weight experts/EXPERT_musubi.safetensors`. diffusers: "
            'build the pipeline from the merged DiTs, then `load_lora_weights("experts/EXPERT.safetensors", '
            "load_into_transformer_2=True)`. The routed model itself (router and timestep gates, all experts at once) "
            f"runs with `lora-moe generate --model models:/{model}/{version}`.",
            "",
            "sha256 of every file: `export.json`.",
            "",
        ]
    )


@task(name="export-loras", task_run_name="export-loras", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def export_loras(
    model: str,
    version: str,
    tracking_uri: str,
    forms: list[str],
    experts: list[str],
    bake_sigma: float,
    work: Path,
    downloads: Path,
    timeout_s: float,
) -> tuple[Path, dict, str]:
    """The version's bundle and stage-1 LoRA, fetched and verified, written in every form into
    `work/export` by `lora-moe` commands. Returns (folder, bundle.json, task)."""
    from tasks.artifacts.download_cache import DownloadCache
    from tasks.artifacts.s3 import S3Options
    from tasks.registry.bundle import verified_lora_moe
    from tasks.registry.tracking import mlflow_client
    from tasks.registry.versions import download_bundle, get_version, lora_moe_sha256, read_bundle
    from tasks.stages.launcher import run_command, stage_command

    logger = get_run_logger()
    client = mlflow_client(tracking_uri)
    found = get_version(client, model, version)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        bundle_dir = download_bundle(found, Path(tmp), tracking_uri)
        bundle = read_bundle(bundle_dir)
        lora_moe = work / "lora_moe_stage2.safetensors"
        shutil.copyfile(verified_lora_moe(bundle_dir, bundle, lora_moe_sha256(found)), lora_moe)
    if "vanilla_lora" not in bundle["artifacts"]:
        raise MoeError(f"{model} v{found.version}: its bundle names no vanilla_lora ref")
    vanilla = DownloadCache(downloads, S3Options()).fetch(ArtifactRef.model_validate(bundle["artifacts"]["vanilla_lora"]))
    out = work / "export"
    shutil.rmtree(out, ignore_errors=True)  # a retry writes it again
    (out / "stage1").mkdir(parents=True)
    (out / "experts").mkdir()

    def run(args: list, name: str) -> None:
        run_command(stage_command([str(a) for a in args], 0), name, logger.info, timeout_s=timeout_s, cwd=work)

    shutil.copyfile(vanilla, out / "stage1" / "vanilla_lora.safetensors")  # stage 1 writes the default form
    for form in forms:
        if form != "default":
            run(
                [
                    "convert-lora",
                    out / "stage1" / "vanilla_lora.safetensors",
                    "--to",
                    form,
                    "--out",
                    out / "stage1" / f"vanilla_lora{SUFFIX[form]}.safetensors",
                ],
                f"convert-stage1-{form}",
            )
    if "default" not in forms:
        (out / "stage1" / "vanilla_lora.safetensors").unlink()
    for expert in experts:
        target = out / "experts" / f"{expert}.safetensors"
        run(
            [
                "export-expert",
                "--lora_moe_weights",
                lora_moe,
                "--expert",
                expert,
                "--out",
                target,
                "--bake_sigma",
                bake_sigma,
                *(["--musubi_copy"] if "musubi" in forms else []),
            ],
            f"export-{expert}",
        )
        if "peft" in forms:
            run(["convert-lora", target, "--to", "peft", "--out", target.with_name(f"{expert}_peft.safetensors")], f"convert-{expert}-peft")
        if "default" not in forms:
            target.unlink()
    return out, bundle, bundle["task"]


@flow(
    name=FLOW_NAME,
    persist_result=False,
    log_prints=True,
    flow_run_name=lambda: "export-{model}-v{version}".format_map(
        {"model": DEFAULT_MODEL_NAME, "version": "champion"} | dict(FlowRunContext.get().parameters or {})
    ),
    description="A registered LoRA-MoE version's LoRAs in every tool's form (diffusers, ComfyUI, musubi-tuner), "
    "with a README; triggered when the pipeline moves `champion`.",
)
def export_champion(
    model: str = DEFAULT_MODEL_NAME,
    version: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$")] = "champion",
    forms: Annotated[list[Form], Field(min_length=1)] = ["default", "musubi"],  # noqa: B006 (Prefect copies defaults)
    experts: list[Expert] | None = None,
    bake_sigma: Annotated[float, Field(ge=0, le=1)] = 0.0,
    artifact_root: str | None = None,
    tracking_uri: str | None = None,
    work_dir: str | None = None,
    timeout_minutes: Annotated[float, Field(gt=0, le=24 * 60)] = 60.0,
) -> ExportSummary:
    """Export a registered version's LoRAs.

    Args:
        model: Registered model name.
        version: Version number, or an alias (champion). The deployment's trigger passes the number
            the event names, so a later promotion does not change what this run exports.
        forms: default (diffusers, ComfyUI), musubi (musubi-tuner, ComfyUI), peft (diffusers' own form).
        experts: Stage-2 experts to export (empty: all).
        bake_sigma: The timestep gate is baked in at this sigma (0: full strength).
        artifact_root: Where the export is stored (exports/...): s3://bucket/prefix or a folder. Empty: the
            worker's LORA_MOE_ARTIFACT_ROOT, else outputs/pipeline.
        tracking_uri: MLflow registry. Empty: the worker's MLFLOW_TRACKING_URI, else ARTIFACT_ROOT/mlflow.db.
        work_dir: Scratch folder. Empty: LORA_MOE_WORK_DIR, else ARTIFACT_ROOT/work (local) or ~/.cache/lora-moe.
        timeout_minutes: Limit of each `lora-moe` command.
    """
    from tasks.artifacts.local import local_path
    from tasks.artifacts.store import open_store
    from tasks.registry.tracking import default_mlflow_request_limits
    from tasks.trust import check_run

    default_mlflow_request_limits()  # a dead tracking server fails the run in minutes, not hours
    logger = get_run_logger()
    run = FlowRunContext.get().flow_run
    root = artifact_root or os.environ.get("LORA_MOE_ARTIFACT_ROOT") or "outputs/pipeline"
    check_run(
        dict(os.environ),
        deployment_run=run.deployment_id is not None,
        artifact_root=root,
        tracking_uri=tracking_uri,
        s3_endpoint=None,
        s3_profile=None,
        work_dir=work_dir,
        inputs={},
    )
    local = None if root.startswith("s3://") else local_path(root)
    scratch = Path(work_dir or os.environ.get("LORA_MOE_WORK_DIR") or (local / "work" if local else Path.home() / ".cache" / "lora-moe"))
    uri = _tracking_uri(tracking_uri, local, scratch)
    work = scratch / "exports" / str(run.id)
    work.mkdir(parents=True, exist_ok=True)
    try:
        out, bundle, task_name = export_loras(
            model,
            version,
            uri,
            list(dict.fromkeys(forms)),
            list(experts or INSTRUMENT_CLASSES),
            bake_sigma,
            work,
            scratch / "downloads",
            timeout_minutes * 60,
        )
        from moe.files.hashing import sha256_file
        from tasks.registry.tracking import mlflow_client
        from tasks.registry.versions import get_version

        number = str(get_version(mlflow_client(uri), model, version).version)
        files = {str(p.relative_to(out)): sha256_file(p) for p in sorted(out.rglob("*.safetensors"))}
        text = readme(model, number, task_name, files, bundle)
        (out / "README.md").write_text(text)
        (out / "export.json").write_text(
            json.dumps({"model": model, "version": number, "task": task_name, "forms": forms, "bake_sigma": bake_sigma, "files": files}, indent=2)
        )
        store = open_store(root)
        ref = store.put(out, f"exports/{model}/v{number}/{run.id}", "lora_export", producer=f"{FLOW_NAME}@{run.id}")
        mlflow_client(uri).set_model_version_tag(model, number, "exported_to", ref.uri)
        logger.info(f"exported {len(files)} LoRA files of {model} v{number} to {ref.uri}")
        create_markdown_artifact(
            text + f"\n\nStored at `{ref.uri}` (sha256 `{ref.sha256[:16]}`).\n",
            key="lora-export",
            description=f"{model} v{number}: LoRA files for each tool",
        )
        return ExportSummary(model=model, version=number, export=ref, files=files, readme=text)
    finally:
        shutil.rmtree(work, ignore_errors=True)
