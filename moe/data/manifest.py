"""The JSONL clip manifest (SPEC section 7): its row model, label mapping, I/O, checks and split.

One line per clip:

    {"video": "videos/a.mp4", "caption": "...", "instruments": ["hook"],
     "roi": [[0, 10, 12, 20, 22], ...], "split": "train", "id": "a", "source": "video01"}

`video` and `mask` are relative to the manifest's folder. A tip box `[frame, x0, y0, x1, y1]` is
in pixels with numpy slice semantics: it covers columns x0 <= x < x1 and rows y0 <= y < y1 of
frame `frame` (0-based, in the clip). `source` names the video a clip was cut from, so that a
split never puts clips of one recording on both sides; it defaults to the clip id.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from moe.config.instruments import INSTRUMENT_CLASSES
from moe.data.video import count_frames, probe_video, written_by_lora_moe
from moe.errors import MoeError
from moe.files.atomic import atomic_file

CHOLEC80_LABELS: dict[str, str] = {
    "Scissors": "scissors",
    "Hook": "hook",
    "Irrigator": "suction",
    "Grasper": "other",
    "Bipolar": "other",
    "Clipper": "other",
    "SpecimenBag": "other",
}

TipBox = tuple[int, int, int, int, int]

MANIFEST_FILE = "manifest.jsonl"


class ClipRecord(BaseModel):
    """One manifest row. Unknown fields are rejected so that a typo ("spilt") is not silently
    ignored."""

    model_config = ConfigDict(extra="forbid")

    video: str = Field(min_length=1)
    caption: str
    instruments: list[str]
    roi: list[TipBox] | None = None
    mask: str | None = None
    split: Literal["train", "val"] | None = None
    id: str = ""
    source: str = ""

    @model_validator(mode="after")
    def _default_ids(self) -> ClipRecord:
        """`id` defaults to the video's stem and `source` to the id."""
        self.id = self.id or Path(self.video).stem
        self.source = self.source or self.id
        return self

    @field_validator("video", "mask")
    @classmethod
    def _inside_the_manifest_folder(cls, path: str | None) -> str | None:
        """A manifest names files in its own folder: the pipeline resolves them against the
        manifest's URI and lays them out under a work folder by these names, so an absolute path
        or a '..' would read (and write) outside both."""
        if path is not None and (path.startswith(("/", "\\")) or ".." in path.replace("\\", "/").split("/") or "://" in path):
            raise ValueError(
                f"{path!r} must be a path relative to the manifest's folder, without '..' or a scheme "
                "(a manifest names only files inside its own folder)"
            )
        return path

    @field_validator("roi")
    @classmethod
    def _valid_boxes(cls, roi: list[TipBox] | None) -> list[TipBox] | None:
        for frame, x0, y0, x1, y1 in roi or ():
            if frame < 0 or x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
                raise ValueError(f"tip box {[frame, x0, y0, x1, y1]} must have frame >= 0, 0 <= x0 < x1 and 0 <= y0 < y1")
        return roi

    def video_path(self, manifest_dir: str | Path) -> Path:
        return Path(manifest_dir) / self.video

    def mask_path(self, manifest_dir: str | Path) -> Path | None:
        return None if self.mask is None else Path(manifest_dir) / self.mask


class LabelMap(BaseModel):
    """Maps raw instrument labels (e.g. Cholec80 tool names) to the expert classes.

    Matching ignores case and surrounding spaces. Expert class names that the map does not
    mention map to themselves, so a canonical manifest passes through; an explicit entry wins
    (a map may send Cholec80's "Scissors" to `other`).
    """

    mapping: dict[str, str] = Field(default_factory=lambda: dict(CHOLEC80_LABELS), validate_default=True)

    @field_validator("mapping")
    @classmethod
    def _normalise(cls, mapping: dict[str, str]) -> dict[str, str]:
        normalised: dict[str, str] = {}
        for raw, target in mapping.items():
            key, value = raw.strip().lower(), target.strip().lower()
            if value not in INSTRUMENT_CLASSES:
                raise ValueError(f"label {raw!r} maps to {target!r}, which is not one of {list(INSTRUMENT_CLASSES)}")
            if normalised.get(key, value) != value:
                raise ValueError(f"label {raw!r} is mapped twice, to {normalised[key]!r} and {value!r}")
            normalised[key] = value
        return normalised

    @classmethod
    def from_json_file(cls, path: str | Path) -> LabelMap:
        """Load a map from a JSON object `{"raw label": "expert class", ...}`."""
        path = Path(path)
        try:
            mapping = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise MoeError(f"cannot read label map {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise MoeError(f"label map {path} is not UTF-8 text; pass a JSON file") from None
        except json.JSONDecodeError as e:
            raise MoeError(f"label map {path} is not valid JSON: {e}") from None
        try:
            return cls(mapping=mapping)
        except ValidationError as e:
            raise MoeError(f"label map {path}: {_describe(e)}") from None

    def known_labels(self) -> list[str]:
        return sorted(set(self.mapping) | set(INSTRUMENT_CLASSES))

    def canonical(self, label: str, context: str) -> str:
        """The expert class of `label`; `context` (e.g. "clip 'a'") names where it came from."""
        key = label.strip().lower()
        if key in self.mapping:
            return self.mapping[key]
        if key in INSTRUMENT_CLASSES:
            return key
        raise MoeError(f"{context}: unknown instrument label {label!r}; known labels: {', '.join(self.known_labels())}")

    def map_labels(self, labels: Iterable[str], context: str) -> list[str]:
        """Map labels to expert classes, dropping repeats (Grasper + Bipolar is one `other`)."""
        return list(dict.fromkeys(self.canonical(label, context) for label in labels))


def _describe(error: ValidationError) -> str:
    """Pydantic's errors as "field 'roi.0.3': message; ..." with the field's dotted location."""
    parts = []
    for err in error.errors():
        field = ".".join(str(part) for part in err["loc"]) or "(row)"
        message = err["msg"].removeprefix("Value error, ")
        parts.append(f"field '{field}': {message}")
    return "; ".join(parts)


def _parse_row(path: Path, lineno: int, line: str, label_map: LabelMap) -> ClipRecord:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        raise MoeError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, dict):
        raise MoeError(f"{path} line {lineno}: a row must be a JSON object, got {type(data).__name__}")
    try:
        record = ClipRecord.model_validate(data)
    except ValidationError as e:
        raise MoeError(f"{path} line {lineno}: {_describe(e)}") from None
    try:
        instruments = label_map.map_labels(record.instruments, f"clip {record.id!r}")
    except MoeError as e:
        raise MoeError(f"{path} line {lineno}: field 'instruments': {e}") from None
    return record.model_copy(update={"instruments": instruments})


def read_manifest(path: str | Path, label_map: LabelMap | None = None) -> list[ClipRecord]:
    """Read and validate a manifest; instrument labels come back as expert classes.

    Any bad row stops the read with a `MoeError` naming the file, the line and the field.
    Blank lines are skipped.
    """
    path = Path(path)
    label_map = label_map or LabelMap()
    try:
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        raise MoeError(f"manifest {path} is a folder; pass the manifest file (e.g. {path / MANIFEST_FILE})") from None
    except OSError as e:
        raise MoeError(f"cannot read manifest {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise MoeError(f"manifest {path} is not UTF-8 text; pass the JSONL manifest (e.g. {path.parent / MANIFEST_FILE})") from None
    records: list[ClipRecord] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_row(path, lineno, line, label_map)
        if record.id in first_line:
            raise MoeError(f"{path} line {lineno}: field 'id': duplicate clip id {record.id!r} (first on line {first_line[record.id]})")
        first_line[record.id] = lineno
        records.append(record)
    if not records:
        raise MoeError(f"manifest {path} has no clips")
    return records


def written_dataset(folder: str | Path) -> bool:
    """Whether `folder` is a clip set lora-moe wrote (`data synth`, `data cholec80`): a manifest
    whose first clip is one of our MP4s. `--overwrite` replaces nothing else."""
    try:
        first = read_manifest(Path(folder) / MANIFEST_FILE)[0]
    except MoeError:
        return False
    return written_by_lora_moe(first.video_path(Path(folder)))


def write_manifest(path: str | Path, records: Iterable[ClipRecord]) -> Path:
    """Write records as JSONL, atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    records = list(records)
    seen: set[str] = set()
    for record in records:
        if record.id in seen:
            raise MoeError(f"cannot write {path}: duplicate clip id {record.id!r}")
        seen.add(record.id)
    lines = [json.dumps(r.model_dump(mode="json", exclude_none=True)) + "\n" for r in records]
    with atomic_file(path) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return path


def _check_clip(record: ClipRecord, manifest_dir: Path, min_frames: int) -> str | None:
    """What is wrong with one clip's files, or None when they are usable."""
    video = record.video_path(manifest_dir)
    try:
        _, _, width, height = probe_video(video)
        num_frames = count_frames(video)
    except MoeError as e:
        return str(e)
    if num_frames < min_frames:
        return f"video {video} has {num_frames} frames, fewer than the {min_frames} required"
    for frame, _, _, x1, y1 in record.roi or ():
        if frame >= num_frames or x1 > width or y1 > height:
            return f"tip box at frame {frame} ends at ({x1}, {y1}), outside the {num_frames}-frame {width}x{height} video"
    mask = record.mask_path(manifest_dir)
    if mask is not None:
        try:
            count_frames(mask)
        except MoeError as e:
            return f"mask: {e}"
    return None


def check_videos(records: Iterable[ClipRecord], manifest_dir: str | Path, min_frames: int = 1) -> None:
    """Decode every clip (and mask) and raise one `MoeError` listing every bad clip by id.

    Checks: the file exists, decodes to the end, has at least `min_frames` frames, and its tip
    boxes lie inside the video. Reporting all clips at once saves a fix-and-rerun loop per clip.
    """
    manifest_dir = Path(manifest_dir)
    problems = []
    for record in records:
        problem = _check_clip(record, manifest_dir, min_frames)
        if problem is not None:
            problems.append(f"  clip {record.id!r}: {problem}")
    if problems:
        raise MoeError(f"{len(problems)} bad clip(s) in {manifest_dir}:\n" + "\n".join(problems))


def _rank(source: str, seed: int) -> str:
    """A seeded pseudo-random rank that depends only on the source's name, not on list order."""
    return hashlib.sha256(f"{seed}:{source}".encode()).hexdigest()


def _num_val(num_sources: int, val_fraction: float) -> int:
    """round(fraction x sources), but at least one source on each side when there are two."""
    n = round(val_fraction * num_sources)
    if 0 < val_fraction < 1 and num_sources >= 2:
        n = min(max(n, 1), num_sources - 1)
    return n


def split_by_video(records: Iterable[ClipRecord], val_fraction: float = 0.2, seed: int = 0) -> list[ClipRecord]:
    """Assign `split` by source video, deterministically; returns new records in input order.

    A clip's own `split` wins. Clips without one follow the other clips of their source that
    have one; sources with no fixed split are ranked by a seeded hash of their name and the
    first round(val_fraction x count) go to val. Hash ranking makes the result independent of
    record order, and a source keeps its side as long as the set of sources is the same.
    """
    if not 0 <= val_fraction <= 1:
        raise MoeError(f"val_fraction must be in [0, 1], got {val_fraction}")
    records = list(records)
    fixed: dict[str, str] = {}
    for record in records:
        if record.split is not None:
            fixed.setdefault(record.source, record.split)
    free = sorted({r.source for r in records} - set(fixed), key=lambda s: _rank(s, seed))
    side = dict(fixed)
    n_val = _num_val(len(free), val_fraction)
    side.update({source: "val" if i < n_val else "train" for i, source in enumerate(free)})
    return [r.model_copy(update={"split": r.split or side[r.source]}) for r in records]


def summarize(records: Iterable[ClipRecord]) -> str:
    """One line for humans: clip count per split and per instrument class."""
    records = list(records)
    splits = Counter(r.split or "unassigned" for r in records)
    classes = Counter(label for r in records for label in r.instruments)
    split_text = ", ".join(f"{splits[name]} {name}" for name in ("train", "val", "unassigned") if splits[name])
    class_text = ", ".join(f"{name} {classes[name]}" for name in INSTRUMENT_CLASSES)
    return f"{len(records)} clips ({split_text}); clips per instrument: {class_text}"
