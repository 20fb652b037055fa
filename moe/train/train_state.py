"""The resumable training state (`state-epoch-N/`, `state-epoch-N-step-S/`: `moe.train.state_names`),
written and read without pickle.

accelerate's `save_state` pickles custom objects and `load_state` unpickles them with
`weights_only=False`, so a state folder from someone else could run their code. This format holds
only tensors (safetensors) and plain values (JSON):

    state.json               format, number of processes, progress (epoch, step, expert), the
                             trainable parameter names per optimizer group, the optimizer's
                             hyper-parameters and scalar state, the scheduler, the fp16 scaler
    trainable.safetensors    the training module's state dict (adapters, router, gates, EMAs)
    optimizer.safetensors    the optimizer's tensors (`{param index}.{name}`: exp_avg, step ...)
    rng-{k}.safetensors      process k's torch CPU/CUDA generator states, and its own
                             generators' (`generator.noise`: where its noise stream of the
                             epoch stands, for a resume in the middle of an epoch)
    rng-{k}.json             process k's Python and NumPy generator states

Nothing else in the folder is read (a planted `*.pkl` is never opened). The main process writes
the folder atomically (`moe.files.atomic.atomic_dir`), with every process's RNG state gathered to it.
"""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe.errors import MoeError
from moe.files.atomic import atomic_dir

STATE_FORMAT = "lora-moe-train-state/1"
STATE_FILE = "state.json"
TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"


def _tensors_for_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _json_value(value, what: str):
    try:
        json.dumps(value)
    except TypeError:
        raise MoeError(f"internal error: the {what} holds a value JSON cannot store: {value!r}") from None
    return value


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's generator states: (tensors, plain values)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    plain = {
        "python": [version, list(internal), gauss_next],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_training_state(
    target: Path,
    accelerator,
    module,
    optimizer,
    scheduler,
    progress: dict,
    groups: list[list[str]],
    generators: dict[str, torch.Generator] | None = None,
) -> None:
    """Write the state of every process into `target` (called on every process); `generators`:
    this process's own generators, read back with `read_generator_state`."""
    tensors, plain = rng_state()
    tensors |= {f"generator.{name}": g.get_state() for name, g in (generators or {}).items()}
    from accelerate.utils import gather_object

    rngs = gather_object([(tensors, plain)]) if accelerator.num_processes > 1 else [(tensors, plain)]
    if accelerator.is_main_process:
        opt = optimizer.state_dict()
        opt_tensors, opt_scalars = {}, {}
        for index, values in opt["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    opt_tensors[f"{index}.{key}"] = value
                else:
                    opt_scalars.setdefault(str(index), {})[key] = value
        scaler = getattr(accelerator, "scaler", None)
        state = {
            "format": STATE_FORMAT,
            "num_processes": accelerator.num_processes,
            "progress": progress,
            "parameter_groups": groups,
            "optimizer": {
                "param_groups": _json_value(opt["param_groups"], "optimizer's groups"),
                "scalars": _json_value(opt_scalars, "optimizer's state"),
            },
            "scheduler": _json_value(scheduler.state_dict(), "scheduler's state"),
            "scaler": _json_value(scaler.state_dict(), "gradient scaler's state") if scaler is not None else None,
        }
        with atomic_dir(target) as tmp:
            save_file(_tensors_for_file(accelerator.unwrap_model(module).state_dict()), tmp / TRAINABLE_FILE)
            save_file(_tensors_for_file(opt_tensors), tmp / OPTIMIZER_FILE)
            for rank, (rng_tensors, rng_plain) in enumerate(rngs):
                save_file(_tensors_for_file(rng_tensors), tmp / f"rng-{rank}.safetensors")
                (tmp / f"rng-{rank}.json").write_text(json.dumps(rng_plain))
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
    accelerator.wait_for_everyone()


def _read_json(path: Path, state_dir: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MoeError(f"{state_dir} is a damaged training state ({path.name}: {e}); resume from another state-epoch-N") from None


def _read_tensors(path: Path, state_dir: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise MoeError(f"{state_dir} is a damaged training state ({path.name}: {e}); resume from another state-epoch-N") from None


def read_generator_state(source: Path, rank: int, name: str) -> torch.Tensor | None:
    """Process `rank`'s saved state of its generator `name` (None: not saved)."""
    path = source / f"rng-{rank}.safetensors"
    if not path.is_file():
        return None
    return _read_tensors(path, source).get(f"generator.{name}")


def load_training_state(source: Path, accelerator, module, optimizer, scheduler, groups: list[list[str]]) -> dict:
    """Restore a state written by `save_training_state` (on every process); returns the progress."""
    meta_path = source / STATE_FILE
    if not meta_path.is_file():
        raise MoeError(
            f"{source} is not a lora-moe training state (no {STATE_FILE}): states written before this format used "
            f"pickles, which can run code, and are not loaded. Start the run again without --resume"
        )
    state = _read_json(meta_path, source)
    if state.get("format") != STATE_FORMAT:
        raise MoeError(f"{source} holds a training state of format {state.get('format')!r}, not {STATE_FORMAT}")
    if state["parameter_groups"] != groups:
        saved = sum(map(len, state["parameter_groups"]))
        now = sum(map(len, groups))
        raise MoeError(
            f"{source} was saved for other trainable parameters ({saved} tensors; this run has {now}): resume with "
            f"the options of the run that wrote it (ranks, targets, experts, router settings)"
        )
    try:
        accelerator.unwrap_model(module).load_state_dict(_read_tensors(source / TRAINABLE_FILE, source))
    except RuntimeError as e:
        raise MoeError(f"{source}: the saved weights do not fit this run ({str(e).splitlines()[0]})") from None
    opt_tensors = _read_tensors(source / OPTIMIZER_FILE, source)
    per_param: dict[int, dict] = {}
    for key, value in opt_tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    for index, values in state["optimizer"]["scalars"].items():
        per_param.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": per_param, "param_groups": state["optimizer"]["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rank, saved_processes = accelerator.process_index, state["num_processes"]
    if saved_processes != accelerator.num_processes and accelerator.is_main_process:
        warnings.warn(
            f"{source} was written by {saved_processes} processes and is resumed by {accelerator.num_processes}: "
            "training continues, but not exactly as an uninterrupted run would",
            stacklevel=2,
        )
    if rank < saved_processes:
        set_rng_state(_read_tensors(source / f"rng-{rank}.safetensors", source), _read_json(source / f"rng-{rank}.json", source))
    return state["progress"]
