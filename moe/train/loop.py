"""The one training loop both stages use (SPEC section 6).

A stage supplies a `TrainingModule`: the trainable parameters (adapters, router, gates) with a
forward that returns the loss for a micro-batch on the DiT that owns its sigma, a way to save its
weights file, and its evaluation. The loop does everything else: accelerate (devices, mixed
precision, DDP), gradient accumulation, the per-epoch plan of batches, sigmas and noise
(`moe.train.epoch_plan`: a resumed run continues exactly, for any number of processes), AdamW
with warmup + cosine counted in optimizer steps, gradient clipping, the non-finite loss and
gradient guards, pickle-free checkpoints (`moe.train.train_state`), TensorBoard logs and a
progress bar.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from moe.atomic import write_json_atomic
from moe.data.cache_index import CacheIndex
from moe.data.dataset import CachedClipDataset, collate_clips
from moe.errors import MoeError
from moe.file_names import METRICS_FILE, TRAIN_LOG_FILE
from moe.train.config import TrainConfig
from moe.train.dual_dit import DualDiT, Expert, GiB
from moe.train.epoch_plan import MicroBatch, epoch_batches, noise_generator, plan_epoch, positions_per_epoch
from moe.train.train_state import load_training_state, save_training_state

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
    """Epoch and step counters and the expert the last epoch ended on, saved with the state."""

    def __init__(self):
        self.epoch = 0
        self.step = 0
        self.expert: str | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "expert": self.expert}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.expert = int(state["epoch"]), int(state["step"]), state.get("expert")


def latest_state(output_dir: Path) -> Path | None:
    states = [(int(m.group(1)), p) for p in output_dir.glob("state-epoch-*") if (m := STATE_RE.fullmatch(p.name))]
    return max(states)[1] if states else None


def mixed_precision(cfg: TrainConfig) -> str:
    """`--mixed_precision auto`: bf16 when training on a GPU, none on the CPU."""
    if cfg.mixed_precision != "auto":
        return cfg.mixed_precision
    return "bf16" if torch.cuda.is_available() and not cfg.cpu else "no"


def _dit_dtype(cfg: TrainConfig) -> torch.dtype | None:
    if cfg.dit_dtype == "auto":
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision(cfg))
    return getattr(torch, cfg.dit_dtype)


def build_optimizer(cfg: TrainConfig, module: nn.Module) -> tuple[torch.optim.Optimizer, list[list[str]]]:
    """AdamW over the trainable parameters in two groups: weight matrices with --weight_decay,
    and vectors (biases, the timestep gates' centre c and slope k) without, as is usual for
    biases and schedule parameters. Returns the optimizer and the parameter names per group."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    groups = [[(n, p) for n, p in named if p.ndim >= 2], [(n, p) for n, p in named if p.ndim < 2]]
    decays = [cfg.weight_decay, 0.0]
    param_groups = [{"params": [p for _, p in g], "weight_decay": d} for g, d in zip(groups, decays) if g]
    names = [[n for n, _ in g] for g in groups if g]
    return torch.optim.AdamW(param_groups, lr=cfg.learning_rate), names


def _scheduler(cfg: TrainConfig, optimizer, total_steps: int):
    """Warmup + cosine (or constant) over optimizer steps: stepped once per optimizer step, by
    the loop itself (a scheduler prepared by accelerate steps once per process)."""
    from diffusers.optimization import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
    )

    if cfg.lr_scheduler == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, cfg.lr_warmup_steps, max(total_steps, 1))
    return get_constant_schedule_with_warmup(optimizer, cfg.lr_warmup_steps)


class TrainLog:
    """`OUTPUT_DIR/train_log.jsonl`: one JSON object per line (`start`, `step`, `epoch`), appended
    and flushed line by line, so an orchestrator can follow a running child (progress, metrics)
    without parsing the progress bar. A resumed run appends to it. Main process only."""

    def __init__(self, path: Path, enabled: bool):
        self.file = open(path, "a", buffering=1) if enabled else None

    def write(self, event: str, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"event": event, "time": round(time.time(), 3)} | fields) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


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


class _Run:
    """What a stop (non-finite loss or gradient) needs to save the state and say what happened."""

    def __init__(self, accelerator, module, optimizer, scheduler, progress: TrainProgress, groups, out: Path):
        self.accelerator, self.module, self.optimizer, self.scheduler = accelerator, module, optimizer, scheduler
        self.progress, self.groups, self.out = progress, groups, out

    def save(self, target: Path) -> None:
        save_training_state(target, self.accelerator, self.module, self.optimizer, self.scheduler,
                            self.progress.state_dict(), self.groups)

    def stop(self, what: str, epoch: int, window: list[MicroBatch]) -> None:
        """Save the state as it was before this optimizer step (the weights are untouched), then
        stop every process with a message naming the step, the sigmas and every process's clips."""
        from accelerate.utils import gather_object

        state = self.out / f"state-nonfinite-step-{self.progress.step}"
        self.save(state)
        local = [e.id for mb in window for e in mb.entries]
        clips = gather_object(local) if self.accelerator.num_processes > 1 else local
        sigmas = ", ".join(f"{mb.sigma:.3f}" for mb in window)
        raise MoeError(
            f"training stopped: {what} at epoch {epoch + 1}, step {self.progress.step + 1} (sigma {sigmas}, "
            f"clips {', '.join(dict.fromkeys(clips))}); the last good state is saved to {state}. Check those "
            f"clips' cache for NaN/inf, or lower --learning_rate"
        )


def _all_finite(accelerator, value: torch.Tensor) -> bool:
    """Whether `value` is finite on every process (all agree before anyone stops: a lone process
    stopping would hang DDP; accelerate's reduce knows max, not min)."""
    bad = (~torch.isfinite(value.detach())).any().float().reshape(1)
    return not bool(accelerator.reduce(bad, "max"))


def run_training(cfg: TrainConfig, module: TrainingModule, accelerator, run_name: str) -> dict:
    """Train `module` on the cache at `cfg.dataset`; returns the metrics written to metrics.json."""
    out = cfg.output_dir
    index = open_dataset(cfg)
    dataset = CachedClipDataset(index, split="train")
    by_id = {e.id: i for i, e in enumerate(dataset.entries)}

    optimizer, groups = build_optimizer(cfg, module)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # Each process sees its own share of the batches; one optimizer step per accumulation window.
    batches = len(epoch_batches(dataset.entries, cfg.batch_size, torch.Generator()))
    steps_per_epoch = math.ceil(positions_per_epoch(batches, accelerator.num_processes) / cfg.gradient_accumulation_steps)
    total_steps = steps_per_epoch * cfg.max_train_epochs
    scheduler = _scheduler(cfg, optimizer, total_steps)
    module, optimizer = accelerator.prepare(module, optimizer)
    inner: TrainingModule = accelerator.unwrap_model(module)
    progress = TrainProgress()
    run = _Run(accelerator, module, optimizer, scheduler, progress, groups, out)

    if cfg.resume:
        state = latest_state(out)
        if state is None:
            raise MoeError(f"--resume: no state-epoch-N checkpoint in {out}; start without --resume")
        progress.load_state_dict(load_training_state(state, accelerator, module, optimizer, scheduler, groups))
        accelerator.print(f"resumed from {state.name} (epoch {progress.epoch}, step {progress.step})")
    if accelerator.is_main_process:
        write_json_atomic(out / f"{run_name}_config.json", json.loads(cfg.model_dump_json()))
    accelerator.init_trackers(run_name)
    accelerator.print(f"DiT placement: {inner.dits.describe()}")

    bar = tqdm(
        total=total_steps, initial=progress.step, desc=run_name, unit="step",
        disable=not (cfg.progress and accelerator.is_local_main_process),
        mininterval=0.1 if sys.stderr.isatty() else 10.0,  # a log file gets a line every 10 s
    )
    started, swaps_before = time.monotonic(), inner.dits.swaps
    log = TrainLog(out / TRAIN_LOG_FILE, accelerator.is_main_process)
    log.write("start", run=run_name, step=progress.step, epoch=progress.epoch, total_steps=total_steps,
              max_epochs=cfg.max_train_epochs)
    for epoch in range(progress.epoch, cfg.max_train_epochs):
        module.train()
        epoch_loss, epoch_steps = torch.zeros((), device=accelerator.device), 0
        plan, end_expert = plan_epoch(dataset.entries, cfg, epoch, accelerator.num_processes,
                                      accelerator.process_index, inner.dits.expert_for, progress.expert)
        noise_g = noise_generator(cfg, epoch, accelerator.process_index)
        window: list[MicroBatch] = []
        # Gradient accumulation by hand, one window of --gradient_accumulation_steps micro-batches
        # per optimizer step; an epoch's last, shorter window still ends in a step, so no gradient
        # leaks into the next epoch (accelerate's `accumulate` needs its own dataloader).
        for mb in plan:
            if mb.first:
                inner.on_step(progress.step, total_steps)
                window = []
            window.append(mb)
            batch = _to_device(collate_clips([dataset[by_id[e.id]] for e in mb.entries]), accelerator.device)
            sigma = torch.full((len(mb.entries),), mb.sigma, device=accelerator.device)
            noise = torch.randn(batch["latents"].shape, generator=noise_g).to(accelerator.device)
            with contextlib.nullcontext() if mb.last else accelerator.no_sync(module):
                parts = module(batch, sigma, noise, mb.expert)
                loss = parts["loss"]
                if not _all_finite(accelerator, loss):
                    run.stop(f"the loss became {loss.item()}", epoch, window)
                accelerator.backward(loss / mb.window_size)
            if not mb.last:
                continue
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            if not _all_finite(accelerator, grad_norm):  # a finite loss can still give inf/NaN gradients
                run.stop(f"the gradient norm became {float(grad_norm)} (the loss was finite)", epoch, window)
            optimizer.step()
            if not optimizer.step_was_skipped:  # fp16 loss scaling skips overflowing steps
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            epoch_loss, epoch_steps = epoch_loss + loss.detach().float(), epoch_steps + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1, refresh=False)  # drawn at the bar's interval
            if progress.step % cfg.log_every_n_steps == 0:
                logs = {f"train/{k}": float(v.detach()) for k, v in parts.items()}
                logs |= {"train/lr": scheduler.get_last_lr()[0], "train/sigma": mb.sigma,
                         f"train/loss_{mb.expert}_noise": float(loss.detach()), "train/grad_norm": float(grad_norm),
                         "train/dit_swaps": inner.dits.swaps}
                accelerator.log(logs, step=progress.step)
                log.write("step", step=progress.step, total_steps=total_steps, epoch=epoch + 1, **logs)
        progress.epoch, progress.expert = epoch + 1, end_expert
        saved = progress.epoch % cfg.save_every_n_epochs == 0 or progress.epoch == cfg.max_train_epochs
        if saved:
            _save_checkpoint(run, progress.epoch)
        log.write("epoch", epoch=progress.epoch, max_epochs=cfg.max_train_epochs, step=progress.step,
                  total_steps=total_steps, loss=float(epoch_loss) / max(epoch_steps, 1), saved_state=saved)
    bar.close()
    log.close()

    accelerator.wait_for_everyone()
    train_swaps = inner.dits.swaps - swaps_before
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
            "dit_swaps_this_run": train_swaps,  # in training (evaluation runs sigma by sigma)
            "dit_offload": inner.dits.offload,
        }
        write_json_atomic(out / METRICS_FILE, metrics)
        accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=progress.step)
    # end_training destroys the process group; every process does it together, once the main
    # one has evaluated (torch's documented shutdown: not while a peer is still working).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _save_checkpoint(run: _Run, epoch: int) -> None:
    """`checkpoint-epoch-N.safetensors` (weights, usable as is) + `state-epoch-N/` (resumable)."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        run.accelerator.unwrap_model(run.module).save_weights(run.out / f"checkpoint-epoch-{epoch}.safetensors")
    run.save(run.out / f"state-epoch-{epoch}")


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
        mixed_precision=mixed_precision(cfg),
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir / "logs")),
    )


def load_dits(cfg: TrainConfig, accelerator, free_bytes: int | None = None) -> DualDiT:
    """The stage's DiT(s), placed by --offload_inactive_dit (`free_bytes` overrides the device's
    free memory in the `auto` decision)."""
    dits = DualDiT.load(
        cfg.preset, cfg.dit, cfg.dit_high_noise, cfg.boundary, _dit_dtype(cfg), accelerator.device,
        cfg.offload_inactive_dit, int(cfg.placement_headroom_gib * GiB), free_bytes,
    )
    if cfg.gradient_checkpointing:
        dits.enable_gradient_checkpointing()
    return dits
