"""Every input of `lora-moe eval` checked before anything is loaded or written: the file kinds,
the task, the merged DiTs against the LoRA-MoE file's record, the base DiTs against the merged
DiTs' provenance, the held-out split of the cache (present, and sharing no video with the
training split) and what samples need. Returns the held-out clips and every input's sha256."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moe.config.eval import EvalConfig, HeldOutConfig
from moe.errors import MoeError, list_names
from moe.eval.report import InputFile
from moe.wan.file_kind import MERGED_FROM_KEY, classify, require_kind

if TYPE_CHECKING:
    from moe.data.cache_index import CacheEntry, CacheIndex
    from moe.lora_moe.file import LoRAMoEFile
from moe.files.hashing import sha256_file, sha256_tree


@dataclass
class HeldOutClips:
    index: CacheIndex
    entries: list[CacheEntry]  # the held-out clips used, by id


def held_out_clips(cfg: HeldOutConfig, task: str) -> HeldOutClips:
    """The cache's held-out (val) clips; refuses a cache without any and a split that puts clips
    of one video on both sides (the numbers would flatter the model)."""
    from moe.data.cache_index import CacheIndex

    index = CacheIndex.load(cfg.dataset, task=task)
    val = sorted((e for e in index.clips if e.split == "val"), key=lambda e: e.id)
    if not val:
        raise MoeError(
            f"cache {cfg.dataset} has no held-out clips (none has split 'val'); evaluation needs clips the "
            "model never trained on: rebuild the cache from a manifest with a val split (lora-moe data synth "
            "--val_fraction, or 'split' per clip)"
        )
    train_sources = {e.source for e in index.clips if e.split == "train"}
    leaked = sorted({e.source for e in val} & train_sources)
    if leaked:
        raise MoeError(
            f"cache {cfg.dataset} has clips of the same video on both sides of the split (source "
            f"{list_names(leaked, 3)}): held-out numbers would flatter the model; split by video "
            "(give every clip of a source the same 'split' in the manifest) and rebuild the cache"
        )
    return HeldOutClips(index, val[: cfg.max_clips] if cfg.max_clips else val)


def load_items(clips: HeldOutClips) -> list[dict]:
    from moe.data.dataset import load_clip

    return [{**load_clip(clips.index, e), "id": e.id} for e in clips.entries]


def claim_eval_output(out: Path, overwrite: bool, inputs: dict[str, Path | None], marker: str):
    """The output folder for the whole evaluation (`moe.files.output_paths.claim_output`): never an
    input, an existing one replaced only with --overwrite and only when it holds our `marker`
    file, locked for the run."""
    from moe.files.output_paths import claim_output

    return claim_output(out, flag="--output_dir", inputs=inputs, overwrite=overwrite, folder=True, is_ours=lambda p: (p / marker).is_file())


def _check_manifest(manifest: Path, clips: HeldOutClips) -> None:
    from moe.data.manifest import read_manifest

    ids = {r.id for r in read_manifest(manifest)}
    missing = [e.id for e in clips.entries if e.id not in ids]
    if missing:
        raise MoeError(
            f"--manifest {manifest} lacks the held-out clips {list_names(missing, 3)}; pass the manifest the cache "
            "was built from (or leave --manifest out to show the VAE's reconstructions)"
        )


@dataclass
class CheckedInputs:
    task: str
    moe_file: LoRAMoEFile
    clips: HeldOutClips
    hashes: dict[str, InputFile]


def _merged_dits(cfg: EvalConfig, preset, recorded: dict[str, str]) -> dict[str, str]:
    """sha256 of the merged DiTs, which must be the ones the LoRA-MoE file was trained on."""
    from moe.wan.checkpoint import check_checkpoint_task

    given = {"low": ("--merged_dit", cfg.merged_dit), "high": ("--merged_dit_high_noise", cfg.merged_dit_high_noise)}
    if preset.two_experts and cfg.merged_dit_high_noise is None:
        raise MoeError(f"task {preset.task} has two experts: pass the merged high-noise DiT as --merged_dit_high_noise")
    if not preset.two_experts and cfg.merged_dit_high_noise is not None:
        raise MoeError(f"task {preset.task} has a single DiT; drop --merged_dit_high_noise")
    shas = {}
    for name, (flag, path) in given.items():
        if path is None:
            continue
        info = classify(path)
        if info.kind == "wan-dit":
            raise MoeError(
                f"{path} is a base Wan DiT with no stage-1 LoRA merged in; {flag} takes the merged DiT stage 2 "
                "was trained on (pass base DiTs as --dit / --dit_high_noise)"
            )
        require_kind(path, "merged-dit", flag)
        check_checkpoint_task(path, preset)
        shas[name] = sha256_tree(path)
        if name in recorded and recorded[name] != shas[name]:
            raise MoeError(
                f"{flag} {path} (sha256 {shas[name][:12]}) is not the {name}-noise DiT the LoRA-MoE file was "
                f"trained on (it records {recorded[name][:12]}); pass the merged DiTs stage 2 used"
            )
    return shas


def _base_dits(cfg: EvalConfig, preset) -> dict[str, str]:
    """sha256 of the base DiTs, which must be what the stage-1 LoRA was merged into."""
    from moe.wan.checkpoint import check_checkpoint_task, resolve_files

    if cfg.dit is None and cfg.dit_high_noise is None:
        return {}
    if preset.two_experts and (cfg.dit is None or cfg.dit_high_noise is None):
        raise MoeError(f"task {preset.task} has two experts: pass both base DiTs, --dit and --dit_high_noise (or neither)")
    shas = {}
    pairs = (("dit", cfg.dit, cfg.merged_dit), ("dit_high_noise", cfg.dit_high_noise, cfg.merged_dit_high_noise))
    for flag, base, merged in pairs:
        if base is None:
            continue
        require_kind(base, ("wan-dit", "merged-dit"), f"--{flag}")
        check_checkpoint_task(base, preset)
        files = {p.name: p for p in resolve_files(base)[0]}
        for header in classify(merged).headers:  # one provenance record per merged file (shard)
            records = json.loads(header.metadata.get(MERGED_FROM_KEY, "[]"))
            if not records:
                continue
            last = records[-1]
            file = next(iter(files.values())) if len(files) == 1 else files.get(last["base"])
            if file is None or sha256_file(file) != last["base_sha256"]:
                raise MoeError(
                    f"--{flag} {base} is not the DiT the stage-1 LoRA was merged into to make {merged} (its "
                    f"provenance records {last['base']}, sha256 {last['base_sha256'][:12]}); pass that base DiT"
                )
        shas[flag] = sha256_tree(base)
    return shas


def check_eval_inputs(cfg: EvalConfig) -> CheckedInputs:
    from moe.config.presets import get_preset
    from moe.data.cache import resolve_component_paths
    from moe.lora_moe.file import read_lora_moe_file

    moe_file = read_lora_moe_file(cfg.lora_moe_weights)
    if cfg.task is not None and cfg.task != moe_file.task:
        raise MoeError(f"{cfg.lora_moe_weights} was trained for task {moe_file.task}, not {cfg.task}; pass --task {moe_file.task}")
    task = moe_file.task
    preset = get_preset(task)
    hashes = {"lora_moe_weights": sha256_file(cfg.lora_moe_weights)}
    merged = _merged_dits(cfg, preset, moe_file.merged_dits)
    hashes |= {"merged_dit": merged["low"]} | ({"merged_dit_high_noise": merged["high"]} if "high" in merged else {})
    hashes |= _base_dits(cfg, preset)
    clips = held_out_clips(cfg, task)
    hashes["dataset"] = sha256_tree(cfg.dataset)
    if cfg.generates:
        if not cfg.components_given:
            asked = f"--samples {cfg.sample_count}" if cfg.sample_count else f"--metric_clips {cfg.metric_clips}"
            raise MoeError(
                f"{asked} needs the VAE and text encoder to generate clips: pass --model_set DIR or --vae, "
                "--text_encoder and --tokenizer (or --samples 0 --metric_clips 0)"
            )
        resolve_component_paths(cfg.vae, cfg.text_encoder, cfg.tokenizer, cfg.model_set, task)
        frames = cfg.sample_frames or clips.index.settings.frames
        if (frames - 1) % preset.vae.temporal_compression:
            raise MoeError(f"--sample_frames must be {preset.vae.temporal_compression}k+1 (e.g. 17, 81), got {frames}")
        for flag in ("model_set", "vae", "text_encoder", "tokenizer"):
            if getattr(cfg, flag) is not None:
                hashes[flag] = sha256_tree(getattr(cfg, flag))
        if cfg.manifest is not None:
            _check_manifest(cfg.manifest, clips)
            hashes["manifest"] = sha256_file(cfg.manifest)
    if cfg.gate_file is not None:
        hashes["gate"] = sha256_file(cfg.gate_file)
    paths = {
        "lora_moe_weights": cfg.lora_moe_weights,
        "merged_dit": cfg.merged_dit,
        "merged_dit_high_noise": cfg.merged_dit_high_noise,
        "dit": cfg.dit,
        "dit_high_noise": cfg.dit_high_noise,
        "dataset": cfg.dataset,
        "model_set": cfg.model_set,
        "vae": cfg.vae,
        "text_encoder": cfg.text_encoder,
        "tokenizer": cfg.tokenizer,
        "manifest": cfg.manifest,
        "gate": cfg.gate_file,
    }
    inputs = {flag: InputFile(path=str(paths[flag]), sha256=sha) for flag, sha in hashes.items()}
    return CheckedInputs(task, moe_file, clips, inputs)
