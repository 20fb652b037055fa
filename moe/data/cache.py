"""The latent cache (SPEC section 7): everything training needs per clip, encoded once.

    OUT/index.json                 {"format": "lora-moe-cache/1", "task", "settings", "clips": [...]}
    OUT/clips/{clip_id}.safetensors
        latents        float32 [z, T, h, w]   normalised VAE latents (z 16 for Wan2.1's VAE)
        text_embeds    [L, d]                 UMT5 embeddings, padding zeroed (float32 or bf16)
        text_mask      int64 [L]              1 = valid token
        roi            float32 [T, h, w]      tip-box / mask coverage of each latent cell
        labels         float32 [4]            multi-hot over EXPERT_CLASSES
        i2v_condition  float32 [20, T, h, w]  I2V tasks only: mask 4 + first-frame latent 16

Frames are resized (keeping aspect) to cover the bucket `size` and centre-cropped; the first
`frames` frames (4k+1) of each clip are used. A clip file's header carries its fingerprint:
a sha256 over the video (and mask) bytes, caption, labels, ROI, the settings and the
components' files. Re-running re-encodes only clips whose fingerprint changed, and since the
fingerprint lives in the clip file itself, an interrupted run resumes where it stopped.

ROI masks follow SPEC section 6: the union of a frame's tip boxes (and mask pixels) is mapped
through the same resize + crop, each latent cell gets the exact fraction of its area covered,
and the per-frame maps are reduced with max over Wan's causal VAE groups (latent frame 0 <-
pixel frame 0, latent frame t >= 1 <- pixel frames 4t-3 .. 4t).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm import tqdm

from moe.atomic import atomic_file, write_json_atomic
from moe.data.manifest import (
    EXPERT_CLASSES,
    ClipRecord,
    LabelMap,
    read_manifest,
    split_by_video,
)
from moe.data.video import iter_frames, read_video
from moe.errors import MoeError
from moe.hashing import sha256_file, sha256_tree
from moe.wan.presets import WanPreset, get_preset

__all__ = [
    "CACHE_FORMAT",
    "EXPERT_CLASSES",
    "BuildReport",
    "CacheEntry",
    "CacheIndex",
    "CacheSettings",
    "CachedClipDataset",
    "CoverCrop",
    "build_cache",
    "collate_clips",
    "fit_frames",
    "load_clip",
    "multi_hot",
    "roi_mask",
    "temporal_max",
]

CACHE_FORMAT = "lora-moe-cache/1"
INDEX_FILE = "index.json"
CLIPS_DIR = "clips"
_RESIZE_CHUNK = 8  # frames resized at once: bounds the float copy of a 1080p source clip


# ---------------------------------------------------------------------------------------------
# Index models
# ---------------------------------------------------------------------------------------------


class CacheSettings(BaseModel):
    """Everything besides the clip itself that changes the cached tensors."""

    size: tuple[int, int]  # (width, height) of the bucket
    frames: int
    dtype: str  # compute dtype of the VAE and text encoder
    embed_dtype: str  # stored dtype of text_embeds
    max_length: int  # text tokens
    components: dict[str, str]  # vae / text_encoder / tokenizer -> sha256 of their files


class CacheEntry(BaseModel):
    id: str
    file: str  # relative to the cache folder
    split: Literal["train", "val"]
    source: str
    instruments: list[str]
    caption: str
    has_roi: bool
    fingerprint: str
    latent_shape: list[int]


class BuildReport(BaseModel):
    """What one `build_cache` call did, by clip id."""

    encoded: list[str] = []
    skipped: list[str] = []
    dropped: list[str] = []

    def summary(self) -> str:
        return f"{len(self.encoded)} encoded, {len(self.skipped)} skipped, {len(self.dropped)} dropped"


class CacheIndex(BaseModel):
    """`index.json` of a cache folder. `root` (the folder) and `report` (set by `build_cache`)
    are not written to the file."""

    format: str = CACHE_FORMAT
    task: str
    settings: CacheSettings
    clips: list[CacheEntry]
    root: Path = Field(exclude=True)
    report: BuildReport | None = Field(default=None, exclude=True)

    @classmethod
    def load(cls, folder: str | Path, task: str | None = None) -> CacheIndex:
        """Read a cache's index; with `task`, refuse a cache built for another task."""
        folder = Path(folder)
        index = cls._read(folder)
        if index is None:
            raise MoeError(
                f"{folder} is not a latent cache (no {INDEX_FILE}); build one with `lora-moe cache`"
            )
        if task is not None and index.task != task:
            first = index.clips[0].id if index.clips else "none"
            raise MoeError(
                f"cache {folder} was built for task {index.task!r} (first clip {first!r}), not "
                f"{task!r}; rebuild it with `lora-moe cache --task {task}`"
            )
        return index

    @classmethod
    def _read(cls, folder: Path) -> CacheIndex | None:
        """The index in `folder`, None when there is none, a MoeError when it is not ours."""
        path = folder / INDEX_FILE
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise MoeError(f"cannot read {path} as a cache index: {e}") from None
        if not isinstance(raw, dict) or raw.get("format") != CACHE_FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else None
            raise MoeError(
                f"{path} is not a {CACHE_FORMAT} cache index (format {found!r}); build the cache "
                f"into another folder with `lora-moe cache`"
            )
        try:
            return cls.model_validate({**raw, "root": folder})
        except ValidationError as e:
            first = e.errors()[0]
            raise MoeError(
                f"{path} is a damaged cache index (field '{'.'.join(map(str, first['loc']))}': "
                f"{first['msg']}); rebuild it with `lora-moe cache`"
            ) from None

    def entry(self, clip_id: str) -> CacheEntry:
        for entry in self.clips:
            if entry.id == clip_id:
                return entry
        raise MoeError(f"clip {clip_id!r} is not in cache {self.root}")

    def save(self) -> None:
        write_json_atomic(self.root / INDEX_FILE, self.model_dump(mode="json"))


# ---------------------------------------------------------------------------------------------
# Geometry: cover-resize + centre crop, for frames and for ROI
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoverCrop:
    """Resize a (W0, H0) source keeping its aspect so it covers `size` = (W, H), then crop the
    centre. Frames and ROI go through this one mapping, so the mask lines up with the latents."""

    source: tuple[int, int]
    resized: tuple[int, int]
    size: tuple[int, int]

    @classmethod
    def fit(cls, source: tuple[int, int], size: tuple[int, int]) -> CoverCrop:
        scale = max(size[0] / source[0], size[1] / source[1])
        resized = (max(size[0], round(source[0] * scale)), max(size[1], round(source[1] * scale)))
        return cls(source, resized, size)

    @property
    def offset(self) -> tuple[int, int]:
        return (self.resized[0] - self.size[0]) // 2, (self.resized[1] - self.size[1]) // 2

    def apply(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [n, H0, W0, 3] -> float32 [n, 3, H, W] in [-1, 1].

        `interpolate` with an explicit size maps pixel edges to pixel edges (scale = in / out),
        which is the mapping `cell_weights` uses for the ROI.
        """
        x = frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0
        if self.resized != self.source:
            x = F.interpolate(
                x, size=self.resized[::-1], mode="bilinear", antialias=True, align_corners=False
            ).clamp(-1.0, 1.0)
        (left, top), (width, height) = self.offset, self.size
        return x[:, :, top : top + height, left : left + width]

    def cell_weights(self, cell: int) -> tuple[np.ndarray, np.ndarray]:
        """(ay [h, H0], ax [w, W0]): the share of each output cell row/column that each source
        pixel row/column covers. For a binary source image m, `ay @ m @ ax.T` is the exact
        fraction of each cell's area that m covers (the mapping is axis-aligned and affine)."""
        return tuple(self._axis_weights(axis, cell) for axis in (1, 0))

    def _axis_weights(self, axis: int, cell: int) -> np.ndarray:
        edges = np.arange(0, self.size[axis] + 1, cell, dtype=np.float64)
        edges = (edges + self.offset[axis]) * self.source[axis] / self.resized[axis]
        lo, hi = edges[:-1, None], edges[1:, None]
        pixel = np.arange(self.source[axis], dtype=np.float64)[None, :]
        overlap = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
        return overlap / (hi - lo)


def fit_frames(frames: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 frames [F, H0, W0, 3] -> float32 [1, 3, F, H, W] in [-1, 1] (what `encode_video`
    takes), resized to cover `size` = (W, H) and centre-cropped, a few frames at a time."""
    frames = torch.as_tensor(frames)
    crop = CoverCrop.fit((frames.shape[2], frames.shape[1]), size)
    fitted = torch.cat([crop.apply(chunk) for chunk in frames.split(_RESIZE_CHUNK)])
    return fitted.permute(1, 0, 2, 3).unsqueeze(0).contiguous()


# ---------------------------------------------------------------------------------------------
# ROI and labels
# ---------------------------------------------------------------------------------------------


def temporal_max(per_frame: torch.Tensor, temporal: int = 4) -> torch.Tensor:
    """[F, h, w] -> [T, h, w] with Wan's causal grouping: latent frame 0 <- frame 0, latent
    frame t >= 1 <- max over frames (t-1)*temporal+1 .. t*temporal."""
    rest = per_frame[1:]
    if rest.shape[0] % temporal:
        raise MoeError(f"{per_frame.shape[0]} frames do not fit the VAE's groups ({temporal}k+1 needed)")
    grouped = rest.reshape(-1, temporal, *rest.shape[1:]).amax(dim=1)
    return torch.cat([per_frame[:1], grouped])


def _boxes_by_frame(boxes: Iterable[Sequence[int]], source: tuple[int, int]) -> dict[int, list]:
    width, height = source
    by_frame: dict[int, list] = defaultdict(list)
    for frame, x0, y0, x1, y1 in boxes:
        if x1 > width or y1 > height:
            raise MoeError(
                f"tip box {[frame, x0, y0, x1, y1]} lies outside the {width}x{height} video; "
                f"boxes are in pixels of the source video"
            )
        by_frame[frame].append((x0, y0, x1, y1))
    return by_frame


def _mask_frames(path: Path, frames: int, source: tuple[int, int]) -> Iterator[np.ndarray]:
    """bool [H0, W0] per frame of a mask video: grey (ITU-R 601 luma) > 127."""
    count = 0
    for _, rgb in iter_frames(path, only=range(frames)):
        if (rgb.shape[1], rgb.shape[0]) != source:
            raise MoeError(
                f"mask video {path} is {rgb.shape[1]}x{rgb.shape[0]}, the clip's video "
                f"{source[0]}x{source[1]}; a mask must match its video"
            )
        grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        count += 1
        yield grey > 127
    if count < frames:
        raise MoeError(f"mask video {path} has {count} frames, fewer than the {frames} cached")


def _roi_frames(
    boxes: Iterable[Sequence[int]], mask: Path | None, source: tuple[int, int], frames: int
) -> Iterator[np.ndarray]:
    """Per source frame, bool [H0, W0]: the union of the frame's tip boxes and mask pixels.
    Building the union in pixels makes overlapping boxes count once."""
    by_frame = _boxes_by_frame(boxes, source)
    masks = _mask_frames(mask, frames, source) if mask is not None else repeat(None)
    for frame, mask_pixels in zip(range(frames), masks):
        covered = np.zeros(source[::-1], dtype=bool) if mask_pixels is None else mask_pixels
        for x0, y0, x1, y1 in by_frame.get(frame, ()):
            covered[y0:y1, x0:x1] = True
        yield covered


def roi_mask(
    boxes: Iterable[Sequence[int]],
    mask: Path | None,
    source: tuple[int, int],
    size: tuple[int, int],
    frames: int,
    cell: int = 8,
    temporal: int = 4,
) -> torch.Tensor:
    """The latent-grid ROI mask float32 [T, H/cell, W/cell] in [0, 1] of a clip.

    boxes: `[frame, x0, y0, x1, y1]` in source pixels (slice semantics; frames >= `frames` are
    ignored); mask: a mask video of the source's size, or None; source / size: (width, height).
    """
    ay, ax = CoverCrop.fit(source, size).cell_weights(cell)
    coverage = np.stack(
        [
            ay @ covered.astype(np.float64) @ ax.T if covered.any() else np.zeros((len(ay), len(ax)))
            for covered in _roi_frames(boxes, mask, source, frames)
        ]
    )
    per_frame = torch.from_numpy(np.clip(coverage, 0.0, 1.0)).float()
    return temporal_max(per_frame, temporal)


def multi_hot(instruments: Iterable[str]) -> torch.Tensor:
    """float32 [len(EXPERT_CLASSES)]: 1 for each expert class present (labels already mapped)."""
    present = set(instruments)
    unknown = present - set(EXPERT_CLASSES)
    if unknown:
        raise MoeError(f"instrument labels {sorted(unknown)} are not expert classes {list(EXPERT_CLASSES)}")
    return torch.tensor([float(name in present) for name in EXPERT_CLASSES])


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
        from moe.wan.components import (
            load_text_encoder,
            load_tokenizer,
            load_vae,
            tiny_vae_kwargs,
        )

        config = tiny_vae_kwargs(self.preset) if self.preset.tiny else None
        vae = load_vae(self.paths.vae, self.dtype, config=config)
        text_encoder = load_text_encoder(self.paths.text_encoder, self.dtype)
        _check_components(self.preset, vae, text_encoder, self.paths)
        return vae.to(self.device), text_encoder.to(self.device), load_tokenizer(self.paths.tokenizer)

    def encode(self, record: ClipRecord, manifest_dir: Path) -> dict[str, torch.Tensor]:
        vae, text_encoder, tokenizer = self.models  # outside _about_clip: not the clip's fault
        with _about_clip(record.id):
            return self._encode(record, manifest_dir, vae, text_encoder, tokenizer)

    def _encode(
        self, record: ClipRecord, manifest_dir: Path, vae, text_encoder, tokenizer
    ) -> dict[str, torch.Tensor]:
        from moe.wan.components import encode_prompts, encode_video, i2v_condition

        video_path = record.video_path(manifest_dir)
        video = read_video(video_path, max_frames=self.frames)
        if len(video) < self.frames:
            raise MoeError(
                f"video {video_path} has {len(video)} frames, fewer than --frames {self.frames}; "
                f"lower --frames or drop the clip from the manifest"
            )
        pixels = fit_frames(video, self.size)
        source = (video.shape[2], video.shape[1])
        embeds, text_mask = encode_prompts(
            text_encoder, tokenizer, [record.caption], self.preset.text_encoder.max_length
        )
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
            f"VAE {paths.vae} has {got[0]} latent channels at {got[1]}x compression, but task "
            f"{preset.task!r} needs {need[0]} at {need[1]}x"
        )
    if text_encoder.config.d_model != preset.dit.text_dim:
        raise MoeError(
            f"text encoder {paths.text_encoder} has d_model {text_encoder.config.d_model}, but task "
            f"{preset.task!r} needs {preset.dit.text_dim}"
        )


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


def _write_clip(
    path: Path, tensors: dict[str, torch.Tensor], record: ClipRecord, task: str, fingerprint: str
) -> None:
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
        raise MoeError(
            f"no {', '.join(missing)} given; pass --model_set DIR or all of --vae, "
            f"--text_encoder and --tokenizer"
        )
    if task is None:
        raise MoeError("no --task given; pass --task (e.g. t2v-A14B) or a --model_set that names it")
    return task, _ComponentPaths(Path(vae), Path(text_encoder), Path(tokenizer))


def _check_settings(preset: WanPreset, size: tuple[int, int], frames: int, device: torch.device) -> None:
    temporal, multiple = preset.vae.temporal_compression, 2 * preset.vae.spatial_compression
    if frames < 1 or (frames - 1) % temporal:
        raise MoeError(f"--frames must be {temporal}k+1 (e.g. 81, 49, 17), got {frames}")
    width, height = size
    cell = preset.vae.spatial_compression
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise MoeError(
            f"--size {width}x{height}: width and height must be positive multiples of {multiple} "
            f"(the VAE's {cell}x{cell} cells times the DiT's 2x2 patches)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoeError(f"--device {device} was asked for, but torch sees no CUDA GPU; use --device cpu")


def _device(device: str | torch.device) -> torch.device:
    try:
        return torch.device(device)
    except RuntimeError:
        raise MoeError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None


def _preset(task: str) -> WanPreset:
    try:
        return get_preset(task)
    except ValueError as e:
        raise MoeError(str(e)) from None


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
) -> CacheIndex:
    """Encode every clip of `manifest` into `out_dir` (see the module docstring) and return the
    index; `index.report` lists the clips encoded, skipped (unchanged) and dropped.

    Components are given as paths (`vae`, `text_encoder`, `tokenizer`: diffusers folders or the
    original Wan files) or as a `model_set` folder; `task` defaults to the model set's. `dtype`
    is the compute dtype of the VAE and text encoder, `embed_dtype` the stored dtype of the text
    embeddings (bf16 halves UMT5-XXL's 4096-wide embeddings). Clips without a split get one
    from `split_by_video`.
    """
    manifest, out_dir, device, size = Path(manifest), Path(out_dir), _device(device), tuple(size)
    task, paths = resolve_component_paths(vae, text_encoder, tokenizer, model_set, task)
    preset = _preset(task)
    _check_settings(preset, size, frames, device)
    records = split_by_video(read_manifest(manifest, label_map))
    previous = CacheIndex._read(out_dir)  # refuses a folder holding some other index.json
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
    encoder = _ClipEncoder(preset, paths, size, frames, device, dtype, embed_dtype)
    report = BuildReport()
    entries = []
    bar = tqdm(records, desc="cache", unit="clip", disable=not progress)
    for record in bar:
        entries.append(_cache_clip(record, manifest.parent, out_dir, task, settings, encoder, report))
        bar.set_postfix(encoded=len(report.encoded), skipped=len(report.skipped))
    ids = {entry.id for entry in entries}
    report.dropped = [entry.id for entry in previous.clips if entry.id not in ids] if previous else []
    index = CacheIndex(task=task, settings=settings, clips=entries, root=out_dir, report=report)
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
# Loading (trainer side)
# ---------------------------------------------------------------------------------------------


def load_clip(index: CacheIndex, clip: str | CacheEntry) -> dict[str, torch.Tensor]:
    """The tensors of one cached clip, after checking that the file belongs to this cache
    (same task, same fingerprint as the index says)."""
    entry = index.entry(clip) if isinstance(clip, str) else clip
    path = index.root / entry.file
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, SafetensorError) as e:
        raise MoeError(
            f"clip {entry.id!r}: cannot read {path} ({e}); rebuild the cache with `lora-moe cache`"
        ) from None
    built_for = metadata.get("lora_moe.task")
    if built_for != index.task:
        raise MoeError(
            f"clip {entry.id!r}: {path} was built for task {built_for!r}, but cache {index.root} is for "
            f"{index.task!r}; rebuild the cache with `lora-moe cache --task {index.task}`"
        )
    if metadata.get("lora_moe.fingerprint") != entry.fingerprint:
        raise MoeError(
            f"clip {entry.id!r}: {path} does not match {index.root / INDEX_FILE} (a file from another "
            f"build); rebuild the cache with `lora-moe cache`"
        )
    return tensors


class CachedClipDataset(Dataset):
    """The cached clips of one split (None: all), as dicts of tensors plus "id"."""

    def __init__(self, index: CacheIndex, split: Literal["train", "val"] | None = "train"):
        if split not in ("train", "val", None):
            raise MoeError(f"split must be 'train', 'val' or None, got {split!r}")
        self.index = index
        self.entries = [entry for entry in index.clips if split is None or entry.split == split]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        return {**load_clip(self.index, entry), "id": entry.id}


def collate_clips(items: Sequence[dict]) -> dict:
    """Stack clip dicts into a batch ("id" becomes a list). Clips in one batch must have equal
    shapes: one bucket size and frame count."""
    if not items:
        raise MoeError("cannot collate an empty batch of clips")
    first = items[0]
    names = [name for name in first if name != "id"]
    for item in items[1:]:
        if set(item) != set(first):
            raise MoeError(
                f"clips {first['id']!r} and {item['id']!r} cannot share a batch: they hold different "
                f"tensors ({sorted(first)} vs {sorted(item)})"
            )
        for name in names:
            if item[name].shape != first[name].shape:
                raise MoeError(
                    f"clips {first['id']!r} and {item['id']!r} cannot share a batch: {name} shapes "
                    f"{list(first[name].shape)} and {list(item[name].shape)} differ; cache them at one "
                    f"--size and --frames or use batch size 1"
                )
    batch = {name: torch.stack([item[name] for item in items]) for name in names}
    batch["id"] = [item["id"] for item in items]
    return batch
