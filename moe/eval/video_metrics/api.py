"""Features of clips, and FVD / KVD / FID / KID between two sets of clips with bootstrap intervals."""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from moe.errors import MoeError
from moe.eval.video_metrics.i3d import MIN_FRAMES
from moe.eval.video_metrics.preprocess import as_clips, i3d_input, inception_input
from moe.eval.video_metrics.stats import KID_SUBSET_SIZE, KID_SUBSETS, bootstrap_interval, frechet_distance, polynomial_mmd2
from moe.eval.video_metrics.weights import I3D_WEIGHTS, INCEPTION_WEIGHTS
from moe.files.atomic import atomic_file

METRICS = ("fvd", "kvd", "fid", "kid")
MIN_CLIPS = 2
FVD_FRAMES = 16  # the FVD protocol's clip length
_NEEDS = {"fvd": "i3d", "kvd": "i3d", "fid": "inception", "kid": "inception"}
_FORMAT = 1


@dataclass(frozen=True)
class MetricEstimate:
    """One metric between two sets of clips. `low`/`high`: the bootstrap interval over clips,
    recentred on the value (None when `bootstrap` is 0): the spread of the estimate at these clip
    counts; `bootstrap_bias` is the mean shift of the raw replicates that was removed (see
    `bootstrap_interval`). `n_real`/`n_generated`: clips in each set; FVD and FID on
    few clips are biased upward, so the counts travel with the value and values are comparable
    only at equal counts. `samples_real`/`samples_generated`: the feature rows behind the value
    (clips for FVD/KVD; for FID/KID every frame of those clips)."""

    value: float
    low: float | None
    high: float | None
    n_real: int
    n_generated: int
    samples_real: int
    samples_generated: int
    bootstrap: int
    bootstrap_bias: float | None = None
    level: float = 0.95

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class VideoFeatures:
    """Features of one set of clips, computed once and reusable (e.g. the real clips against
    every variant). `i3d`: [clips, 400] I3D logits of each clip's first `fvd_frames` frames;
    `inception`: [frames, 2048] pool features of every frame (or of `fid_frames` evenly spaced
    frames per clip), `frame_clip` the clip of each row.
    `save`/`load` keep them in an .npz (no pickle)."""

    clips: int
    i3d: np.ndarray | None = None
    inception: np.ndarray | None = None
    frame_clip: np.ndarray | None = None
    fvd_frames: int | None = FVD_FRAMES
    fid_frames: int | None = None
    shapes: list[tuple[int, int, int]] = field(default_factory=list)  # (frames, height, width) per clip

    @classmethod
    def concat(cls, parts: list[VideoFeatures]) -> VideoFeatures:
        """One set from features computed in parts (e.g. clips decoded and embedded in chunks)."""
        if not parts:
            raise MoeError("no VideoFeatures to join")
        first = parts[0]
        for part in parts[1:]:
            if (part.fvd_frames, part.fid_frames) != (first.fvd_frames, first.fid_frames):
                raise MoeError("VideoFeatures computed with different fvd_frames/fid_frames cannot be joined")
            if (part.i3d is None) != (first.i3d is None) or (part.inception is None) != (first.inception is None):
                raise MoeError("VideoFeatures holding different metrics' features cannot be joined")
        offsets = np.cumsum([0] + [p.clips for p in parts])
        return cls(
            clips=int(offsets[-1]),
            i3d=None if first.i3d is None else np.concatenate([p.i3d for p in parts]),
            inception=None if first.inception is None else np.concatenate([p.inception for p in parts]),
            frame_clip=None if first.frame_clip is None else np.concatenate([p.frame_clip + o for p, o in zip(parts, offsets)]),
            fvd_frames=first.fvd_frames,
            fid_frames=first.fid_frames,
            shapes=[s for p in parts for s in p.shapes],
        )

    def has(self, metric: str) -> bool:
        return (self.i3d if _NEEDS[metric] == "i3d" else self.inception) is not None

    def save(self, path: str | Path) -> None:
        meta = {
            "format": _FORMAT,
            "clips": self.clips,
            "fvd_frames": self.fvd_frames,
            "fid_frames": self.fid_frames,
            "shapes": [list(s) for s in self.shapes],
            "weights": {w.package: w.sha256 for w in (I3D_WEIGHTS, INCEPTION_WEIGHTS)},
        }
        arrays = {k: v for k, v in (("i3d", self.i3d), ("inception", self.inception), ("frame_clip", self.frame_clip)) if v is not None}
        with atomic_file(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> VideoFeatures:
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in ("i3d", "inception", "frame_clip") if k in data}
        except (OSError, ValueError, KeyError) as e:
            raise MoeError(f"{path} is not a saved VideoFeatures file: {e}") from None
        if meta.get("format") != _FORMAT:
            raise MoeError(f"{path} was saved in VideoFeatures format {meta.get('format')}, this code reads {_FORMAT}")
        if meta.get("weights") != {w.package: w.sha256 for w in (I3D_WEIGHTS, INCEPTION_WEIGHTS)}:
            raise MoeError(f"{path} holds features of other network weights than this code uses; compute them again")
        return cls(
            clips=meta["clips"], fvd_frames=meta["fvd_frames"], fid_frames=meta["fid_frames"], shapes=[tuple(s) for s in meta["shapes"]], **arrays
        )


# --- extractors, one per (network, device) per process ----------------------------------------


@lru_cache(maxsize=None)
def _network(name: str, device: str) -> torch.nn.Module:
    if name == "i3d":
        from moe.eval.video_metrics.i3d import load_i3d

        return load_i3d().to(device)
    from moe.eval.video_metrics.inception import load_inception

    return load_inception().to(device)


def clear_cache() -> None:
    """Drop the cached networks (frees their memory, GPU included)."""
    _network.cache_clear()


@contextlib.contextmanager
def _full_fp32(device: torch.device):
    """Plain fp32 convolutions and matmuls on CUDA (no TF32, which cuDNN convolutions use by
    default), as the reference networks ran; the previous settings come back afterwards."""
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9
        wanted = [(conv, "fp32_precision", "ieee"), (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    else:
        wanted = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in wanted]
    try:
        for obj, name, value in wanted:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from moe.runtime.devices import resolve_device

    return resolve_device(device, "device")


def video_features(
    videos,
    *,
    metrics=METRICS,
    device=None,
    fvd_frames: int | None = FVD_FRAMES,
    fid_frames: int | None = None,
    i3d_batch: int = 4,
    inception_batch: int = 32,
    where: str = "videos",
) -> VideoFeatures:
    """I3D and/or Inception features of clips (uint8 or [-1, 1] float, `[N, F, H, W, 3]` or a
    list of `[F, H, W, 3]`). `fvd_frames`: I3D sees each clip's first `fvd_frames` frames (16, the
    FVD protocol; None: all frames, at least 9). `fid_frames`: the Inception sees that many evenly
    spaced frames of each clip (None: every frame; fewer frames cost less, e.g. on a CPU)."""
    metrics = _check_metrics(metrics)
    if fvd_frames is not None and fvd_frames < MIN_FRAMES:
        raise MoeError(f"fvd_frames must be at least {MIN_FRAMES} (the I3D network's minimum; the FVD protocol uses 16) or None, got {fvd_frames}")
    if fid_frames is not None and fid_frames < 1:
        raise MoeError(f"fid_frames must be at least 1 or None (every frame), got {fid_frames}")
    clips = as_clips(videos, where)
    if not clips:
        raise MoeError(f"{where}: no clips given")
    dev = _device(device)
    shapes = [tuple(int(s) for s in c.shape[:3]) for c in clips]
    out = VideoFeatures(clips=len(clips), fvd_frames=fvd_frames, fid_frames=fid_frames, shapes=shapes)
    with torch.inference_mode(), _full_fp32(dev):
        if any(_NEEDS[m] == "i3d" for m in metrics):
            out.i3d = _i3d_features(clips, dev, fvd_frames, i3d_batch, where)
        if any(_NEEDS[m] == "inception" for m in metrics):
            out.inception, out.frame_clip = _inception_features(clips, dev, fid_frames, inception_batch)
    return out


def _i3d_features(clips, device, fvd_frames, batch, where) -> np.ndarray:
    need = max(fvd_frames or MIN_FRAMES, MIN_FRAMES)
    short = [i for i, c in enumerate(clips) if len(c) < need]
    if short:
        raise MoeError(
            f"{where}: FVD/KVD need clips of at least {need} frames (fvd_frames={fvd_frames}; the FVD protocol "
            f"uses 16, the I3D network at least {MIN_FRAMES}); clip {short[0]} has {len(clips[short[0]])}"
        )
    net = _network("i3d", str(device))
    clips = [c[:fvd_frames] if fvd_frames else c for c in clips]
    rows = [None] * len(clips)
    by_length: dict[int, list[int]] = {}
    for i, c in enumerate(clips):
        by_length.setdefault(len(c), []).append(i)
    for indices in by_length.values():
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            x = torch.cat([i3d_input([clips[i]], device) for i in chunk])
            logits = net(x).float().cpu().numpy()
            for i, row in zip(chunk, logits):
                rows[i] = row
    return np.stack(rows)


def _inception_features(clips, device, fid_frames, batch) -> tuple[np.ndarray, np.ndarray]:
    net = _network("inception", str(device))
    feats, owner, pending = [], [], []

    def flush():
        if pending:
            feats.append(net(torch.cat(pending)).float().cpu().numpy())
            pending.clear()

    for i, clip in enumerate(clips):
        if fid_frames is not None and fid_frames < len(clip):
            clip = clip[torch.from_numpy(np.linspace(0, len(clip) - 1, fid_frames).round().astype(np.int64))]
        owner.append(np.full(len(clip), i, dtype=np.int64))
        for part in clip.split(batch):
            pending.append(inception_input(part, device))
            if sum(len(p) for p in pending) >= batch:
                flush()
    flush()
    return np.concatenate(feats), np.concatenate(owner)


# --- metrics ------------------------------------------------------------------------------


def _check_metrics(metrics) -> tuple[str, ...]:
    metrics = (metrics,) if isinstance(metrics, str) else tuple(metrics)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise MoeError(f"metrics must be among {', '.join(METRICS)}, got {', '.join(unknown) or 'none'}")
    return metrics


def _features(videos, label: str, metrics, device, fvd_frames, fid_frames) -> VideoFeatures:
    if isinstance(videos, VideoFeatures):
        missing = [m for m in metrics if not videos.has(m)]
        if missing:
            raise MoeError(f"the {label} features hold nothing for {', '.join(missing)}; compute them with video_features(..., metrics={metrics})")
        return videos
    return video_features(videos, metrics=metrics, device=device, fvd_frames=fvd_frames, fid_frames=fid_frames, where=label)


def distribution_metrics(
    real,
    generated,
    *,
    seed: int = 0,
    bootstrap: int = 200,
    device=None,
    metrics=METRICS,
    fvd_frames: int | None = FVD_FRAMES,
    fid_frames: int | None = None,
    level: float = 0.95,
    kid_subsets: int = KID_SUBSETS,
    kid_subset_size: int = KID_SUBSET_SIZE,
) -> dict[str, MetricEstimate]:
    """FVD, KVD, FID and KID between `real` and `generated` clips (videos as for `video_features`,
    or their `VideoFeatures`), each with a seeded bootstrap interval over clips. `fvd_frames` and
    `fid_frames` apply to sets given as videos (see `video_features`); both sets must agree.

    The bootstrap resamples clips with replacement in each set, the same resamples for every
    metric; FID/KID take all frames of the resampled clips. The interval is recentred on the value
    (`bootstrap_interval`): resampling duplicates clips, which inflates FD-type values by
    itself; a large `bootstrap_bias` relative to the value says there are too few clips for the
    value to mean much. KID/KVD replicates use whichever unbiased MMD² estimator is cheaper.
    The resamples depend only on the seed and the clip counts, so calls for several variants
    against the same real clips share the real-side resamples.
    Cost: each replicate recomputes a covariance square root (FVD/FID) and the kernel sums
    (KVD/KID); with thousands of frames use a GPU or fewer replicates."""
    metrics = _check_metrics(metrics)
    if bootstrap < 0 or not 0 < level < 1:
        raise MoeError(f"bootstrap must be >= 0 and level in (0, 1), got {bootstrap} and {level}")
    dev = _device(device)
    counts = [v.clips if isinstance(v, VideoFeatures) else len(v) for v in (real, generated)]
    if min(counts) < MIN_CLIPS:
        raise MoeError(
            f"FVD/KVD/FID/KID need at least {MIN_CLIPS} clips in each set, got {counts[0]} real and "
            f"{counts[1]} generated (on few clips the values are biased and noisy: report the counts)"
        )
    r = _features(real, "real", metrics, dev, fvd_frames, fid_frames)
    g = _features(generated, "generated", metrics, dev, fvd_frames, fid_frames)
    for network, option in (("i3d", "fvd_frames"), ("inception", "fid_frames")):
        if any(_NEEDS[m] == network for m in metrics) and getattr(r, option) != getattr(g, option):
            raise MoeError(f"the real features used {option}={getattr(r, option)}, the generated {getattr(g, option)}: compute both alike")

    resample = np.random.default_rng([seed, 0])
    real_idx = resample.integers(0, r.clips, size=(bootstrap, r.clips))
    gen_idx = resample.integers(0, g.clips, size=(bootstrap, g.clips))
    out = {}
    for metric in metrics:
        if _NEEDS[metric] == "i3d":
            x, y = (torch.from_numpy(f.i3d).to(dev, torch.float64) for f in (r, g))
            rows_r = rows_g = None
        else:
            x, y = (torch.from_numpy(f.inception).to(dev, torch.float64) for f in (r, g))
            rows_r, rows_g = _clip_rows(r), _clip_rows(g)
        if x.shape[1] != y.shape[1]:
            raise MoeError(f"{metric}: the real features have {x.shape[1]} dimensions, the generated {y.shape[1]}")
        kid_rng = np.random.default_rng([seed, 1])

        def measure(a, b, method="protocol"):
            if metric in ("fvd", "fid"):
                return frechet_distance(a, b, dev)
            return polynomial_mmd2(
                a,
                b,
                rng=kid_rng,
                subsets=kid_subsets,
                subset_size=kid_subset_size,
                device=dev,
                method=method,
            )

        value = measure(x, y)
        reps = []
        for ir, ig in zip(real_idx, gen_idx):
            ir_rows = ir if rows_r is None else np.concatenate([rows_r[i] for i in ir])
            ig_rows = ig if rows_g is None else np.concatenate([rows_g[i] for i in ig])
            reps.append(measure(x[torch.from_numpy(ir_rows).to(dev)], y[torch.from_numpy(ig_rows).to(dev)], "fastest"))
        low, high, bias = bootstrap_interval(value, reps, level) if bootstrap else (None, None, None)
        out[metric] = MetricEstimate(
            value=value,
            low=low,
            high=high,
            n_real=r.clips,
            n_generated=g.clips,
            samples_real=len(x),
            samples_generated=len(y),
            bootstrap=bootstrap,
            bootstrap_bias=bias,
            level=level,
        )
    return out


def _clip_rows(f: VideoFeatures) -> list[np.ndarray]:
    order = np.argsort(f.frame_clip, kind="stable")
    bounds = np.searchsorted(f.frame_clip[order], np.arange(f.clips + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(f.clips)]
