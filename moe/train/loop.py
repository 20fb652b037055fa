"""The one training loop both stages use (SPEC section 6).

A stage supplies a `TrainingModule`: the trainable parameters (adapters, router, gates) with a
forward that returns the loss for a micro-batch on the DiT that owns its sigma, a way to save its
weights file, and its evaluation. The loop does everything else: accelerate (devices, mixed
precision, DDP/FSDP), gradient accumulation, per-epoch seeded data order, sigma and noise (so a
resumed run continues exactly), AdamW with warmup + cosine, gradient clipping, non-finite loss
guard, checkpoints with optimizer/scheduler/RNG state, TensorBoard logs and a progress bar.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from moe.atomic import fsync_dir, fsync_tree, write_json_atomic
from moe.data.cache import CachedClipDataset, CacheIndex, collate_clips
from moe.errors import MoeError
from moe.train.config import TrainConfig
from moe.train.dual_dit import DualDiT, Expert
from moe.train.flow_matching import sample_sigmas

STATE_RE = re.compile(r"state-epoch-(\d+)")


class TrainingModule(nn.Module):
    """The part of a stage the loop trains. Frozen DiTs live in `self.dits` (a DualDiT, not a
    registered sub-module), so optimizers, DDP and checkpoints see only trainable weights."""

    dits: DualDiT

    def forward(self, batch: dict, sigma: torch.Tensor, noise: torch.Tensor, expert: Expert) -> dict[str, torch.Tensor]:
        """`{"loss": scalar, ...other logged scalars}` for one micro-batch."""
        raise NotImplementedError

    def on_step(self, step: int, total_steps: int) -> None:
        """Called before each optimizer step's micro-batches (schedules such as teacher forcing)."""

    def save_weights(self, path: Path) -> None:
        raise NotImplementedError

    def evaluate(self, items: list[dict], cfg: TrainConfig) -> dict:
        raise NotImplementedError


class TrainProgress:
    """Epoch and step counters, saved with the accelerate state."""

    def __init__(self):
        self.epoch = 0
        self.step = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])


def epoch_batches(entries: list, batch_size: int, generator: torch.Generator) -> list[list]:
    """Shuffled batches whose clips share a latent shape (a clip never pads or crops)."""
    order = torch.randperm(len(entries), generator=generator).tolist()
    by_shape: dict[tuple, list] = {}
    for i in order:
        by_shape.setdefault(tuple(entries[i].latent_shape), []).append(entries[i])
    batches = [group[j : j + batch_size] for group in by_shape.values() for j in range(0, len(group), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def latest_state(output_dir: Path) -> Path | None:
    states = [(int(m.group(1)), p) for p in output_dir.glob("state-epoch-*") if (m := STATE_RE.fullmatch(p.name))]
    return max(states)[1] if states else None


def _dit_dtype(cfg: TrainConfig) -> torch.dtype | None:
    if cfg.dit_dtype == "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    return getattr(torch, cfg.dit_dtype)


def _scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    from diffusers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
    )

    if cfg.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, cfg.lr_warmup_steps, max(total_steps, 1))
    return get_constant_schedule_with_warmup(optimizer, cfg.lr_warmup_steps)


def save_state_atomically(accelerator, target: Path) -> None:
    """accelerate's resumable state (weights, optimizer, scheduler, RNG of every process) into
    `target`: every process writes into one shared temporary folder, then the main process fsyncs
    it and renames it into place, so a crash never leaves a half-written state to resume from."""
    tmp = target.with_name(target.name + ".partial")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        fsync_tree(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    accelerator.wait_for_everyone()


def _save_checkpoint(accelerator, module: TrainingModule, output_dir: Path, epoch: int) -> None:
    """`checkpoint-epoch-N.safetensors` (weights, usable as is) + `state-epoch-N/` (resumable)."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(module).save_weights(output_dir / f"checkpoint-epoch-{epoch}.safetensors")
    save_state_atomically(accelerator, output_dir / f"state-epoch-{epoch}")


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def check_dits(cfg: TrainConfig) -> None:
    """The DiT files against the task, from their headers (fast, before anything is loaded)."""
    from moe.wan.checkpoint import check_checkpoint_task

    for path in (cfg.dit, cfg.dit_high_noise):
        check_checkpoint_task(path, cfg.preset)


def open_dataset(cfg: TrainConfig) -> CacheIndex:
    """The latent cache, checked against the task before any model is loaded."""
    index = CacheIndex.load(cfg.dataset, task=cfg.task)
    if not any(c.split == "train" for c in index.clips):
        raise MoeError(f"{cfg.dataset} has no training clips (all are split 'val')")
    cfg.sigma_range()  # fail early on an empty timestep range
    return index


def run_training(cfg: TrainConfig, module: TrainingModule, accelerator, run_name: str) -> dict:
    """Train `module` on the cache at `cfg.dataset`; returns the metrics written to metrics.json."""
    out = cfg.output_dir
    index = open_dataset(cfg)
    train_entries = [c for c in index.clips if c.split == "train"]
    low, high = cfg.sigma_range()

    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # Each process sees its own share of the batches.
    batches_per_epoch = math.ceil(math.ceil(len(train_entries) / cfg.batch_size) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.max_train_epochs
    # accelerate steps a prepared scheduler once per process per optimizer step.
    scheduler = _scheduler(cfg, optimizer, total_steps * accelerator.num_processes)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    inner: TrainingModule = accelerator.unwrap_model(module)
    progress = TrainProgress()
    accelerator.register_for_checkpointing(progress)

    if cfg.resume:
        state = latest_state(out)
        if state is None:
            raise MoeError(f"--resume: no state-epoch-N checkpoint in {out}; start without --resume")
        accelerator.load_state(str(state))
        accelerator.print(f"resumed from {state.name} (epoch {progress.epoch}, step {progress.step})")
    if accelerator.is_main_process:
        write_json_atomic(out / f"{run_name}_config.json", json.loads(cfg.model_dump_json()))
    accelerator.init_trackers(run_name)

    dataset = CachedClipDataset(index, split="train")
    by_id = {e.id: i for i, e in enumerate(dataset.entries)}
    bar = tqdm(
        total=total_steps, initial=progress.step, desc=run_name, unit="step",
        disable=not (cfg.progress and accelerator.is_local_main_process),
        mininterval=0.1 if sys.stderr.isatty() else 10.0,  # a log file gets a line every 10 s
    )
    started = time.monotonic()
    for epoch in range(progress.epoch, cfg.max_train_epochs):
        module.train()
        # Order, sigmas and noise come from a generator seeded per epoch: a resumed run draws
        # exactly what an uninterrupted one would.
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        batches = epoch_batches(dataset.entries, cfg.batch_size, g)
        # Every process must run the same number of micro-batches (each one is a collective
        # step under DDP): pad with the epoch's first batches, as DistributedSampler does.
        batches += batches[: -len(batches) % accelerator.num_processes]
        mine = batches[accelerator.process_index :: accelerator.num_processes]
        # Gradient accumulation by hand, in groups of --gradient_accumulation_steps micro-batches;
        # the last group of an epoch may be shorter and still ends in an optimizer step, so no
        # gradient leaks into the next epoch (accelerate's `accumulate` needs its own dataloader).
        accum = cfg.gradient_accumulation_steps
        for micro, entries in enumerate(mine):
            first, last = micro % accum == 0, (micro + 1) % accum == 0 or micro + 1 == len(mine)
            group = min(accum, len(mine) - micro // accum * accum)
            if first:
                inner.on_step(progress.step, total_steps)
            batch = _to_device(collate_clips([dataset[by_id[e.id]] for e in entries]), accelerator.device)
            sigma_value = float(sample_sigmas(1, g, cfg.timestep_sampling, cfg.discrete_flow_shift, low, high))
            sigma = torch.full((len(entries),), sigma_value, device=accelerator.device)
            noise = torch.randn(batch["latents"].shape, generator=g).to(accelerator.device)
            expert = inner.dits.expert_for(sigma_value)
            with contextlib.nullcontext() if last else accelerator.no_sync(module):
                parts = module(batch, sigma, noise, expert)
                loss = parts["loss"]
                # All processes agree before anyone stops (a lone rank stopping would hang DDP).
                if not bool(accelerator.reduce(torch.isfinite(loss.detach()).float(), "min")):
                    _stop_on_nonfinite(accelerator, out, epoch, progress, sigma_value, entries, loss)
                accelerator.backward(loss / group)
            if not last:
                continue
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1)
            if progress.step % cfg.log_every_n_steps == 0:
                logs = {f"train/{k}": float(v.detach()) for k, v in parts.items()}
                logs |= {"train/lr": scheduler.get_last_lr()[0], "train/sigma": sigma_value,
                         f"train/loss_{expert}_noise": float(loss.detach()), "train/grad_norm": float(grad_norm)}
                accelerator.log(logs, step=progress.step)
        progress.epoch = epoch + 1
        if progress.epoch % cfg.save_every_n_epochs == 0 or progress.epoch == cfg.max_train_epochs:
            _save_checkpoint(accelerator, module, out, progress.epoch)
    bar.close()

    accelerator.wait_for_everyone()
    metrics: dict = {}
    if accelerator.is_main_process:
        val = CachedClipDataset(index, split="val")
        items = [val[i] for i in range(len(val))] or [dataset[i] for i in range(min(4, len(dataset)))]
        module.eval()
        metrics = inner.evaluate(items, cfg) | {
            "train_steps": progress.step,
            "epochs": progress.epoch,
            "val_clips": len(val),
            "train_seconds_this_run": round(time.monotonic() - started, 1),
        }
        write_json_atomic(out / "metrics.json", metrics)
        accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=progress.step)
    accelerator.end_training()
    return metrics


def _stop_on_nonfinite(accelerator, out: Path, epoch: int, progress: TrainProgress, sigma: float, entries, loss) -> None:
    """Save the state as it was before this step, then stop with a message saying what to do."""
    state = out / f"state-nonfinite-step-{progress.step}"
    save_state_atomically(accelerator, state)
    clips = ", ".join(e.id for e in entries)
    raise MoeError(
        f"training stopped: the loss became {loss.item()} at epoch {epoch + 1}, step {progress.step + 1} "
        f"(sigma {sigma:.3f}, clips {clips}); state saved to {state}. Check those clips' cache "
        f"for NaN/inf, or lower --learning_rate"
    )


def make_accelerator(cfg: TrainConfig):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    cfg.output_dir.mkdir(parents=True, exist_ok=True)
    # accelerate keeps one process-wide state; runs in one process (the workflow, a Prefect
    # worker, tests) may differ in precision or accumulation, so each run starts from a fresh
    # one. The process-level (distributed) state is kept.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        cpu=cfg.cpu,
        mixed_precision=cfg.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir / "logs")),
    )


def load_dits(cfg: TrainConfig, accelerator) -> DualDiT:
    dits = DualDiT.load(
        cfg.preset, cfg.dit, cfg.dit_high_noise, cfg.boundary, _dit_dtype(cfg), accelerator.device, cfg.offload_inactive_dit
    )
    if cfg.gradient_checkpointing:
        dits.enable_gradient_checkpointing()
    return dits
