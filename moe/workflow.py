"""The whole two-stage workflow in one call, on the embedded tiny default.

    models -> synthetic data -> latent cache -> stage 1 -> merge-low || merge-high -> stage 2

It writes the reference workflow's file structure under the output folder:

    DIR/vanilla_lora_stage1/vanilla_lora.safetensors
    DIR/merged_dits/merged_low_noise.safetensors, merged_high_noise.safetensors
    DIR/lora_moe_stage2/lora_moe_stage2.safetensors (+ logs/)

Every stage is a plain `moe` call; the Prefect flow runs the same calls as separate tasks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from moe.errors import MoeError

STAGES = ("data", "cache", "stage1", "merge", "stage2")
Stage = Literal["data", "cache", "stage1", "merge", "stage2"]
TINY_PRESETS = {"tiny": "tiny-t2v", "tiny-t2v": "tiny-t2v", "tiny-i2v": "tiny-i2v"}


class WorkflowConfig(BaseModel):
    output_dir: Path
    preset: str = Field("tiny", description="tiny (= tiny-t2v) or tiny-i2v.")
    until: Stage = "stage2"
    seed: int = 0
    # Sized so the tiny run learns visibly (stage 1) and the experts specialise (stage 2) in about
    # a minute on 2 CPU cores; tiny models take far higher learning rates than real ones.
    clips: int = 64
    frames: int = 17
    size: tuple[int, int] = (64, 64)
    stage1_epochs: int = 40
    stage1_learning_rate: float = 1e-2
    stage1_rank: int = 8
    stage2_epochs: int = 40
    stage2_learning_rate: float = 1e-2
    progress: bool = True

    @property
    def task(self) -> str:
        try:
            return TINY_PRESETS[self.preset]
        except KeyError:
            raise MoeError(
                f"unknown --preset {self.preset!r}: the one-command workflow runs the tiny presets "
                f"({', '.join(TINY_PRESETS)}); for real Wan2.2 weights run the stage commands (see README)"
            ) from None


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

    @classmethod
    def under(cls, root: Path) -> WorkflowPaths:
        return cls(
            models=root / "models",
            data=root / "data",
            manifest=root / "data" / "manifest.jsonl",
            cache=root / "cache",
            stage1=root / "vanilla_lora_stage1",
            vanilla_lora=root / "vanilla_lora_stage1" / "vanilla_lora.safetensors",
            merged_dir=root / "merged_dits",
            merged_low=root / "merged_dits" / "merged_low_noise.safetensors",
            merged_high=root / "merged_dits" / "merged_high_noise.safetensors",
            stage2=root / "lora_moe_stage2",
        )


def merge_both_experts(low: Path, high: Path, lora: Path, out_low: Path, out_high: Path, multiplier: float = 1.0) -> None:
    """Merge one LoRA into the low- and high-noise DiTs concurrently (the merge is I/O bound and
    releases the GIL in reads, writes, hashing and matmuls)."""
    from moe.merge import merge_lora_into_checkpoint

    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = [
            pool.submit(merge_lora_into_checkpoint, src, lora, dst, multiplier, None, False, False)
            for src, dst in ((low, out_low), (high, out_high))
        ]
        for job in jobs:
            job.result()


def run_workflow(cfg: WorkflowConfig, log=print) -> dict:
    """Run the stages up to `cfg.until`; returns a summary of losses and output paths."""
    from moe.data.cache import build_cache
    from moe.data.synth import synthesize_dataset
    from moe.train.config import TARGET_FLAGS, Stage1Config, Stage2Config
    from moe.train.stage1 import train_stage1
    from moe.train.stage2 import LORA_MOE_FILE, train_stage2
    from moe.wan.model_set import write_tiny_model_set

    task = cfg.task
    p = WorkflowPaths.under(cfg.output_dir)
    last = STAGES.index(cfg.until)
    summary: dict = {"task": task, "output_dir": str(cfg.output_dir)}

    log(f"[1/6] tiny {task} model set -> {p.models}")
    models = write_tiny_model_set(p.models, task, cfg.seed)
    log(f"[2/6] synthetic surgical clips -> {p.data}")
    manifest = synthesize_dataset(p.data, clips=cfg.clips, frames=cfg.frames, size=cfg.size, seed=cfg.seed)
    summary["manifest"] = str(manifest)
    if last < STAGES.index("cache"):
        return summary

    log(f"[3/6] latent cache -> {p.cache}")
    build_cache(manifest, p.cache, task, model_set=p.models, size=cfg.size, frames=cfg.frames, progress=cfg.progress)
    if last < STAGES.index("stage1"):
        return summary

    log(f"[4/6] stage 1: vanilla LoRA -> {p.stage1}")
    stage1 = Stage1Config(
        task=task,
        dit=models.low_noise,
        dit_high_noise=models.high_noise,
        dataset=p.cache,
        output_dir=p.stage1,
        network_dim=cfg.stage1_rank,
        rank_q=cfg.stage1_rank,
        learning_rate=cfg.stage1_learning_rate,
        max_train_epochs=cfg.stage1_epochs,
        save_every_n_epochs=cfg.stage1_epochs,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    m1 = train_stage1(stage1)
    summary |= {"vanilla_lora": str(p.vanilla_lora), "stage1_val_loss_base": m1["val_loss_base"],
                "stage1_val_loss_final": m1["val_loss_final"]}
    if last < STAGES.index("merge"):
        return summary

    log(f"[5/6] merge into both experts (in parallel) -> {p.merged_dir}")
    merge_both_experts(models.low_noise, models.high_noise, p.vanilla_lora, p.merged_low, p.merged_high)
    summary |= {"merged_low_noise": str(p.merged_low), "merged_high_noise": str(p.merged_high)}
    if last < STAGES.index("stage2"):
        return summary

    log(f"[6/6] stage 2: LoRA-MoE experts + router -> {p.stage2}")
    stage2 = Stage2Config(
        **stage1.model_dump(include=set(TARGET_FLAGS) | {"task", "seed", "progress"}),
        dit=p.merged_low,
        dit_high_noise=p.merged_high,
        dataset=p.cache,
        output_dir=p.stage2,
        learning_rate=cfg.stage2_learning_rate,
        max_train_epochs=cfg.stage2_epochs,
        save_every_n_epochs=cfg.stage2_epochs,
    )
    m2 = train_stage2(stage2)
    summary |= {"lora_moe": str(p.stage2 / LORA_MOE_FILE)} | {
        k: m2[k] for k in ("routing_accuracy", "roi_loss_correct_hint", "roi_loss_wrong_hint", "val_loss_stage1", "val_loss_stage2")
    }
    return summary
