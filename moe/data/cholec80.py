"""Import Cholec80 (videos + tool presence tables) as clips and a manifest (SPEC section 7).

Expected layout (the dataset's own); tool files may also sit next to the videos:

    root/videos/video01.mp4                 25 fps
    root/tool_annotations/video01-tool.txt  "Frame Grasper Bipolar Hook ..." (tab separated),
                                            one 0/1 row every 25 frames

Each video is cut into clips of `clip_seconds` of source time, resampled to `frames_per_clip`
frames, one clip every `stride_seconds`. A table row labels the frames from its own frame up
to the next row's; a clip's instruments are the tools present in at least `min_presence` of its
frames (default 0.5: the majority, so a tool glimpsed for a moment at the clip's edge does not
label it). Labels pass through a `LabelMap`, so the manifest holds expert classes, while the
caption names the tools as Cholec80 does. Every clip's `source` is its video, and the split
keeps each video whole on one side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe.data.manifest import (
    MANIFEST_FILE,
    ClipRecord,
    LabelMap,
    split_by_video,
    write_manifest,
    written_dataset,
)
from moe.data.video import iter_frames, probe_video, write_video
from moe.errors import MoeError
from moe.files.output_paths import claim_output
from moe.runtime.progress import progress as progress_bar

WAN_FPS = 16.0

TOOL_PHRASES = {
    "grasper": "a grasper",
    "bipolar": "bipolar forceps",
    "hook": "a hook",
    "scissors": "scissors",
    "clipper": "a clip applier",
    "irrigator": "a suction-irrigator",
    "specimenbag": "a specimen bag",
}


@dataclass(frozen=True)
class ToolTable:
    """A parsed `videoNN-tool.txt`: annotated frame indices and 0/1 presence per tool."""

    path: Path
    tools: tuple[str, ...]
    frames: np.ndarray  # int [rows], strictly increasing
    presence: np.ndarray  # bool [rows, tools]

    def present(self, frame_indices: np.ndarray, min_presence: float) -> list[str]:
        """Tools present in at least `min_presence` of the given frames.

        Each frame takes the last row at or before it (frames before the first row take the
        first row), i.e. an annotation holds until the next one.
        """
        rows = np.clip(np.searchsorted(self.frames, frame_indices, side="right") - 1, 0, None)
        share = self.presence[rows].mean(axis=0)
        return [tool for tool, s in zip(self.tools, share) if s >= min_presence]


def _parse_ints(path: Path, lineno: int, fields: list[str], header: list[str]) -> list[int]:
    if len(fields) != len(header):
        raise MoeError(f"{path} line {lineno}: expected {len(header)} columns, got {len(fields)}")
    try:
        values = [int(field) for field in fields]
    except ValueError:
        raise MoeError(f"{path} line {lineno}: expected integers, got {' '.join(fields)!r}") from None
    for name, value in zip(header[1:], values[1:]):
        if value not in (0, 1):
            raise MoeError(f"{path} line {lineno}: column '{name}' must be 0 or 1, got {value}")
    return values


def read_tool_table(path: str | Path) -> ToolTable:
    """Parse a Cholec80 tool table; a malformed one is a `MoeError` naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise MoeError(f"cannot read tool table {path}: {e.strerror}") from None
    numbered = [(n, line.split()) for n, line in enumerate(lines, start=1) if line.strip()]
    if not numbered:
        raise MoeError(f"tool table {path} is empty")
    (header_line, header), rows = numbered[0], numbered[1:]
    if header[0].lower() != "frame" or len(header) < 2:
        raise MoeError(f"{path} line {header_line}: the header must be 'Frame' followed by tool names, got {' '.join(header)!r}")
    if not rows:
        raise MoeError(f"tool table {path} has a header but no rows")
    values = np.array([_parse_ints(path, n, fields, header) for n, fields in rows], np.int64)
    frames = values[:, 0]
    for (n, _), previous, frame in zip(rows[1:], frames[:-1], frames[1:]):
        if frame <= previous:
            raise MoeError(f"{path} line {n}: frame {frame} does not follow frame {previous}")
    if frames[0] < 0:
        raise MoeError(f"{path} line {rows[0][0]}: negative frame {frames[0]}")
    return ToolTable(path, tuple(header[1:]), frames, values[:, 1:].astype(bool))


def find_videos(root: Path) -> dict[str, Path]:
    """Video id (file stem) -> path, from `root/videos/` or, failing that, `root` itself."""
    if not root.is_dir():
        raise MoeError(f"Cholec80 root {root} is not a folder")
    folder = root / "videos" if (root / "videos").is_dir() else root
    videos = {p.stem: p for p in sorted(folder.glob("*.mp4"))}
    if not videos:
        raise MoeError(f"no .mp4 videos in {folder} (expected the Cholec80 layout root/videos/videoNN.mp4)")
    return videos


def find_tool_table(root: Path, video: Path) -> Path:
    name = f"{video.stem}-tool.txt"
    candidates = [root / "tool_annotations" / name, video.with_name(name)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise MoeError(f"no tool table for {video}; looked for {' and '.join(map(str, candidates))}")


def caption_for(tools: list[str]) -> str:
    """A caption naming the tools in Cholec80's own terms."""
    if not tools:
        return "laparoscopic cholecystectomy, no instruments in view"
    phrases = [TOOL_PHRASES.get(tool.lower(), tool.lower()) for tool in tools]
    named = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"laparoscopic cholecystectomy, {named} in view"


@dataclass(frozen=True)
class ClipCut:
    """One clip to cut: the source frames it samples and its manifest row."""

    indices: np.ndarray  # source frame index of each output frame
    record: ClipRecord


@dataclass(frozen=True)
class ClipTiming:
    clip_seconds: float
    frames_per_clip: int
    stride_seconds: float

    @property
    def fps(self) -> float:
        return self.frames_per_clip / self.clip_seconds


def _plan_video(
    video_id: str,
    video: Path,
    table: ToolTable,
    timing: ClipTiming,
    label_map: LabelMap,
    min_presence: float,
) -> list[ClipCut]:
    """Cut points of one video: whole clips only; the tail shorter than a clip is dropped."""
    total, src_fps, _, _ = probe_video(video)
    if src_fps <= 0:
        raise MoeError(f"video {video} does not record its frame rate")
    span = timing.clip_seconds * src_fps  # source frames per clip
    stride = timing.stride_seconds * src_fps
    steps = np.arange(timing.frames_per_clip)
    offsets = np.floor(steps * span / timing.frames_per_clip).astype(np.int64)
    num_clips = math.floor((total - span) / stride) + 1 if total >= span else 0
    cuts = []
    for start in (int(i * stride) for i in range(num_clips)):
        indices = start + offsets
        clip_id = f"{video_id}_{start:06d}"
        tools = table.present(indices, min_presence)
        record = ClipRecord(
            id=clip_id,
            video=f"clips/{clip_id}.mp4",
            caption=caption_for(tools),
            instruments=label_map.map_labels(tools, f"clip {clip_id!r}"),
            source=video_id,
        )
        cuts.append(ClipCut(indices, record))
    return cuts


def _cut_video(video: Path, cuts: list[ClipCut], out_dir: Path, fps: float, size: tuple[int, int] | None, bar) -> None:
    """Decode `video` once and write every clip as soon as its last frame has arrived.

    Only the clips that are open at the current frame are held in memory.
    """
    wanted: dict[int, list[tuple[int, int]]] = {}
    for c, cut in enumerate(cuts):
        for position, index in enumerate(cut.indices):
            wanted.setdefault(int(index), []).append((c, position))
    buffers: dict[int, list[np.ndarray | None]] = {}
    for index, frame in iter_frames(video, size=size, only=wanted.keys()):
        for c, position in wanted[index]:
            buffer = buffers.setdefault(c, [None] * len(cuts[c].indices))
            buffer[position] = frame
            if position == len(buffer) - 1:
                write_video(out_dir / cuts[c].record.video, np.stack(buffers.pop(c)), fps)
                bar.update(1)
    if buffers:
        raise MoeError(f"video {video} ended before its header's frame count; the file may be truncated")


def import_cholec80(
    root: str | Path,
    out_dir: str | Path,
    clip_seconds: float | None = None,
    frames_per_clip: int = 81,
    stride_seconds: float | None = None,
    label_map: LabelMap | None = None,
    videos: list[str] | None = None,
    size: tuple[int, int] | None = None,
    min_presence: float = 0.5,
    val_fraction: float = 0.2,
    seed: int = 0,
    progress: bool = False,
    overwrite: bool = False,
) -> Path:
    """Cut Cholec80 videos into clips under `out_dir/clips/`; return `out_dir/manifest.jsonl`.

    `clip_seconds` defaults to frames_per_clip / 16 (clips play at Wan's 16 fps);
    `stride_seconds` (start to start) defaults to `clip_seconds`, i.e. back-to-back clips.
    `videos` restricts the import to those ids (e.g. ["video01"]); `size` = (width, height)
    rescales frames (Wan wants multiples of 16, e.g. 832x480).
    """
    root, out_dir = Path(root), Path(out_dir)
    clip_seconds = clip_seconds if clip_seconds is not None else frames_per_clip / WAN_FPS
    stride_seconds = stride_seconds if stride_seconds is not None else clip_seconds
    timing = ClipTiming(clip_seconds, frames_per_clip, stride_seconds)
    if frames_per_clip < 1 or timing.clip_seconds <= 0 or timing.stride_seconds <= 0:
        raise MoeError("frames_per_clip, clip_seconds and stride_seconds must be positive")
    if not 0 < min_presence <= 1:
        raise MoeError(f"min_presence must be in (0, 1], got {min_presence}")
    label_map = label_map or LabelMap()
    available = find_videos(root)
    chosen = videos if videos is not None else list(available)
    unknown = [v for v in chosen if v not in available]
    if unknown:
        raise MoeError(f"unknown video(s) {', '.join(unknown)}; available: {', '.join(available)}")

    plans = []
    for video_id in chosen:
        video = available[video_id]
        table = read_tool_table(find_tool_table(root, video))
        label_map.map_labels(table.tools, f"tool table {table.path}")  # fail early on bad headers
        plans.append((video, _plan_video(video_id, video, table, timing, label_map, min_presence)))
    records = [cut.record for _, cuts in plans for cut in cuts]
    if not records:
        raise MoeError(f"the selected videos are all shorter than one clip ({clip_seconds:g} s)")

    claim = claim_output(out_dir, flag="--output_dir", inputs={"--root": root}, overwrite=overwrite, is_ours=written_dataset, folder=True)
    with claim, progress_bar(total=len(records), desc="cholec80 clips", unit="clip", disable=not progress) as bar:
        for video, cuts in plans:
            _cut_video(video, cuts, out_dir, timing.fps, size, bar)
        return write_manifest(out_dir / MANIFEST_FILE, split_by_video(records, val_fraction, seed))
