"""The one training loop both stages use (SPEC section 6).

A stage supplies a `TrainingModule`: the trainable parameters (adapters, router, gates) with a
forward that returns the loss for a micro-batch on the DiT that owns its sigma, a way to save its
weights file, and its evaluation. The loop does everything else: accelerate (devices, mixed
precision, DDP), gradient accumulation, the per-epoch plan of batches, sigmas and noise
(`moe.train.epoch_plan`: a resumed run continues exactly, for any number of processes), AdamW
with warmup + cosine counted in optimizer steps, gradient clipping, the non-finite loss and
gradient guards, pickle-free checkpoints (`moe.train.train_state`), TensorBoard logs and a
progress bar.

Checkpoints: at epoch ends (`--save_every_n_epochs`), and between them at optimizer-step
boundaries only (`--save_every_n_steps`, `--save_every_n_minutes`, SIGTERM), never inside a
gradient accumulation window. A state saved mid-epoch records how many micro-batches of the
epoch's plan are done and where each process's noise stream stands, so `--resume` skips exactly
those and ends with the same weights as an uninterrupted run. SIGTERM only sets a flag; at the
next optimizer-step boundary every process agrees on it (a max all-reduce), saves the state and
stops with `TrainingStopped` (exit code 143, `moe.errors.EXIT_STOPPED`).
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch
from torch import nn

from moe.config.file_names import METRICS_FILE, TRAIN_LOG_FILE
from moe.config.train import TrainConfig
from moe.data.cache_index import CacheIndex
from moe.data.dataset import CachedClipDataset, collate_clips
from moe.dit.dual_dit import DualDiT, Expert, GiB
from moe.errors import MoeError, TrainingStopped
from moe.files.atomic import remove_path, write_json_atomic
from moe.runtime.progress import progress as progress_bar
from moe.train.epoch_plan import MicroBatch, epoch_batches, noise_generator, plan_epoch, positions_per_epoch
from moe.train.state_names import latest_state, resumable_states, state_name
from moe.train.train_state import load_training_state, read_generator_state, save_training_state

__all__ = ["latest_state"]  # moe.train.run_dir and older callers import it from here


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

    def sample_routing(self, cond: tuple[torch.Tensor, torch.Tensor], hint: str | None):
        """The `moe.inference.MoERouting` a sample during training runs with (stage 2), or None
        (stage 1: the adapters need no routing). `cond`: the prompt's (embeddings, mask)."""
        return None


class TrainProgress:
    """Where training stands, saved with the state: epochs done, optimizer steps done, the expert
    the last finished epoch ended on (the next epoch's plan starts from it) and, for a state saved
    mid-epoch, the micro-batches of the current epoch's plan each process has done and the epoch's
    running loss (0 at an epoch boundary); `processes`: how many processes wrote it."""

    def __init__(self, processes: int = 1):
        self.epoch = 0
        self.step = 0
        self.expert: str | None = None
        self.batch = 0
        self.epoch_loss = 0.0
        self.epoch_steps = 0
        self.processes = processes

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "expert": self.expert,
            "batch": self.batch,
            "epoch_loss": self.epoch_loss,
            "epoch_steps": self.epoch_steps,
            "processes": self.processes,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step, self.expert = int(state["epoch"]), int(state["step"]), state.get("expert")
        self.batch, self.epoch_steps = int(state.get("batch", 0)), int(state.get("epoch_steps", 0))
        self.epoch_loss = float(state.get("epoch_loss", 0.0))
        self.processes = int(state.get("processes", self.processes))


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
    from moe.train.fsdp import check_fsdp
    from moe.wan.attention import check_attention_backend
    from moe.wan.checkpoint import check_checkpoint_task

    check_fsdp(cfg)
    check_attention_backend(cfg.attention_backend, training=True)
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
        self.noise_g: torch.Generator | None = None  # this process's noise stream of the current epoch

    def save(self, target: Path) -> None:
        save_training_state(
            target,
            self.accelerator,
            self.module,
            self.optimizer,
            self.scheduler,
            self.progress.state_dict(),
            self.groups,
            generators={"noise": self.noise_g} if self.noise_g is not None else None,
        )

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


def _clock() -> float:
    """The clock of --save_every_n_minutes (tests move it)."""
    return time.monotonic()


class _StopRequest:
    """SIGTERM (a preempted node, a cancelled pipeline run, the launcher's timeout) only sets a
    flag here; the loop acts on it at the next optimizer-step boundary. Installed only from the
    main thread (elsewhere the default action stays); the previous handler is restored on exit."""

    def __init__(self):
        self.requested = False
        self._previous = None
        self._installed = False

    def __enter__(self) -> _StopRequest:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        except ValueError:  # not the main thread
            pass
        return self

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)


class _Checkpoints:
    """The saves between epoch ends (every --save_every_n_steps optimizer steps; at the first step
    --save_every_n_minutes after the last state written; on SIGTERM, which then stops training)
    and --save_last_n_states pruning. Asked only at optimizer-step boundaries, the same on every
    process: the signal and the clock, which may differ between processes, are max-reduced."""

    def __init__(self, cfg: TrainConfig, run: _Run, log: TrainLog, stop: _StopRequest):
        self.cfg, self.run, self.log, self.stop = cfg, run, log, stop
        self.last_save = _clock()

    def _agreed(self) -> tuple[bool, bool]:
        """(stop, a timed save is due) on every process."""
        minutes = self.cfg.save_every_n_minutes
        flags = [self.stop.requested, minutes is not None and _clock() - self.last_save >= minutes * 60]
        accelerator = self.run.accelerator
        if accelerator.num_processes > 1:  # a lone process stopping would leave the others at the next all-reduce
            reduced = accelerator.reduce(torch.tensor([float(f) for f in flags], device=accelerator.device), "max")
            flags = [bool(f > 0) for f in reduced.tolist()]
        return flags[0], flags[1]

    def saved(self, state: Path) -> None:
        """After every resumable state written: the clock restarts, old states are pruned."""
        self.last_save = _clock()
        progress = self.run.progress
        self.log.write("state", state=state.name, epoch=progress.epoch, step=progress.step, batch=progress.batch)
        keep = self.cfg.save_last_n_states
        if keep is not None and self.run.accelerator.is_main_process:
            for old in resumable_states(self.run.out)[:-keep]:  # the newest (just written) always stays
                remove_path(old)

    def at_step_boundary(self, epoch_loss: torch.Tensor, epoch_steps: int, epoch_state: Path | None = None) -> None:
        """After an optimizer step (`epoch_state`: the state its epoch end has just written)."""
        stop, timed = self._agreed()
        progress, every = self.run.progress, self.cfg.save_every_n_steps
        state = epoch_state
        if state is None and (stop or timed or (every is not None and progress.step % every == 0)):
            progress.epoch_loss, progress.epoch_steps = float(epoch_loss), epoch_steps
            state = self.run.out / state_name(progress.epoch, progress.step)
            self.run.save(state)
            self.saved(state)
        if stop:
            where = f"{progress.batch} micro-batches into epoch {progress.epoch + 1}" if progress.batch else f"after epoch {progress.epoch}"
            self.log.write("stopped", state=state.name, epoch=progress.epoch, step=progress.step, batch=progress.batch)
            raise TrainingStopped(
                f"training stopped by SIGTERM at step {progress.step} ({where}); its state is saved to {state}: run the "
                "same command with --resume to continue from there"
            )


def run_training(cfg: TrainConfig, module: TrainingModule, accelerator, index: CacheIndex, run_name: str, sampler=None) -> dict:
    """Train `module` on the cache `index` (`cfg.dataset`, opened once by the stage's recipe);
    returns the metrics written to metrics.json. `sampler` (`moe.train.sampling.TrainingSampler`):
    samples at its schedule's points. Read top to bottom: setup, one epoch at a time, finish."""
    loop = TrainingLoop(cfg, module, accelerator, index, run_name, sampler)
    with _stopping_on_sigterm(loop.checkpoints.stop, accelerator, loop.bar, loop.log):
        if sampler is not None:
            sampler.at_start(loop.inner, loop.progress, loop.log)
        for epoch in range(loop.progress.epoch, cfg.max_train_epochs):
            loop.train_epoch(epoch)
    return loop.finish()


class TrainingLoop:
    """One run of the training loop: `__init__` sets it up (optimizer, schedule, accelerate,
    a resumed state, logs), `train_epoch` runs one epoch, `finish` measures and writes metrics."""

    def __init__(self, cfg: TrainConfig, module: TrainingModule, accelerator, index: CacheIndex, run_name: str, sampler=None):
        self.cfg, self.accelerator, self.index, self.run_name, self.sampler = cfg, accelerator, index, run_name, sampler
        out = self.out = cfg.output_dir
        self.dataset = dataset = CachedClipDataset(index, split="train")
        self.by_id = {e.id: i for i, e in enumerate(dataset.entries)}

        optimizer, groups = build_optimizer(cfg, module)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # Each process sees its own share of the batches; one optimizer step per accumulation window.
        batches = len(epoch_batches(dataset.entries, cfg.batch_size, torch.Generator()))
        steps_per_epoch = math.ceil(positions_per_epoch(batches, accelerator.num_processes) / cfg.gradient_accumulation_steps)
        self.total_steps = total_steps = steps_per_epoch * cfg.max_train_epochs
        scheduler = _scheduler(cfg, optimizer, total_steps)
        if cfg.fsdp:  # the frozen DiTs' blocks sharded over the processes; the adapters stay whole (DDP)
            from moe.train.fsdp import shard_frozen_dits

            accelerator.print(shard_frozen_dits(module.dits, module, accelerator))
        module, optimizer = accelerator.prepare(module, optimizer)
        self.module, self.optimizer, self.scheduler = module, optimizer, scheduler
        self.inner: TrainingModule = accelerator.unwrap_model(module)
        progress = self.progress = TrainProgress(accelerator.num_processes)
        self.run = _Run(accelerator, module, optimizer, scheduler, progress, groups, out)

        # A resume mid-epoch: micro-batches of the epoch done, this process's noise stream.
        self.skip, self.noise_state = 0, None
        if cfg.resume:
            self._resume(groups)
        if accelerator.is_main_process:
            write_json_atomic(out / f"{run_name}_config.json", json.loads(cfg.model_dump_json()))
        accelerator.init_trackers(run_name)
        accelerator.print(self.inner.dits.memory_plan())

        self.bar = progress_bar(  # tqdm on a terminal, a line every 10% / 30 s in a log
            total=total_steps,
            initial=progress.step,
            desc=run_name,
            unit="step",
            disable=not (cfg.progress and accelerator.is_local_main_process),
            mininterval=0.1 if sys.stderr.isatty() else 10.0,  # a log file gets a line every 10 s
        )
        self.started, self.swaps_before = time.monotonic(), self.inner.dits.swaps
        self.log = TrainLog(out / TRAIN_LOG_FILE, accelerator.is_main_process)
        self.log.write(
            "start",
            run=run_name,
            step=progress.step,
            epoch=progress.epoch,
            batch=progress.batch,
            total_steps=total_steps,
            max_epochs=cfg.max_train_epochs,
        )
        self.checkpoints = _Checkpoints(cfg, self.run, self.log, _StopRequest())

    def _resume(self, groups) -> None:
        cfg, accelerator, progress = self.cfg, self.accelerator, self.progress
        state = latest_state(self.out)
        if state is None:
            raise MoeError(f"--resume: no state-epoch-N checkpoint (nor state-epoch-N-step-S) in {self.out}; start without --resume")
        progress.load_state_dict(load_training_state(state, accelerator, self.module, self.optimizer, self.scheduler, groups))
        self.skip = progress.batch
        if self.skip and progress.processes == accelerator.num_processes:
            self.noise_state = read_generator_state(state, accelerator.process_index, "noise")
            if self.noise_state is None:
                raise MoeError(
                    f"{state} was saved mid-epoch without process {accelerator.process_index}'s noise "
                    "generator: it cannot continue exactly; delete it to resume from the state before"
                )
        elif self.skip:  # another number of processes (warned): the same share of the epoch, in whole windows
            accum = cfg.gradient_accumulation_steps
            self.skip = self.skip * progress.processes // accelerator.num_processes // accum * accum
        progress.processes = accelerator.num_processes
        where = f", {progress.batch} micro-batches into epoch {progress.epoch + 1}" if progress.batch else ""
        accelerator.print(f"resumed from {state.name} (epoch {progress.epoch}, step {progress.step}{where})")

    def train_epoch(self, epoch: int) -> None:
        cfg, accelerator, module, inner, progress = self.cfg, self.accelerator, self.module, self.inner, self.progress
        optimizer, scheduler, run, bar, log, sampler = self.optimizer, self.scheduler, self.run, self.bar, self.log, self.sampler
        module.train()
        epoch_loss = torch.tensor(progress.epoch_loss, device=accelerator.device)  # 0 unless resumed mid-epoch
        epoch_steps = progress.epoch_steps
        plan, end_expert = plan_epoch(
            self.dataset.entries, cfg, epoch, accelerator.num_processes, accelerator.process_index, inner.dits.expert_for, progress.expert
        )
        noise_g = run.noise_g = noise_generator(cfg, epoch, accelerator.process_index)
        if self.noise_state is not None:  # resumed mid-epoch: where this process's noise stream stood
            noise_g.set_state(self.noise_state)
            self.noise_state = None
        window: list[MicroBatch] = []
        # Gradient accumulation by hand, one window of --gradient_accumulation_steps micro-batches
        # per optimizer step; an epoch's last, shorter window still ends in a step, so no gradient
        # leaks into the next epoch (accelerate's `accumulate` needs its own dataloader).
        for i, mb in enumerate(plan):
            if i < self.skip:  # done before the state this run resumed from (whole windows)
                continue
            if mb.first:
                inner.on_step(progress.step, self.total_steps)
                window = []
            window.append(mb)
            batch = _to_device(collate_clips([self.dataset[self.by_id[e.id]] for e in mb.entries]), accelerator.device)
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
            grad_norm = accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
            if not _all_finite(accelerator, grad_norm):  # a finite loss can still give inf/NaN gradients
                run.stop(f"the gradient norm became {float(grad_norm)} (the loss was finite)", epoch, window)
            optimizer.step()
            if not optimizer.step_was_skipped:  # fp16 loss scaling skips overflowing steps
                scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step, progress.batch = progress.step + 1, i + 1
            epoch_loss, epoch_steps = epoch_loss + loss.detach().float(), epoch_steps + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch + 1, refresh=False)  # drawn at the bar's interval
            if progress.step % cfg.log_every_n_steps == 0:
                logs = {f"train/{k}": float(v.detach()) for k, v in parts.items()}
                logs |= {
                    "train/lr": scheduler.get_last_lr()[0],
                    "train/sigma": mb.sigma,
                    f"train/loss_{mb.expert}_noise": float(loss.detach()),
                    "train/grad_norm": float(grad_norm),
                    "train/dit_swaps": inner.dits.swaps,
                }
                accelerator.log(logs, step=progress.step)
                log.write("step", step=progress.step, total_steps=self.total_steps, epoch=epoch + 1, **logs)
            if i + 1 < len(plan):  # the epoch's last step is handled after its end, below
                if sampler is not None:  # before the step's state is saved: --resume continues after it
                    sampler.after_step(inner, progress, log)
                self.checkpoints.at_step_boundary(epoch_loss, epoch_steps)
        self.skip = 0
        progress.epoch, progress.expert, progress.batch = epoch + 1, end_expert, 0
        progress.epoch_loss, progress.epoch_steps = 0.0, 0
        if sampler is not None:
            sampler.after_step(inner, progress, log, epoch_end=True)
        saved = progress.epoch % cfg.save_every_n_epochs == 0 or progress.epoch == cfg.max_train_epochs
        if saved:
            _save_checkpoint(run, progress.epoch)
            self.checkpoints.saved(self.out / state_name(progress.epoch))
        log.write(
            "epoch",
            epoch=progress.epoch,
            max_epochs=cfg.max_train_epochs,
            step=progress.step,
            total_steps=self.total_steps,
            loss=float(epoch_loss) / max(epoch_steps, 1),
            saved_state=saved,
        )
        self.checkpoints.at_step_boundary(epoch_loss.new_zeros(()), 0, self.out / state_name(progress.epoch) if saved else None)

    def finish(self) -> dict:
        """The held-out measurement and metrics.json (main process; every process with --fsdp)."""
        cfg, accelerator, inner, progress = self.cfg, self.accelerator, self.inner, self.progress
        self.bar.close()
        self.log.close()
        accelerator.wait_for_everyone()
        train_swaps = inner.dits.swaps - self.swaps_before
        metrics: dict = {}
        if accelerator.is_main_process or cfg.fsdp:  # --fsdp: every process joins each sharded DiT forward
            val = CachedClipDataset(self.index, split="val")
            items = [val[i] for i in range(len(val))] or [self.dataset[i] for i in range(min(4, len(self.dataset)))]
            self.module.eval()
            metrics = inner.evaluate(items, cfg) | {
                "train_steps": progress.step,
                "epochs": progress.epoch,
                "val_clips": len(val),
                "train_seconds_this_run": round(time.monotonic() - self.started, 1),
                "dit_swaps_this_run": train_swaps,  # in training (evaluation runs sigma by sigma)
                "dit_offload": inner.dits.offload,
            }
            if accelerator.is_main_process:
                write_json_atomic(self.out / METRICS_FILE, metrics)
                accelerator.log({f"val/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=progress.step)
        # end_training destroys the process group; every process does it together, once the main
        # one has evaluated (torch's documented shutdown: not while a peer is still working).
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return metrics if accelerator.is_main_process else {}


@contextlib.contextmanager
def _stopping_on_sigterm(stop: _StopRequest, accelerator, bar, log: TrainLog):
    """SIGTERM handled (a flag) while the loop runs; a stop (all processes together, their state
    saved) closes the logs and leaves the process group before `TrainingStopped` goes up."""
    with stop:
        try:
            yield
        except TrainingStopped:
            bar.close()
            log.close()
            accelerator.wait_for_everyone()
            accelerator.end_training()
            raise


def _save_checkpoint(run: _Run, epoch: int) -> None:
    """`checkpoint-epoch-N.safetensors` (weights, usable as is) + `state-epoch-N/` (resumable)."""
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        run.accelerator.unwrap_model(run.module).save_weights(run.out / f"checkpoint-epoch-{epoch}.safetensors")
    run.save(run.out / state_name(epoch))


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
    # With --fsdp the experts stay on the host until `shard_frozen_dits` moves each block's shard
    # to the device: a process never holds a whole expert there.
    dits = DualDiT.load(
        cfg.preset,
        cfg.dit,
        cfg.dit_high_noise,
        cfg.boundary,
        _dit_dtype(cfg),
        "cpu" if cfg.fsdp else accelerator.device,
        "never" if cfg.fsdp else cfg.offload_inactive_dit,
        int(cfg.placement_headroom_gib * GiB),
        free_bytes,
        fp8=cfg.fp8,
        blocks_to_swap=cfg.blocks_to_swap,
        compile=cfg.compile,
        compile_mode=cfg.compile_mode,
        attention_backend=cfg.attention_backend,
    )
    if cfg.gradient_checkpointing:
        dits.enable_gradient_checkpointing()
    elif cfg.blocks_to_swap and accelerator.device.type == "cuda":  # on the CPU the swap is a no-op
        accelerator.print(
            "note: --blocks_to_swap without --gradient_checkpointing: a swapped block whose backward runs keeps "
            "its weights on the device until then; add --gradient_checkpointing for the full saving"
        )
    return dits
