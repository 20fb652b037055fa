"""The Cholec80 importer on a tiny fake data set in the Cholec80 layout."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from moe.data.cholec80 import import_cholec80, read_tool_table
from moe.data.manifest import LabelMap, check_videos, read_manifest
from moe.data.video import read_video, write_video
from moe.errors import MoeError

HEADER = "Frame\tGrasper\tBipolar\tHook\tScissors\tClipper\tIrrigator\tSpecimenBag"
# One row every 25 frames, as in Cholec80.
VIDEO01_ROWS = [
    "0\t1\t0\t1\t0\t0\t0\t0",  # Grasper, Hook
    "25\t1\t0\t0\t1\t0\t0\t0",  # Grasper, Scissors
    "50\t0\t0\t0\t0\t0\t1\t0",  # Irrigator
    "75\t0\t1\t0\t0\t0\t0\t0",  # Bipolar
]
VIDEO02_ROWS = ["0\t0\t0\t0\t0\t1\t0\t0", "25\t0\t0\t0\t0\t0\t0\t0", "50\t0\t0\t0\t0\t0\t0\t0"]


def numbered_frames(num):
    """Grey frames whose brightness is 2 x their index, so the sampled source frames show."""
    return np.stack([np.full((16, 32, 3), 2 * i, np.uint8) for i in range(num)])


def write_table(path, rows, header=HEADER):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """video01: 100 frames, table in tool_annotations/; video02: 60 frames, table beside it."""
    root = tmp_path_factory.mktemp("cholec80")
    write_video(root / "videos" / "video01.mp4", numbered_frames(100), fps=25)
    write_video(root / "videos" / "video02.mp4", numbered_frames(60), fps=25)
    write_table(root / "tool_annotations" / "video01-tool.txt", VIDEO01_ROWS)
    write_table(root / "videos" / "video02-tool.txt", VIDEO02_ROWS)
    return root


def import_small(root, out, **kwargs):
    """One-second clips of 5 frames (every 5th source frame), back to back."""
    return import_cholec80(root, out, clip_seconds=1.0, frames_per_clip=5, **kwargs)


def test_clips_labels_captions_and_frames(root, tmp_path):
    manifest = import_small(root, tmp_path, val_fraction=0.5)
    records = read_manifest(manifest)
    by_id = {r.id: r for r in records}
    assert list(by_id) == [
        "video01_000000",
        "video01_000025",
        "video01_000050",
        "video01_000075",
        "video02_000000",
        "video02_000025",  # video02's last 10 frames make no whole clip
    ]
    expected = [["other", "hook"], ["other", "scissors"], ["suction"], ["other"], ["other"], []]
    assert [r.instruments for r in records] == expected
    assert by_id["video01_000000"].caption == ("laparoscopic cholecystectomy, a grasper and a hook in view")
    assert by_id["video02_000025"].caption == "laparoscopic cholecystectomy, no instruments in view"
    assert {r.source for r in records} == {"video01", "video02"}
    check_videos(records, tmp_path, min_frames=5)

    clip = read_video(tmp_path / by_id["video01_000025"].video)
    assert clip.shape == (5, 16, 32, 3)
    # Source frames 25, 30, ..., 45 have brightness 50, 60, ..., 90.
    assert np.abs(clip.reshape(5, -1).mean(axis=1) - [50, 60, 70, 80, 90]).max() < 3


def test_split_keeps_each_video_on_one_side_and_is_deterministic(root, tmp_path):
    first = read_manifest(import_small(root, tmp_path / "a", val_fraction=0.5, seed=1))
    again = read_manifest(import_small(root, tmp_path / "b", val_fraction=0.5, seed=1))
    assert [r.split for r in first] == [r.split for r in again]
    sides = {r.source: set() for r in first}
    for r in first:
        sides[r.source].add(r.split)
    assert sorted(s.pop() for s in sides.values() if len(s) == 1) == ["train", "val"]


def test_majority_presence_and_stride(root, tmp_path):
    # Two-second clips: Grasper in 100% of clip 0, Hook and Scissors in 50% each.
    half = import_cholec80(root, tmp_path / "h", clip_seconds=2.0, frames_per_clip=10, videos=["video01"])
    half = read_manifest(half)
    assert [r.instruments for r in half] == [["other", "hook", "scissors"], ["other", "suction"]]
    strict = import_cholec80(root, tmp_path / "s", clip_seconds=2.0, frames_per_clip=10, videos=["video01"], min_presence=0.6)
    assert read_manifest(strict)[0].instruments == ["other"]
    strided = read_manifest(import_small(root, tmp_path / "t", videos=["video01"], stride_seconds=2.0))
    assert [r.id for r in strided] == ["video01_000000", "video01_000050"]


def test_label_map_and_resize(root, tmp_path):
    mapping = {t: "other" for t in ("Grasper", "Bipolar", "Scissors", "Clipper", "SpecimenBag")}
    label_map = LabelMap(mapping={**mapping, "Hook": "hook", "Irrigator": "suction"})
    manifest = import_small(root, tmp_path, videos=["video01"], label_map=label_map, size=(16, 8))
    records = read_manifest(manifest)
    assert records[1].instruments == ["other"]  # Scissors folded into `other` by this map
    assert read_video(tmp_path / records[0].video).shape == (5, 8, 16, 3)


def test_missing_tool_table_is_a_clear_error(root, tmp_path):
    write_video(tmp_path / "videos" / "video03.mp4", numbered_frames(30), fps=25)
    with pytest.raises(MoeError, match="no tool table for .*video03.mp4"):
        import_small(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    ("rows", "header", "expected"),
    [
        (["0\t1\t0\t0\t0\t0\t0\t0", "25\t1\t0\tx\t0\t0\t0\t0"], HEADER, "line 3: expected integers"),
        (["0\t1\t0\t0\t0\t0\t0"], HEADER, "line 2: expected 8 columns, got 7"),
        (["0\t1\t0\t2\t0\t0\t0\t0"], HEADER, "line 2: column 'Hook' must be 0 or 1"),
        (["25\t1\t0\t0\t0\t0\t0\t0", "0\t1\t0\t0\t0\t0\t0\t0"], HEADER, "line 3: frame 0 does not follow"),
        (["0\t1"], "Time\tGrasper", "line 1: the header must be 'Frame'"),
        ([], HEADER, "no rows"),
    ],
)
def test_malformed_tables_name_file_and_line(tmp_path, rows, header, expected):
    path = write_table(tmp_path / "video01-tool.txt", rows, header)
    with pytest.raises(MoeError, match=expected) as err:
        read_tool_table(path)
    assert str(path) in str(err.value)


def test_unknown_tool_column_unknown_video_and_unreadable_video(root, tmp_path):
    bad = tmp_path / "bad"
    write_video(bad / "videos" / "video01.mp4", numbered_frames(30), fps=25)
    write_table(bad / "tool_annotations" / "video01-tool.txt", ["0\t1\t0"], "Frame\tGrasper\tLaser")
    with pytest.raises(MoeError, match=r"video01-tool.txt: unknown instrument label 'Laser'"):
        import_small(bad, tmp_path / "out")
    with pytest.raises(MoeError, match="unknown video.*video09.*available: video01, video02"):
        import_small(root, tmp_path / "out", videos=["video09"])
    broken = tmp_path / "broken"
    (broken / "videos").mkdir(parents=True)
    (broken / "videos" / "video01.mp4").write_bytes(b"not an mp4" * 100)
    write_table(broken / "videos" / "video01-tool.txt", VIDEO01_ROWS)
    with pytest.raises(MoeError, match=r"video01.mp4 is unreadable or corrupt"):
        import_small(broken, tmp_path / "out")


def test_cli_cholec80(root, tmp_path):
    from moe.cli import app
    from moe.cli.data import data_app  # noqa: F401  (registers `data` on `app`)

    args = [
        "data",
        "cholec80",
        "--root",
        str(root),
        "--out",
        str(tmp_path),
        "--frames-per-clip",
        "5",
        "--clip-seconds",
        "1",
        "--videos",
        "video01",
        "--size",
        "16x8",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "manifest.jsonl") in result.output
    assert "4 clips (4 train)" in result.output
