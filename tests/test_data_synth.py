"""The synthetic surgical set: determinism, balance, exact tip boxes, and the `data synth` CLI."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from typer.testing import CliRunner

from moe.config.instruments import INSTRUMENT_CLASSES
from moe.data.manifest import check_videos, read_manifest
from moe.data.video import read_video
from moe.errors import MoeError
from moe.tiny.synth import plan_dataset, render_clip, synthesize_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return synthesize_dataset(out, clips=16, frames=17, size=(64, 48), seed=7)


def test_manifest_is_valid_split_and_videos_decode(dataset):
    records = read_manifest(dataset)
    assert len(records) == 16
    check_videos(records, dataset.parent, min_frames=17)
    assert Counter(r.split for r in records) == {"train": 13, "val": 3}
    for record in records:
        assert record.video.startswith("videos/")
        assert record.roi
        assert record.caption.startswith(("laparoscopic", "endoscopic"))
    frames = read_video(dataset.parent / records[0].video)
    assert frames.shape == (17, 48, 64, 3)


def test_same_seed_gives_identical_files_and_other_seed_differs(dataset, tmp_path):
    again = synthesize_dataset(tmp_path / "again", clips=16, frames=17, size=(64, 48), seed=7)
    assert again.read_bytes() == dataset.read_bytes()
    for video in sorted((dataset.parent / "videos").iterdir()):
        assert (again.parent / "videos" / video.name).read_bytes() == video.read_bytes()
    other = synthesize_dataset(tmp_path / "other", clips=2, frames=17, size=(64, 48), seed=8)
    first = "videos/synth_00000.mp4"
    assert not np.array_equal(read_video(other.parent / first), read_video(dataset.parent / first))


def test_classes_are_balanced_and_captions_name_them(dataset):
    records = read_manifest(dataset)
    assert Counter(r.instruments[0] for r in records) == {name: 4 for name in INSTRUMENT_CLASSES}
    words = {"scissors": "scissors", "hook": "hook", "suction": "suction", "other": "grasper"}
    for record in records:
        assert 1 <= len(record.instruments) <= 2
        assert len(set(record.instruments)) == len(record.instruments)
        for label in record.instruments:
            assert words[label] in record.caption
    primaries = Counter(p.labels[0] for p in plan_dataset(10, 5, (32, 32), seed=1))
    assert set(primaries) == set(INSTRUMENT_CLASSES)
    assert max(primaries.values()) - min(primaries.values()) <= 1


def test_tip_boxes_are_inside_the_frame_and_cover_the_drawn_tip():
    for plan in plan_dataset(8, 9, (64, 48), seed=3):
        clip = render_clip(plan)
        background = render_clip(plan, draw_instruments=False).frames
        diff = np.abs(clip.frames.astype(np.int16) - background).sum(axis=-1)
        frames_with_box = Counter(t for t, *_ in clip.roi)
        assert frames_with_box == {t: len(plan.instruments) for t in range(plan.frames)}
        for t, x0, y0, x1, y1 in clip.roi:
            assert 0 <= x0 < x1 <= plan.width and 0 <= y0 < y1 <= plan.height
            inside = diff[t, y0:y1, x0:x1]
            assert (inside > 0).mean() > 2 * (diff[t] > 0).mean()  # the tip really is drawn in its box: denser than the frame
            edges = (inside[0], inside[-1], inside[:, 0], inside[:, -1])
            assert all((edge > 0).any() for edge in edges)  # and it is tight: drawn pixels on all four of its edges
        assert len({tuple(box) for _, *box in clip.roi}) > len(plan.instruments)  # tips move


def test_encoded_video_matches_the_rendered_frames(dataset):
    records = read_manifest(dataset)
    plan = plan_dataset(16, 17, (64, 48), seed=7)[0]
    rendered = render_clip(plan)
    decoded = read_video(dataset.parent / records[0].video)
    assert np.abs(decoded.astype(int) - rendered.frames).mean() < 4
    assert [list(b) for b in rendered.roi] == [list(b) for b in records[0].roi]


def test_large_frames_render():
    plan = plan_dataset(1, 3, (832, 480), seed=0)[0]
    clip = render_clip(plan)
    assert clip.frames.shape == (3, 480, 832, 3)
    assert all(x1 <= 832 and y1 <= 480 for _, _, _, x1, y1 in clip.roi)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": (63, 64)}, "even"),
        ({"size": (8, 8)}, "at least"),
        ({"clips": 0}, "at least one clip"),
        ({"frames": 0}, "frame"),
    ],
)
def test_bad_arguments_are_moe_errors(tmp_path, kwargs, message):
    with pytest.raises(MoeError, match=message):
        synthesize_dataset(tmp_path, **kwargs)


def test_cli_synth_writes_and_summarises(tmp_path):
    from moe.cli import app
    from moe.cli.data import data_app  # noqa: F401  (registers `data` on `app`)

    runner = CliRunner()
    args = ["data", "synth", "--out", str(tmp_path), "--clips", "4", "--frames", "5", "--size", "32x32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(tmp_path / "manifest.jsonl") in result.output
    assert "4 clips (3 train, 1 val)" in result.output
    bad = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--size", "63x64"])
    assert isinstance(bad.exception, MoeError) and "63x64" in str(bad.exception)
    bad = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "x"), "--size", "big"])
    assert isinstance(bad.exception, MoeError) and "WIDTHxHEIGHT" in str(bad.exception)


def test_a_larger_set_extends_a_smaller_one():
    small, large = plan_dataset(3, 5, (32, 32), seed=2), plan_dataset(9, 5, (32, 32), seed=2)
    assert large[:3] == small


def test_each_class_enters_through_its_own_port():
    """Every instrument's trocar lies beyond its class's border (`TROCAR_SIDES`), as a laparoscopic
    port stays put; the shaft enters the frame from that side."""
    from moe.tiny.synth import TROCAR_SIDES

    assert sorted(TROCAR_SIDES.values()) == ["bottom", "left", "right", "top"] and set(TROCAR_SIDES) == set(INSTRUMENT_CLASSES)
    width, height = 64, 48
    beyond = {"left": lambda x, y: x < 0, "right": lambda x, y: x > width, "top": lambda x, y: y < 0, "bottom": lambda x, y: y > height}
    seen = Counter()
    for plan in plan_dataset(40, 9, (width, height), seed=3):
        for inst in plan.instruments:
            assert beyond[TROCAR_SIDES[inst.kind]](*inst.pivot), (plan.id, inst.kind, inst.pivot)
            seen[inst.kind] += 1
    assert set(seen) == set(INSTRUMENT_CLASSES)
