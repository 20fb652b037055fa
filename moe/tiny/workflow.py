"""The whole two-stage workflow in one call, on the embedded tiny default.

    models -> synthetic data -> latent cache -> stage 1 -> merge-low || merge-high -> stage 2 -> eval

It writes the reference workflow's file structure under the output folder:

    DIR/vanilla_lora_stage1/vanilla_lora.safetensors
    DIR/merged_dits/merged_low_noise.safetensors, merged_high_noise.safetensors
    DIR/lora_moe_stage2/lora_moe_stage2.safetensors (+ logs/)
    DIR/eval/report.md, eval_report.json, plots/, samples/ (base vs stage 1 vs stage 2)

Every stage is a plain `moe` call; the Prefect flow runs the same calls as separate tasks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel

from moe.config.file_names import MODEL_SET_FILE, VANILLA_LORA_FILE
from moe.config.workflow import STAGES, WorkflowConfig, eval_options, stage1_options, stage2_options
from moe.files.output_paths import claim_output


class WorkflowPaths(BaseModel):
    models: Path
    data: Path
    manifest: Path
    cache: Path
    stage1: Path
    vanilla_lora: Path
    merged_dir: Path
    merged_low: Path
    merged_high: Path
    stage2: Path
    eval: Path

    @classmethod
    def under(cls, root: Path) -> WorkflowPaths:
        return cls(
            models=root / "models",
            data=root / "data",
            manifest=root / "data" / "manifest.jsonl",
            cache=root / "cache",
            stage1=root / "vanilla_lora_stage1",
            vanilla_lora=root / "vanilla_lora_stage1" / VANILLA_LORA_FILE,
            merged_dir=root / "merged_dits",
            merged_low=root / "merged_dits" / "merged_low_noise.safetensors",
            merged_high=root / "merged_dits" / "merged_high_noise.safetensors",
            stage2=root / "lora_moe_stage2",
            eval=root / "eval",
        )


def merge_both_experts(low: Path, high: Path, lora: Path, out_low: Path, out_high: Path, multiplier: float = 1.0, overwrite: bool = False) -> None:
    """Merge one LoRA into the low- and high-noise DiTs concurrently (the merge is I/O bound and
    releases the GIL in reads, writes, hashing and matmuls)."""
    from moe.merge import merge_lora_into_checkpoint

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(merge_lora_into_checkpoint, src, lora, dst, multiplier, None, False, False, overwrite=overwrite)
            for src, dst in ((low, out_low), (high, out_high))
        ]
        for job in jobs:
            job.result()


def run_workflow(cfg: WorkflowConfig, log=print) -> dict:
    """Run the stages up to `cfg.until`; returns a summary of losses and output paths. The output
    folder is held for the whole run; a previous run in it is replaced only with `overwrite`."""
    task = cfg.task  # an unknown preset fails before anything is touched
    with claim_output(cfg.output_dir, flag="--output_dir", overwrite=cfg.overwrite, is_ours=_holds_a_run, folder=True):
        return _run_stages(cfg, task, log)


def _holds_a_run(folder: Path) -> bool:
    return (WorkflowPaths.under(folder).models / MODEL_SET_FILE).is_file()


def _run_stages(cfg: WorkflowConfig, task: str, log) -> dict:
    from moe.config.train import TARGET_FLAGS, Stage1Config, Stage2Config
    from moe.data.cache import build_cache
    from moe.eval import EvalConfig, evaluate
    from moe.tiny.model_set import write_tiny_model_set
    from moe.tiny.synth import synthesize_dataset
    from moe.train.stage1 import train_stage1
    from moe.train.stage2 import LORA_MOE_FILE, train_stage2

    p = WorkflowPaths.under(cfg.output_dir)
    last = STAGES.index(cfg.until)
    summary: dict = {"task": task, "output_dir": str(cfg.output_dir)}

    log(f"[1/7] tiny {task} model set -> {p.models}")
    models = write_tiny_model_set(p.models, task, cfg.seed, overwrite=cfg.overwrite, pretrain_steps=cfg.pretrain_steps, progress=cfg.progress)
    log(f"[2/7] synthetic surgical clips -> {p.data}")
    manifest = synthesize_dataset(p.data, clips=cfg.clips, frames=cfg.frames, size=cfg.size, seed=cfg.seed, overwrite=cfg.overwrite)
    summary["manifest"] = str(manifest)
    if last < STAGES.index("cache"):
        return summary

    log(f"[3/7] latent cache -> {p.cache}")
    build_cache(manifest, p.cache, task, model_set=p.models, size=cfg.size, frames=cfg.frames, progress=cfg.progress, overwrite=cfg.overwrite)
    if last < STAGES.index("stage1"):
        return summary

    log(f"[4/7] stage 1: vanilla LoRA -> {p.stage1}")
    stage1 = Stage1Config(
        task=task,
        dit=models.low_noise,
        dit_high_noise=models.high_noise,
        dataset=p.cache,
        output_dir=p.stage1,
        progress=cfg.progress,
        **stage1_options(cfg),
        overwrite=cfg.overwrite,
    )
    m1 = train_stage1(stage1)
    summary |= {"vanilla_lora": str(p.vanilla_lora), "stage1_val_loss_base": m1["val_loss_base"], "stage1_val_loss_final": m1["val_loss_final"]}
    if last < STAGES.index("merge"):
        return summary

    log(f"[5/7] merge into both experts (in parallel) -> {p.merged_dir}")
    merge_both_experts(models.low_noise, models.high_noise, p.vanilla_lora, p.merged_low, p.merged_high, overwrite=cfg.overwrite)
    summary |= {"merged_low_noise": str(p.merged_low), "merged_high_noise": str(p.merged_high)}
    if last < STAGES.index("stage2"):
        return summary

    log(f"[6/7] stage 2: LoRA-MoE experts + router -> {p.stage2}")
    stage2 = Stage2Config(
        **stage1.model_dump(include=set(TARGET_FLAGS) | {"task", "seed", "progress", "overwrite"}),
        dit=p.merged_low,
        dit_high_noise=p.merged_high,
        dataset=p.cache,
        output_dir=p.stage2,
        **stage2_options(cfg),
    )
    m2 = train_stage2(stage2)
    summary |= {"lora_moe": str(p.stage2 / LORA_MOE_FILE)} | {
        k: m2[k] for k in ("routing_accuracy", "roi_loss_correct_hint", "roi_loss_wrong_hint", "val_loss_stage1", "val_loss_stage2")
    }
    if last < STAGES.index("eval"):
        return summary

    log(f"[7/7] eval: base vs stage 1 vs stage 2, plots, samples, gate -> {p.eval}")
    report = evaluate(
        EvalConfig(
            task=task,
            merged_dit=p.merged_low,
            merged_dit_high_noise=p.merged_high,
            lora_moe_weights=p.stage2 / LORA_MOE_FILE,
            dataset=p.cache,
            output_dir=p.eval,
            dit=models.low_noise,
            dit_high_noise=models.high_noise,
            model_set=p.models,
            manifest=manifest,
            overwrite=True,
            progress=cfg.progress,
            **eval_options(cfg),
        )
    )
    headline = [
        "stage1_overall_improvement_over_base",
        "stage2_learned_roi_improvement_over_stage1",
        "hint_correct_vs_wrong_roi_margin",
        "routing_top1_accuracy",
    ]
    headline += [f"knockout_{e}_own_class_roi_delta" for e in report.routing.experts]
    summary |= {"eval_report": str(p.eval / "report.md"), "gate_passed": report.gate.passed}
    summary |= {f"eval_{k}": report.metrics[k] for k in headline if k in report.metrics}
    return summary
