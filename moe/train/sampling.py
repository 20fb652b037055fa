"""Samples during training (`--sample_prompts FILE` with `--sample_every_n_epochs N`,
`--sample_every_n_steps N` and/or `--sample_at_first`), as musubi-tuner's trainers make them.

The prompts file is musubi-tuner's (`musubi_tuner/training/sampling_prompts.py`):

    # a comment; blank lines are skipped too
    a hook retracts tissue --w 64 --h 64 --f 17 --d 1 --s 20 --l 5.0
    scissors cut a vessel --n blurry, low quality --hint scissors

One prompt per line, its options after it, each ` --KEY VALUE`:

    --w WIDTH --h HEIGHT   pixels (multiples of 16; 32 for ti2v-5B)   default: the cache's size
    --f FRAMES             4k+1                                       default: the cache's frames
    --d SEED               sampling noise                             default: the training --seed
    --s STEPS              sampling steps (1-1000)                    default: 20
    --g SCALE / --l SCALE  CFG scale of both experts (musubi's `--l` is the CFG scale of Wan; its
                           `--g`, "embedded guidance", does not exist in Wan, so `--g` means the
                           same here)                                 default: the task's
    --fs SHIFT             sampling flow shift                        default: the task's
    --n TEXT               negative prompt (the rest of that option)  default: none
    --i IMAGE              first frame of an I2V task (required there; relative to the file's folder)
    --hint NAME            ours: stage 2's instrument hint (scissors|hook|suction|other): the experts
                           are forced to NAME; without it the router being trained decides

A `.toml` file is musubi's `[prompt]` table of shared keys with `[[prompt.subset]]` entries, a
`.json` file a list of lines or of tables; their keys are musubi's (`prompt`, `width`, `height`,
`frame_count`, `seed`, `sample_steps`, `guidance_scale`, `cfg_scale`, `discrete_flow_shift`,
`negative_prompt`, `image_path`) plus `instrument_hint`. Unlike musubi (which skips what it does
not understand), an unknown or malformed option is refused with its line (or entry) number, and
so are musubi's options Wan2.2 here cannot use (`--ei`, `--cn`, `--ci`, `--of`). Differences on
purpose: `--i` is only the I2V image (as in musubi; the instrument hint is `--hint`), the default
seed is fixed (musubi's is random) so samples of one prompt are comparable across the run, and
sizes are checked rather than rounded down.

Samples are made by `lora-moe generate`'s code (`moe.inference.build_pipeline`, `run_pipeline`,
`MoERouting`, `routing_hooks`): diffusers' Wan2.2 pipeline over the DiTs in training with their
live adapters (stage 1: the LoRA; stage 2: the LoRA-MoE, its router and timestep gates), in eval
mode under no_grad, then back in train mode. The prompt embeddings are computed once, at the
start (the text encoder is then freed); the VAE stays in host memory between samples. Only the
main process samples; the others wait at a barrier.

Nothing about training changes: the global RNGs (python, numpy, torch CPU and CUDA) are saved and
restored around every sampling, the modules' train/eval flags and the resident expert
(`--offload_inactive_dit`) are put back, so a run with samples ends with bit-identical weights to
one without. The schedule counts from the run's global step and epoch: a sampling point is an
optimizer step `S` with `S % N == 0` (`--sample_every_n_steps`), or the last step of an epoch `E`
with `E % N == 0` (`--sample_every_n_epochs`; both at once sample once), or step 0
(`--sample_at_first`, not again on `--resume`). A point samples before that step's state is
saved, so `--resume` (which continues after the saved step) neither repeats nor skips one; after
a crash between the two, the files already written are kept, not made twice.

Outputs: `OUTPUT_DIR/samples/e{EPOCH:04d}-s{STEP:06d}-p{PROMPT:02d}.mp4` (EPOCH: epochs done,
STEP: optimizer steps done), written atomically; in TensorBoard (`logs/`) each sample is an
animated GIF under `samples/pNN` (what `SummaryWriter.add_video` writes, encoded with Pillow:
`add_video` needs moviepy, which is not installed) with its prompt as text; and one `sample`
event per file in `train_log.jsonl` (epoch, step, prompt index, prompt, hint, file).
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import random
import re
import time
import tomllib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from moe.config.numbers import MAX_FRAMES, MAX_SIDE, SEED_MAX, check_number
from moe.errors import MoeError

SAMPLES_DIR = "samples"
SAMPLE_FPS = 16.0  # `lora-moe generate`'s default --fps
DEFAULT_STEPS = 20  # musubi's and `lora-moe generate`'s default
TENSORBOARD_MAX_SIDE = 320  # the GIF in TensorBoard is scaled down to this (the MP4 keeps the full size)
_NAME = re.compile(r"e(\d{4,})-s(\d{6,})-p(\d{2,})\.mp4")

# The prompt-line options: musubi's letter -> its prompt-dict key (the key of .toml/.json forms).
LINE_OPTIONS = {
    "w": "width",
    "h": "height",
    "f": "frame_count",
    "d": "seed",
    "s": "sample_steps",
    "g": "guidance_scale",
    "l": "cfg_scale",
    "fs": "discrete_flow_shift",
    "n": "negative_prompt",
    "i": "image_path",
    "hint": "instrument_hint",
}
KEYS = {key: f"--{letter}" for letter, key in LINE_OPTIONS.items()}
UNSUPPORTED = {"ei": "an end image", "cn": "a control video", "ci": "a control image", "of": "one-frame inference"}

_Int = lambda lo, hi: Annotated[int, Field(ge=lo, le=hi)]  # noqa: E731
_Float = lambda **bounds: Annotated[float, Field(allow_inf_nan=False, **bounds)]  # noqa: E731
_TYPES = {
    "width": _Int(2, MAX_SIDE),
    "height": _Int(2, MAX_SIDE),
    "frame_count": _Int(1, MAX_FRAMES),
    "seed": _Int(0, SEED_MAX),
    "sample_steps": _Int(1, 1000),
    "guidance_scale": _Float(ge=0, le=100),
    "cfg_scale": _Float(ge=0, le=100),
    "discrete_flow_shift": _Float(gt=0, le=100),
}


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt of the file, as written (None: the default, filled in by `check_sampling`)."""

    index: int  # position in the file (0-based): the pNN of its files
    where: str  # "FILE, line N" (or entry N) for messages
    prompt: str
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    flow_shift: float | None = None
    negative_prompt: str = ""
    image: Path | None = None
    hint: str | None = None
    style: str = "line"  # "line" (options `--w 64`) or "table" (.toml/.json keys `width = 64`)

    def name(self, key: str) -> str:
        """How the file spells an option: `--w` on a line, `width` in a table."""
        return KEYS[key] if self.style == "line" else key


# -- the prompts file ----------------------------------------------------------------------------


def read_sample_prompts(path: str | Path) -> list[SamplePrompt]:
    """The prompts of a `.txt` (any suffix but .toml/.json reads as lines), `.toml` or `.json`
    file; a bad line or entry is a MoeError naming the file and its line or entry number."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise MoeError(f"cannot read --sample_prompts {path}: {reason}") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        entries = _toml_entries(path, text)
    elif suffix == ".json":
        entries = _json_entries(path, text)
    else:
        entries = [
            (f"{path}, line {n}", line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip() and not line.strip().startswith("#")
        ]
    prompts = []
    for where, entry in entries:
        style = "line" if isinstance(entry, str) else "table"
        values = _line_values(where, entry) if style == "line" else entry
        prompts.append(_prompt(len(prompts), where, values, style, path.parent))
    if not prompts:
        raise MoeError(f"--sample_prompts {path} holds no prompt (lines starting with # are comments)")
    return prompts


def _toml_entries(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MoeError(f"--sample_prompts {path} is not valid TOML: {e}") from None
    table = data.get("prompt")
    subsets = table.get("subset") if isinstance(table, dict) else None
    if not isinstance(subsets, list) or not subsets or set(data) != {"prompt"}:
        raise MoeError(
            f"--sample_prompts {path}: expected musubi-tuner's form, a [prompt] table of shared keys and "
            "one [[prompt.subset]] table per prompt (and nothing else)"
        )
    shared = {k: v for k, v in table.items() if k != "subset"}
    entries = []
    for n, subset in enumerate(subsets, 1):
        if not isinstance(subset, dict):
            raise MoeError(f"{path}, [[prompt.subset]] {n}: expected a table")
        entries.append((f"{path}, [[prompt.subset]] {n}", shared | subset))
    return entries


def _json_entries(path: Path, text: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise MoeError(f"--sample_prompts {path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise MoeError(f"--sample_prompts {path}: expected a JSON list of prompt lines or of tables of musubi's keys")
    for n, entry in enumerate(data, 1):
        if not isinstance(entry, (str, dict)):
            raise MoeError(f"{path}, entry {n}: expected a prompt line (a string) or a table, got {type(entry).__name__}")
    return [(f"{path}, entry {n}", entry.strip() if isinstance(entry, str) else entry) for n, entry in enumerate(data, 1)]


def _line_values(where: str, line: str) -> dict[str, str]:
    """musubi's split: the prompt, then ` --KEY VALUE` pieces."""
    prompt, *pieces = line.split(" --")
    if prompt.lstrip().startswith("--"):
        raise MoeError(f"{where}: no prompt before the options (a line is `PROMPT --w 832 --h 480 ...`)")
    values = {"prompt": prompt.strip()}
    for piece in pieces:
        match = re.fullmatch(r"([A-Za-z]+)(?:\s+(.*))?", piece.strip(), re.S)
        letter = match.group(1).lower() if match else None
        if letter in UNSUPPORTED:
            raise MoeError(f"{where}: --{letter} ({UNSUPPORTED[letter]}) is a musubi-tuner option Wan2.2 sampling here does not use; remove it")
        if letter not in LINE_OPTIONS:
            known = " ".join(f"--{k}" for k in LINE_OPTIONS)
            raise MoeError(f"{where}: unknown option --{piece.strip().split(' ')[0]}; the options are {known}")
        key = LINE_OPTIONS[letter]
        if key in values:
            raise MoeError(f"{where}: --{letter} is given twice")
        value = (match.group(2) or "").strip()
        if not value:
            raise MoeError(f"{where}: --{letter} needs a value")
        values[key] = value
    return values


def _prompt(index: int, where: str, values: dict, style: str, folder: Path) -> SamplePrompt:
    """Checked values (musubi's keys) -> a SamplePrompt."""
    spelled = KEYS if style == "line" else {k: k for k in KEYS}
    unknown = sorted(set(values) - set(KEYS) - {"prompt", "enum"})  # musubi adds `enum` itself; a copied list may carry it
    if unknown:
        raise MoeError(f"{where}: unknown key {unknown[0]!r}; the keys are prompt, {', '.join(KEYS)}")
    prompt = values.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise MoeError(f"{where}: no prompt")
    checked = {}
    for key, annotation in _TYPES.items():
        if key in values:
            value = values[key]
            try:
                if isinstance(value, bool):
                    raise ValueError(f"must be a number, got {value}")
                checked[key] = check_number(annotation, value)
            except ValueError as e:
                raise MoeError(f"{where}: {spelled.get(key, key)} {e}") from None
    for key in ("negative_prompt", "image_path", "instrument_hint"):
        if key in values and not isinstance(values[key], str):
            raise MoeError(f"{where}: {spelled.get(key, key)} must be text, got {values[key]!r}")
    guidance = {k: checked[k] for k in ("guidance_scale", "cfg_scale") if k in checked}
    if len(set(guidance.values())) > 1:
        raise MoeError(
            f"{where}: {spelled.get('guidance_scale', 'guidance_scale')} and {spelled.get('cfg_scale', 'cfg_scale')} "
            "are the same CFG scale here; give one of them"
        )
    image = None
    if values.get("image_path"):
        image = Path(values["image_path"]).expanduser()
        image = image if image.is_absolute() else folder / image
    return SamplePrompt(
        index=index,
        where=where,
        prompt=prompt.strip(),
        width=checked.get("width"),
        height=checked.get("height"),
        frames=checked.get("frame_count"),
        seed=checked.get("seed"),
        steps=checked.get("sample_steps"),
        guidance=next(iter(guidance.values()), None),
        flow_shift=checked.get("discrete_flow_shift"),
        negative_prompt=values.get("negative_prompt", ""),
        image=image,
        hint=values.get("instrument_hint") or None,
        style=style,
    )


# -- the checks before anything is loaded --------------------------------------------------------


def check_sampling(
    cfg, size: tuple[int, int], frames: int, experts: tuple[str, ...] | None = None, unhinted_routing: str | None = "learned"
) -> list[SamplePrompt] | None:
    """The prompts of `cfg.sample_prompts` checked against the task and the stage, with every
    default filled in (`size`, `frames`: the cache's), before any model is loaded; None without
    samples. `experts`: stage 2's (a `--hint` must name one; stage 1 ignores hints, warned);
    `unhinted_routing`: how stage 2 routes a prompt without a hint (None: its router is not
    trained, so every prompt needs one)."""
    from moe.data.cache import resolve_component_paths

    if cfg.sample_prompts is None:
        return None
    if cfg.fsdp:
        raise MoeError(
            "--sample_prompts with --fsdp is not supported yet (a sharded DiT runs only with every process "
            "taking part, and samples run on the main process alone); drop one of them"
        )
    prompts = read_sample_prompts(cfg.sample_prompts)
    try:
        _, paths = resolve_component_paths(cfg.vae, cfg.text_encoder, cfg.tokenizer, cfg.model_set, cfg.task)
    except MoeError as e:
        raise MoeError(f"--sample_prompts needs the VAE, text encoder and tokenizer to sample: {e}") from None
    for flag, path in (("--vae", paths.vae), ("--text_encoder", paths.text_encoder), ("--tokenizer", paths.tokenizer)):
        if not path.exists():
            raise MoeError(f"{flag} {path} does not exist (needed by --sample_prompts)")
    preset = cfg.preset
    multiple, temporal = 2 * preset.vae.spatial_compression, preset.vae.temporal_compression
    filled = []
    hints_ignored = []
    for p in prompts:
        width, height = p.width or size[0], p.height or size[1]
        count = p.frames or frames
        for key, value in (("width", width), ("height", height)):
            if value % multiple:
                raise MoeError(f"{p.where}: {p.name(key)} must be a multiple of {multiple} for {cfg.task}, got {value}")
        if (count - 1) % temporal:
            raise MoeError(f"{p.where}: {p.name('frame_count')} must be {temporal}k+1 (e.g. 17, 49, 81), got {count}")
        if preset.i2v and p.image is None:
            raise MoeError(f"{p.where}: task {cfg.task} is image-to-video: give the first frame ({p.name('image_path')} IMAGE)")
        if not preset.i2v and p.image is not None:
            raise MoeError(
                f"{p.where}: {p.name('image_path')} is the first frame of an image-to-video task (musubi-tuner's "
                f"meaning) and {cfg.task} is text-to-video; an instrument hint is --hint NAME"
            )
        if p.image is not None and not p.image.is_file():
            raise MoeError(f"{p.where}: the image {p.image} does not exist")
        hint = p.hint
        if hint is not None and experts is None:
            hints_ignored.append(p.where)
            hint = None
        elif hint is not None and hint not in experts:
            raise MoeError(f"{p.where}: {p.name('instrument_hint')} {hint}: not an expert of this run ({', '.join(experts)})")
        elif hint is None and experts is not None and unhinted_routing is None:
            raise MoeError(
                f"{p.where}: this stage-2 run does not train its router (--routing_mode "
                f"{getattr(cfg, 'routing_mode', '?')}, --train_router {getattr(cfg, 'train_router', '?')}), so "
                f"a sample needs an instrument hint: add --hint NAME ({', '.join(experts)})"
            )
        filled.append(
            replace(
                p, width=width, height=height, frames=count, seed=cfg.seed if p.seed is None else p.seed, steps=p.steps or DEFAULT_STEPS, hint=hint
            )
        )
    if hints_ignored:
        warnings.warn(
            f"--sample_prompts: stage 1 has no experts, the instrument hints are ignored ({hints_ignored[0]}"
            + (f" and {len(hints_ignored) - 1} more" if len(hints_ignored) > 1 else "")
            + ")",
            stacklevel=2,
        )
    return filled


# -- the schedule --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleSchedule:
    """When samples are made, from the global step and epoch alone (so a resumed run samples at
    the same points as an uninterrupted one)."""

    every_n_epochs: int | None = None
    every_n_steps: int | None = None
    at_first: bool = False

    @classmethod
    def of(cls, cfg) -> SampleSchedule:
        return cls(cfg.sample_every_n_epochs, cfg.sample_every_n_steps, cfg.sample_at_first)

    def at_start(self, step: int) -> bool:
        """Before training: only a run starting at step 0 (never a resumed one)."""
        return self.at_first and step == 0

    def after_step(self, step: int, epochs_done: int | None = None) -> bool:
        """After optimizer step `step` (1-based); `epochs_done` when that step ended an epoch."""
        by_steps = self.every_n_steps is not None and step % self.every_n_steps == 0
        by_epochs = epochs_done is not None and self.every_n_epochs is not None and epochs_done % self.every_n_epochs == 0
        return by_steps or by_epochs

    def points(self, steps_per_epoch: int, epochs: int, start_step: int = 0) -> list[tuple[int, int]]:
        """Every (epochs done, step) that samples in a run of `epochs` epochs, from `start_step` on."""
        found = [(0, 0)] if self.at_start(start_step) else []
        for step in range(start_step + 1, steps_per_epoch * epochs + 1):
            epoch_end = step % steps_per_epoch == 0
            if self.after_step(step, step // steps_per_epoch if epoch_end else None):
                found.append((step // steps_per_epoch, step))
        return found


def sample_file(out: Path, epoch: int, step: int, index: int) -> Path:
    return out / SAMPLES_DIR / f"e{epoch:04d}-s{step:06d}-p{index:02d}.mp4"


def parse_sample_name(name: str) -> tuple[int, int, int] | None:
    """(epoch, step, prompt index) of a sample file's name, None for another file."""
    match = _NAME.fullmatch(name)
    return tuple(int(g) for g in match.groups()) if match else None


# -- around a sampling: nothing of training changes ---------------------------------------------


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """The python, numpy and torch (CPU and every CUDA device) global RNG states put back on exit."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def inference_mode_of(modules: list[torch.nn.Module]) -> Iterator[None]:
    """Every module in eval mode within the block; each sub-module's own flag restored after."""
    flags = {m: m.training for top in modules for m in top.modules()}
    try:
        for top in modules:
            top.eval()
        yield
    finally:
        for m, training in flags.items():
            m.training = training


@contextlib.contextmanager
def resident_experts(dits) -> Iterator[None]:
    """With `--offload_inactive_dit`, each expert made resident before its forward (the pipeline
    calls both); afterwards the expert training had on the device is back and the swap count is
    training's alone."""
    if not dits.offload:
        yield
        return
    active, swaps = dits.active, dits.swaps

    def resident(name: str):
        def hook(module, args) -> None:
            dits.get(name)

        return hook

    handles = [model.register_forward_pre_hook(resident(name)) for name, model in dits.models.items()]
    try:
        dits.get("high")  # the pipeline starts with the high-noise expert
        yield
    finally:
        for handle in handles:
            handle.remove()
        if active is not None:
            dits.get(active)
        elif dits.active is not None:  # nothing was resident (before the first step): park it again
            dits._place(dits.active, dits._host[dits.active])
            dits.active = None
        dits.swaps = swaps


# -- the sampler ---------------------------------------------------------------------------------


@dataclass
class _Encoded:
    cond: torch.Tensor  # [1, L, d] on the CPU
    mask: torch.Tensor
    uncond: torch.Tensor
    image: Any = None  # the I2V first frame (PIL), cover-cropped to the sample's size


class TrainingSampler:
    """Makes the samples of a run at its schedule's points (see the module docstring). Built on
    every process (`prepare`); only the main one holds the VAE and the prompt embeddings."""

    def __init__(self, cfg, prompts: list[SamplePrompt], accelerator, vae=None, encoded: list[_Encoded] | None = None):
        self.cfg, self.prompts, self.accelerator = cfg, prompts, accelerator
        self.schedule = SampleSchedule.of(cfg)
        self.out = Path(cfg.output_dir)
        self.vae, self.encoded = vae, encoded

    @classmethod
    def prepare(cls, cfg, accelerator, prompts: list[SamplePrompt] | None) -> TrainingSampler | None:
        """On the main process: the prompt embeddings (the text encoder is loaded, used, freed),
        the VAE (kept in host memory) and the I2V first frames. Call it before the DiTs are
        loaded (the text encoder then has the device to itself). A fresh run (not --resume)
        first removes the sample files an earlier run left in its folder."""
        if prompts is None:
            return None
        if not accelerator.is_main_process:
            return cls(cfg, prompts, accelerator)
        from moe.inference import first_frame, load_components
        from moe.train.loop import _dit_dtype
        from moe.wan.encoding import encode_prompts

        if not cfg.resume:
            for old in (Path(cfg.output_dir) / SAMPLES_DIR).glob("e*-s*-p*.mp4"):
                if parse_sample_name(old.name):
                    old.unlink()
        device = accelerator.device
        with preserved_rng():  # building the components draws random initial weights
            vae, text_encoder, tokenizer = load_components(cfg, _dit_dtype(cfg) or torch.float32)
            text_encoder.to(device)
            max_len = cfg.preset.text_encoder.max_length
            negatives: dict[str, torch.Tensor] = {}
            encoded = []
            for p in prompts:
                cond, mask = encode_prompts(text_encoder, tokenizer, [p.prompt], max_len)
                if p.negative_prompt not in negatives:
                    negatives[p.negative_prompt] = encode_prompts(text_encoder, tokenizer, [p.negative_prompt], max_len)[0].cpu()
                image = first_frame(p.image, (p.width, p.height)) if p.image is not None else None
                encoded.append(_Encoded(cond.cpu(), mask.cpu(), negatives[p.negative_prompt], image))
            del text_encoder
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return cls(cfg, prompts, accelerator, vae.to("cpu").eval(), encoded)

    # --- the hooks the loop calls -------------------------------------------------------------
    def at_start(self, module, progress, log) -> None:
        if self.schedule.at_start(progress.step):
            self.sample(module, progress.epoch, progress.step, log)

    def after_step(self, module, progress, log, epoch_end: bool = False) -> None:
        """After an optimizer step (`epoch_end`: the step ended an epoch, `progress.epoch` counts
        it), before that step's state is saved."""
        if self.schedule.after_step(progress.step, progress.epoch if epoch_end else None):
            self.sample(module, progress.epoch, progress.step, log)

    # --- one sampling point -------------------------------------------------------------------
    def sample(self, module, epoch: int, step: int, log) -> None:
        """Every prompt's sample at (epoch, step) on the main process; the others wait."""
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            todo = [p for p in self.prompts if not sample_file(self.out, epoch, step, p.index).is_file()]
            if todo:  # a point sampled before a crash (its state never saved) is not made twice
                self._sample(module, epoch, step, todo, log)
        accelerator.wait_for_everyone()

    def _sample(self, module, epoch: int, step: int, prompts: list[SamplePrompt], log) -> None:
        from moe.data.video import write_video
        from moe.inference import build_pipeline, routing_hooks, run_pipeline

        accelerator, device, preset = self.accelerator, self.accelerator.device, self.cfg.preset
        dits = module.dits
        low, high = dits.models["low"], dits.models.get("high")
        writer = _tensorboard(accelerator)
        self.vae.to(device)
        try:
            with preserved_rng(), inference_mode_of([module, *dits]), resident_experts(dits), torch.no_grad(), accelerator.autocast():
                for p in prompts:
                    started = time.monotonic()
                    enc = self.encoded[p.index]
                    cond, mask, uncond = enc.cond.to(device), enc.mask.to(device), enc.uncond.to(device)
                    pipe = build_pipeline(preset, low, high, self.vae, None, None, p.flow_shift)
                    routing = module.sample_routing((cond, mask), p.hint)
                    with routing_hooks(list(dits), routing) if routing is not None else contextlib.nullcontext():
                        frames = run_pipeline(
                            pipe,
                            preset,
                            cond,
                            uncond,
                            size=(p.width, p.height),
                            frames=p.frames,
                            steps=p.steps,
                            seed=p.seed,
                            device=device,
                            guidance_low=p.guidance,
                            guidance_high=p.guidance,
                            image=enc.image,
                            routing=routing,
                        )
                    path = write_video(sample_file(self.out, epoch, step, p.index), frames, SAMPLE_FPS)
                    if writer is not None:
                        _add_video(writer, f"samples/p{p.index:02d}", frames, SAMPLE_FPS, step)
                        writer.add_text(f"samples/p{p.index:02d}/prompt", p.prompt + (f" (hint: {p.hint})" if p.hint else ""), step)
                    log.write(
                        "sample",
                        epoch=epoch,
                        step=step,
                        prompt_index=p.index,
                        prompt=p.prompt,
                        hint=p.hint,
                        file=f"{SAMPLES_DIR}/{path.name}",
                        seconds=round(time.monotonic() - started, 2),
                    )
            if writer is not None:
                writer.flush()
        finally:
            self.vae.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        accelerator.print(f"samples at epoch {epoch}, step {step}: {len(prompts)} video(s) in {self.out / SAMPLES_DIR}")


def _tensorboard(accelerator):
    """The run's TensorBoard SummaryWriter (None when there is none)."""
    try:
        writer = accelerator.get_tracker("tensorboard", unwrap=True)
    except (ValueError, AttributeError):
        return None
    return writer if hasattr(writer, "_get_file_writer") else None


def gif_bytes(frames: np.ndarray, fps: float, max_side: int = TENSORBOARD_MAX_SIDE) -> bytes:
    """uint8 frames [F, H, W, 3] as an animated GIF (looping), scaled down to `max_side` (Pillow
    merges consecutive identical frames)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in np.asarray(frames)]
    h, w = images[0].height, images[0].width
    scale = min(1.0, max_side / max(h, w))
    if scale < 1:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        images = [im.resize(size, Image.BILINEAR) for im in images]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return buffer.getvalue()


def _add_video(writer, tag: str, frames: np.ndarray, fps: float, step: int) -> None:
    """What `SummaryWriter.add_video` writes (an image summary holding an animated GIF, shown in
    TensorBoard's images tab), without moviepy."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    gif = gif_bytes(frames, fps)
    w, h = Image.open(io.BytesIO(gif)).size
    image = Summary.Image(height=h, width=w, colorspace=3, encoded_image_string=gif)
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
