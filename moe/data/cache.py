"""The latent cache (SPEC section 7): everything training needs per clip, encoded once.

    OUT/index.json                 {"format": "lora-moe-cache/1", "task", "settings", "clips": [...]}
    OUT/clips/{clip_id}.safetensors
        latents        float32 [z, T, h, w]   normalised VAE latents (z 16 for Wan2.1's VAE)
        text_embeds    [L, d]                 UMT5 embeddings, padding zeroed (float32 or bf16)
        text_mask      int64 [L]              1 = valid token
        roi            float32 [T, h, w]      tip-box / mask coverage of each latent cell
        labels         float32 [4]            multi-hot over INSTRUMENT_CLASSES
        i2v_condition  float32 [20, T, h, w]  I2V tasks only: mask 4 + first-frame latent 16

Frames are resized (keeping aspect) to cover the bucket `size` and centre-cropped; the first
`frames` frames (4k+1) of each clip are used. A clip file's header carries its fingerprint:
a sha256 over the video (and mask) bytes, caption, labels, ROI, the settings and the
components' files. Re-running re-encodes only clips whose fingerprint changed, and since the
fingerprint lives in the clip file itself, an interrupted run resumes where it stopped.

Beside it: `cache_index` (the index format), `cover_crop` (frame fitting), `roi` (the ROI reduction
to the latent grid, SPEC section 6) and `dataset` (reading clips back for training).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moe.config.numbers import MAX_FRAMES, MAX_SIDE
from moe.config.presets import WanPreset, get_preset
from moe.data.cache_index import (
    CACHE_FORMAT,
    CLIPS_DIR,
    BuildReport,
    CacheEntry,
    CacheIndex,
    CacheSettings,
)
from moe.data.cover_crop import fit_frames
from moe.data.manifest import (
    INSTRUMENT_CLASSES,
    ClipRecord,
    LabelMap,
    read_manifest,
    split_by_video,
)
from moe.data.roi import roi_mask
from moe.data.video import read_video
from moe.errors import MoeError
from moe.files.atomic import atomic_file
from moe.files.hashing import sha256_file, sha256_tree
from moe.files.output_paths import claim_output
from moe.runtime.devices import resolve_device
from moe.runtime.progress import progress as progress_bar

# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------


def resolve_component_paths(
    vae: str | Path | None,
    text_encoder: str | Path | None,
    tokenizer: str | Path | None,
    model_set: str | Path | None,
    task: str | None,
) -> tuple[str, _ComponentPaths]:
    """(task, paths) from explicit paths and/or a model set; explicit paths win."""
    if model_set is not None:
        from moe.wan.model_set import ModelSet

        ms = ModelSet.load(model_set)
        if task is not None and task != ms.task:
            raise MoeError(f"model set {model_set} is for task {ms.task!r}, not {task!r}")
        task = ms.task
        vae = vae or ms.vae
        text_encoder = text_encoder or ms.text_encoder
        tokenizer = tokenizer or ms.tokenizer
    given = {"--vae": vae, "--text_encoder": text_encoder, "--tokenizer": tokenizer}
    missing = [flag for flag, path in given.items() if path is None]
    if missing:
        raise MoeError(f"no {', '.join(missing)} given; pass --model_set DIR or all of --vae, --text_encoder and --tokenizer")
    if task is None:
        raise MoeError("no --task given; pass --task (e.g. t2v-A14B) or a --model_set that names it")
    return task, _ComponentPaths(Path(vae), Path(text_encoder), Path(tokenizer))


def _check_settings(preset: WanPreset, size: tuple[int, int], frames: int) -> None:
    temporal, multiple = preset.vae.temporal_compression, 2 * preset.vae.spatial_compression
    if not 1 <= frames <= MAX_FRAMES or (frames - 1) % temporal:
        raise MoeError(f"--frames must be {temporal}k+1 between 1 and {MAX_FRAMES} (e.g. 81, 49, 17), got {frames}")
    width, height = size
    cell = preset.vae.spatial_compression
    if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or width % multiple or height % multiple:
        raise MoeError(
            f"--size {width}x{height}: width and height must be positive multiples of {multiple} "
            f"(the VAE's {cell}x{cell} cells times the DiT's 2x2 patches), at most {MAX_SIDE}"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def build_cache(
    manifest: str | Path,
    out_dir: str | Path,
    task: str | None = None,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    tokenizer: str | Path | None = None,
    *,
    model_set: str | Path | None = None,
    size: tuple[int, int] = (832, 480),
    frames: int = 81,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    embed_dtype: torch.dtype = torch.float32,
    label_map: LabelMap | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> CacheIndex:
    """Encode every clip of `manifest` into `out_dir` (see the module docstring) and return the
    index; `index.report` lists the clips encoded, skipped (unchanged) and dropped.

    Components are given as paths (`vae`, `text_encoder`, `tokenizer`: diffusers folders or the
    original Wan files) or as a `model_set` folder; `task` defaults to the model set's. `dtype`
    is the compute dtype of the VAE and text encoder, `embed_dtype` the stored dtype of the text
    embeddings (bf16 halves UMT5-XXL's 4096-wide embeddings). Clips without a split get one
    from `split_by_video`.

    An existing cache in `out_dir` built with the same task and settings is updated in place;
    one built otherwise is rebuilt only with `overwrite`; any other non-empty folder is refused.
    """
    manifest, out_dir, device, size = Path(manifest), Path(out_dir), resolve_device(device), tuple(size)
    task, paths = resolve_component_paths(vae, text_encoder, tokenizer, model_set, task)
    preset = get_preset(task)
    _check_settings(preset, size, frames)
    records = split_by_video(read_manifest(manifest, label_map))
    inputs = {
        "--manifest": manifest,
        "--model_set": model_set,
        "--vae": paths.vae,
        "--text_encoder": paths.text_encoder,
        "--tokenizer": paths.tokenizer,
    }
    claim = claim_output(out_dir, flag="--output_dir", inputs=inputs, overwrite=overwrite, is_ours=CacheIndex.holds_cache, reuse=True, folder=True)
    with claim:
        previous = CacheIndex._read(out_dir)
        settings = CacheSettings(
            size=size,
            frames=frames,
            dtype=_dtype_name(dtype),
            embed_dtype=_dtype_name(embed_dtype),
            max_length=preset.text_encoder.max_length,
            components={
                "vae": _component_digest(paths.vae, "vae"),
                "text_encoder": _component_digest(paths.text_encoder, "text_encoder"),
                "tokenizer": _component_digest(paths.tokenizer, "tokenizer"),
            },
        )
        if previous is not None and (previous.task, previous.settings) != (task, settings) and not overwrite:
            changed = [k for k in CacheSettings.model_fields if getattr(previous.settings, k) != getattr(settings, k)]
            raise MoeError(
                f"--out {out_dir} holds a cache built with other settings ({', '.join(['task'] * (previous.task != task) + changed)} "
                "differ), which this run would replace; pass --overwrite to rebuild it, or choose another --out"
            )
        encoder = _ClipEncoder(preset, paths, size, frames, device, dtype, embed_dtype)
        report = BuildReport()
        entries = []
        bar = progress_bar(records, desc="cache", unit="clip", disable=not progress)
        for record in bar:
            entries.append(_cache_clip(record, manifest.parent, out_dir, task, settings, encoder, report))
            bar.set_postfix(encoded=len(report.encoded), skipped=len(report.skipped))
        ids = {entry.id for entry in entries}
        report.dropped = [entry.id for entry in previous.clips if entry.id not in ids] if previous else []
        index = CacheIndex(task=task, settings=settings, clips=entries, label_classes=INSTRUMENT_CLASSES, root=out_dir, report=report)
        index.save()
        _remove_stale_clips(out_dir, {entry.file for entry in entries})
        return index


def _cache_clip(
    record: ClipRecord,
    manifest_dir: Path,
    out_dir: Path,
    task: str,
    settings: CacheSettings,
    encoder: _ClipEncoder,
    report: BuildReport,
) -> CacheEntry:
    """Encode one clip unless its file already holds this fingerprint; return its index entry."""
    with _about_clip(record.id):
        fingerprint = _clip_fingerprint(record, manifest_dir, task, settings)
    file = f"{CLIPS_DIR}/{_clip_filename(record.id)}"
    header = _read_header(out_dir / file)
    if header is not None and header[0].get("lora_moe.fingerprint") == fingerprint:
        latent_shape = header[1]
        report.skipped.append(record.id)
    else:
        tensors = encoder.encode(record, manifest_dir)
        _write_clip(out_dir / file, tensors, record, task, fingerprint)
        latent_shape = list(tensors["latents"].shape)
        report.encoded.append(record.id)
    return CacheEntry(
        id=record.id,
        file=file,
        split=record.split,
        source=record.source,
        instruments=record.instruments,
        caption=record.caption,
        has_roi=record.roi is not None or record.mask is not None,
        fingerprint=fingerprint,
        latent_shape=latent_shape,
    )


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------


def _component_digest(path: Path, subfolder: str) -> str:
    """sha256 over a component's files (relative names and bytes): new weights re-encode the
    cache, a moved or copied model set does not. A model root is narrowed to its subfolder, as
    the loaders do, so the DiTs next to it are not hashed."""
    root = path / subfolder if (path / subfolder).is_dir() else path
    if not root.exists():
        raise MoeError(f"{subfolder} path {path} does not exist")
    return sha256_tree(root)


def _clip_fingerprint(record: ClipRecord, manifest_dir: Path, task: str, settings: CacheSettings) -> str:
    mask = record.mask_path(manifest_dir)
    payload = {
        "format": CACHE_FORMAT,
        "task": task,
        "settings": settings.model_dump(mode="json"),
        "id": record.id,
        "video": sha256_file(record.video_path(manifest_dir)),
        "mask": sha256_file(mask) if mask is not None else None,
        "caption": record.caption,
        "instruments": record.instruments,
        "roi": record.roi,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ComponentPaths:
    vae: Path
    text_encoder: Path
    tokenizer: Path


@dataclass
class _ClipEncoder:
    """Encodes clips; the models load on first use, so a run that skips every clip never
    loads them (UMT5-XXL alone is 11 GB). `moe.wan.components` (diffusers, transformers) is
    imported here rather than at the top so the trainer's data-loader workers, which only read
    the cache, do not pay for it."""

    preset: WanPreset
    paths: _ComponentPaths
    size: tuple[int, int]
    frames: int
    device: torch.device
    dtype: torch.dtype
    embed_dtype: torch.dtype

    @cached_property
    def models(self) -> tuple:
        """(vae, text_encoder, tokenizer), on the device."""
        from moe.wan.component_loaders import load_text_encoder, load_tokenizer, load_vae, tiny_vae_kwargs

        config = tiny_vae_kwargs(self.preset) if self.preset.tiny else None
        vae = load_vae(self.paths.vae, self.dtype, config=config)
        text_encoder = load_text_encoder(self.paths.text_encoder, self.dtype)
        _check_components(self.preset, vae, text_encoder, self.paths)
        return vae.to(self.device), text_encoder.to(self.device), load_tokenizer(self.paths.tokenizer)

    def encode(self, record: ClipRecord, manifest_dir: Path) -> dict[str, torch.Tensor]:
        vae, text_encoder, tokenizer = self.models  # outside _about_clip: not the clip's fault
        with _about_clip(record.id):
            return self._encode(record, manifest_dir, vae, text_encoder, tokenizer)

    def _encode(self, record: ClipRecord, manifest_dir: Path, vae, text_encoder, tokenizer) -> dict[str, torch.Tensor]:
        from moe.wan.encoding import encode_prompts, encode_video, i2v_condition

        video_path = record.video_path(manifest_dir)
        video = read_video(video_path, max_frames=self.frames)
        if len(video) < self.frames:
            raise MoeError(
                f"video {video_path} has {len(video)} frames, fewer than --frames {self.frames}; lower --frames or drop the clip from the manifest"
            )
        pixels = fit_frames(video, self.size)
        source = (video.shape[2], video.shape[1])
        embeds, text_mask = encode_prompts(text_encoder, tokenizer, [record.caption], self.preset.text_encoder.max_length)
        tensors = {
            "latents": encode_video(vae, pixels)[0],
            "text_embeds": embeds[0].to(self.embed_dtype),
            "text_mask": text_mask[0],
            "roi": roi_mask(
                record.roi or (),
                record.mask_path(manifest_dir),
                source,
                self.size,
                self.frames,
                self.preset.vae.spatial_compression,
                self.preset.vae.temporal_compression,
            ),
            "labels": multi_hot(record.instruments),
        }
        if self.preset.i2v:
            tensors["i2v_condition"] = i2v_condition(vae, pixels[:, :, 0], self.frames)[0]
        return {name: t.detach().cpu().contiguous() for name, t in tensors.items()}


@contextmanager
def _about_clip(clip_id: str) -> Iterator[None]:
    """Prefix the MoeErrors raised inside with the clip's id, so the user knows which row to fix."""
    try:
        yield
    except MoeError as e:
        raise MoeError(f"clip {clip_id!r}: {e}") from None


def _check_components(preset: WanPreset, vae, text_encoder, paths: _ComponentPaths) -> None:
    """Catch a VAE or text encoder of another model family before it produces wrong shapes."""
    got = (vae.config.z_dim, vae.config.scale_factor_spatial)
    need = (preset.vae.z_dim, preset.vae.spatial_compression)
    if got != need:
        raise MoeError(
            f"VAE {paths.vae} has {got[0]} latent channels at {got[1]}x compression, but task {preset.task!r} needs {need[0]} at {need[1]}x"
        )
    if text_encoder.config.d_model != preset.dit.text_dim:
        raise MoeError(
            f"text encoder {paths.text_encoder} has d_model {text_encoder.config.d_model}, but task {preset.task!r} needs {preset.dit.text_dim}"
        )


def multi_hot(instruments: Iterable[str]) -> torch.Tensor:
    """float32 [len(INSTRUMENT_CLASSES)]: 1 for each expert class present (labels already mapped)."""
    present = set(instruments)
    unknown = present - set(INSTRUMENT_CLASSES)
    if unknown:
        raise MoeError(f"instrument labels {sorted(unknown)} are not expert classes {list(INSTRUMENT_CLASSES)}")
    return torch.tensor([float(name in present) for name in INSTRUMENT_CLASSES])


# ---------------------------------------------------------------------------------------------
# Clip files
# ---------------------------------------------------------------------------------------------


def _clip_filename(clip_id: str) -> str:
    """A safe file name for a clip id; ids with other characters get a hash suffix so that two
    ids never share a file."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", clip_id).lstrip(".") or "clip"
    if safe != clip_id:
        safe += "-" + hashlib.sha256(clip_id.encode()).hexdigest()[:8]
    return f"{safe}.safetensors"


def _read_header(path: Path) -> tuple[dict[str, str], list[int]] | None:
    """(metadata, latent shape) of a clip file, or None when it is missing or unreadable."""
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}, list(f.get_slice("latents").get_shape())
    except (OSError, SafetensorError):
        return None


def _write_clip(path: Path, tensors: dict[str, torch.Tensor], record: ClipRecord, task: str, fingerprint: str) -> None:
    metadata = {
        "lora_moe.format": CACHE_FORMAT,
        "lora_moe.clip_id": record.id,
        "lora_moe.caption": record.caption,
        "lora_moe.instruments": json.dumps(record.instruments),
        "lora_moe.task": task,
        "lora_moe.fingerprint": fingerprint,
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _remove_stale_clips(folder: Path, keep: set[str]) -> None:
    """Delete cache clip files no entry refers to (clips dropped from the manifest). Only files
    whose header says they are cache clips are touched."""
    for path in (folder / CLIPS_DIR).glob("*.safetensors"):
        if f"{CLIPS_DIR}/{path.name}" in keep:
            continue
        header = _read_header(path)
        if header is not None and header[0].get("lora_moe.format") == CACHE_FORMAT:
            path.unlink()
