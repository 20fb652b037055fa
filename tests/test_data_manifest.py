"""Manifest rows, label maps, video checks, the split, and the video I/O they rest on."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from moe.data.manifest import (
    ClipRecord,
    LabelMap,
    check_videos,
    read_manifest,
    split_by_video,
    summarize,
    write_manifest,
)
from moe.data.video import count_frames, probe_video, read_video, write_video
from moe.errors import MoeError

GOOD = {"video": "videos/a.mp4", "caption": "a hook", "instruments": ["hook"]}
ROW = {"video": "b.mp4", "caption": "c", "instruments": []}


def write_rows(tmp_path, *rows):
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def gradient_frames(num, width=32, height=24):
    """Frames whose brightness encodes their index, so sampling and decoding can be checked."""
    base = np.linspace(0, 60, width, dtype=np.float32)[None, :, None]
    return np.stack([np.broadcast_to(base + 8 * i, (height, width, 3)).astype(np.uint8) for i in range(num)])


# --- rows and labels ---------------------------------------------------------------------------


def test_read_manifest_defaults_ids_and_canonicalises_labels(tmp_path):
    path = write_rows(
        tmp_path,
        GOOD,
        "",
        {
            "video": "b.mp4",
            "caption": "c",
            "instruments": ["Grasper", "BIPOLAR", "Irrigator"],
            "roi": [[0, 1, 2, 3, 4]],
            "split": "val",
            "source": "video07",
        },
    )
    a, b = read_manifest(path)
    assert (a.id, a.source, a.instruments, a.roi, a.split) == ("a", "a", ["hook"], None, None)
    assert b.instruments == ["other", "suction"]  # Grasper + Bipolar are one `other`
    assert (b.id, b.source, b.split, b.roi) == ("b", "video07", "val", [(0, 1, 2, 3, 4)])


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ('{"video": "b.mp4", "caption": ', ["invalid JSON"]),
        ({"video": "b.mp4", "instruments": []}, ["field 'caption'", "required"]),
        ({**ROW, "instruments": "hook"}, ["field 'instruments'", "list"]),
        ({**ROW, "caption": 7}, ["field 'caption'", "string"]),
        ({**ROW, "roi": [[0, 1, 2, 3]]}, ["field 'roi.0"]),
        ({**ROW, "roi": [[0, 5, 2, 3, 4]]}, ["field 'roi'", "x0 < x1"]),
        ({**ROW, "split": "test"}, ["field 'split'"]),
        ({**ROW, "spilt": "val"}, ["field 'spilt'"]),
        ([1, 2], ["JSON object"]),
        ({**ROW, "video": "other/a.mp4"}, ["field 'id'", "duplicate", "'a'", "first on line 1"]),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, expected):
    path = write_rows(tmp_path, GOOD, row)
    with pytest.raises(MoeError) as err:
        read_manifest(path)
    message = str(err.value)
    assert f"{path} line 2: " in message
    for text in expected:
        assert text in message


def test_unknown_label_names_clip_label_and_known_labels(tmp_path):
    path = write_rows(tmp_path, GOOD, {**ROW, "video": "x/clip9.mp4", "instruments": ["Hook", "Laser"]})
    with pytest.raises(MoeError) as err:
        read_manifest(path)
    message = str(err.value)
    for text in ("line 2", "clip 'clip9'", "'Laser'", "scissors", "grasper", "irrigator"):
        assert text in message


def test_missing_and_empty_manifests_are_moe_errors(tmp_path):
    with pytest.raises(MoeError, match="cannot read manifest"):
        read_manifest(tmp_path / "nope.jsonl")
    with pytest.raises(MoeError, match="no clips"):
        read_manifest(write_rows(tmp_path, ""))


def test_label_map_is_configurable_case_insensitive_and_validated(tmp_path):
    custom = LabelMap(mapping={"Maryland Dissector": "Other", "harmonic": "scissors"})
    labels = custom.map_labels(["maryland dissector", "HARMONIC", "hook"], "clip 'x'")
    assert labels == ["other", "scissors", "hook"]
    with pytest.raises(MoeError, match="unknown instrument label 'Grasper'"):
        custom.canonical("Grasper", "clip 'x'")  # a custom map replaces the Cholec80 default
    with pytest.raises(ValueError, match="not one of"):
        LabelMap(mapping={"laser": "knife"})
    bad = tmp_path / "map.json"
    bad.write_text('{"laser": "knife"}')
    with pytest.raises(MoeError, match="map.json"):
        LabelMap.from_json_file(bad)
    good = tmp_path / "good.json"
    good.write_text('{"Laser": "hook"}')
    assert LabelMap.from_json_file(good).canonical("laser", "c") == "hook"


def test_write_manifest_round_trips_atomically(tmp_path):
    records = [
        ClipRecord(video="v/a.mp4", caption="c", instruments=["hook"], roi=[(0, 1, 2, 3, 4)], split="val"),
        ClipRecord(video="v/b.mp4", caption="d", instruments=[], source="video01"),
    ]
    path = write_manifest(tmp_path / "sub" / "manifest.jsonl", records)
    assert read_manifest(path) == records
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.jsonl"]  # no temp file left
    with pytest.raises(MoeError, match="duplicate clip id 'a'"):
        write_manifest(path, records + [records[0]])
    assert read_manifest(path) == records  # a refused write leaves the old file alone


def test_summarize_counts_splits_and_classes():
    records = [
        ClipRecord(video="a.mp4", caption="c", instruments=["hook", "other"], split="train"),
        ClipRecord(video="b.mp4", caption="c", instruments=["hook"], split="val"),
    ]
    assert summarize(records) == ("2 clips (1 train, 1 val); clips per instrument: scissors 0, hook 2, suction 0, other 1")


# --- videos ------------------------------------------------------------------------------------


def test_video_round_trip_probe_and_byte_stable_encoding(tmp_path):
    frames = gradient_frames(9)
    a = write_video(tmp_path / "a.mp4", frames, fps=25)
    b = write_video(tmp_path / "b.mp4", frames, fps=25)
    assert a.read_bytes() == b.read_bytes()
    assert probe_video(a) == (9, 25.0, 32, 24)
    assert count_frames(a) == 9
    decoded = read_video(a)
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 2
    assert read_video(a, max_frames=4).shape[0] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4", "b.mp4"]


def test_video_errors_are_moe_errors_naming_the_file(tmp_path):
    with pytest.raises(MoeError, match="even width and height"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 24, 31, 3), np.uint8), fps=8)
    with pytest.raises(MoeError, match=r"uint8 \[F, H, W, 3\]"):
        write_video(tmp_path / "f.mp4", np.zeros((2, 24, 32, 3), np.float32), fps=8)
    assert not list(tmp_path.iterdir())
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 50)
    for fn in (read_video, probe_video, count_frames):
        with pytest.raises(MoeError, match="garbage.mp4"):
            fn(garbage)
    with pytest.raises(MoeError, match="does not exist"):
        read_video(tmp_path / "missing.mp4")


def test_check_videos_lists_every_bad_clip_at_once(tmp_path):
    write_video(tmp_path / "good.mp4", gradient_frames(6), fps=8)
    write_video(tmp_path / "short.mp4", gradient_frames(2), fps=8)
    (tmp_path / "corrupt.mp4").write_bytes(b"garbage bytes" * 100)
    good = write_video(tmp_path / "good.mp4", gradient_frames(6), fps=8).read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(good[: len(good) // 2])
    write_video(tmp_path / "outside.mp4", gradient_frames(6), fps=8)

    def rec(name, **kw):
        return ClipRecord(video=f"{name}.mp4", caption="c", instruments=[], **kw)

    records = [
        rec("good", roi=[(5, 0, 0, 32, 24)]),
        rec("missing"),
        rec("corrupt"),
        rec("truncated"),
        rec("short"),
        rec("outside", roi=[(0, 20, 10, 40, 20)]),
    ]
    with pytest.raises(MoeError) as err:
        check_videos(records, tmp_path, min_frames=4)
    message = str(err.value)
    assert "5 bad clip(s)" in message
    for clip in ("missing", "corrupt", "truncated", "short", "outside"):
        assert f"clip '{clip}'" in message
    assert "clip 'good'" not in message
    assert "2 frames, fewer than the 4 required" in message
    check_videos(records[:1], tmp_path, min_frames=6)  # no error


# --- split -------------------------------------------------------------------------------------


def _clips(num_sources, per_source=3):
    return [
        ClipRecord(video=f"clips/v{s:02d}_{c}.mp4", caption="c", instruments=[], source=f"v{s:02d}")
        for s in range(num_sources)
        for c in range(per_source)
    ]


def test_split_is_deterministic_order_free_and_keeps_sources_whole():
    records = _clips(20)
    first = split_by_video(records, val_fraction=0.2, seed=3)
    assert first == split_by_video(records, val_fraction=0.2, seed=3)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    assert {r.id: r.split for r in split_by_video(shuffled, 0.2, 3)} == {r.id: r.split for r in first}
    sides = {}
    for r in first:
        sides.setdefault(r.source, set()).add(r.split)
    assert all(len(s) == 1 for s in sides.values())
    assert sum(s == {"val"} for s in sides.values()) == 4  # 20% of 20 videos
    other_seed = split_by_video(records, 0.2, seed=4)
    assert [r.split for r in other_seed] != [r.split for r in first]
    assert [r.id for r in first] == [r.id for r in records]  # input order kept


def test_split_respects_explicit_splits_and_their_sources():
    records = _clips(4)
    records[0] = records[0].model_copy(update={"split": "val"})  # v00 pinned to val by one clip
    records[4] = records[4].model_copy(update={"split": "train"})  # v01 pinned to train
    split = split_by_video(records, val_fraction=0.0, seed=0)
    by_source = {}
    for r in split:
        by_source.setdefault(r.source, set()).add(r.split)
    assert by_source == {"v00": {"val"}, "v01": {"train"}, "v02": {"train"}, "v03": {"train"}}


def test_split_keeps_one_source_on_each_side_and_checks_fraction():
    sides = {r.split for r in split_by_video(_clips(2), val_fraction=0.2, seed=0)}
    assert sides == {"train", "val"}
    with pytest.raises(MoeError, match="val_fraction"):
        split_by_video(_clips(2), val_fraction=1.5)


def test_data_check_command_reports_every_bad_clip(tmp_path, capsys):
    from moe.cli import main
    from moe.tiny.synth import synthesize_dataset

    manifest = synthesize_dataset(tmp_path / "d", clips=3, frames=9, size=(32, 32), seed=0)
    with pytest.raises(SystemExit) as ok:
        main(["data", "check", "--manifest", str(manifest), "--min_frames", "9"])
    assert ok.value.code == 0 and "3 clips OK" in capsys.readouterr().out
    videos = sorted((tmp_path / "d" / "videos").glob("*.mp4"))
    videos[0].write_bytes(b"not a video")
    videos[1].unlink()
    with pytest.raises(SystemExit) as bad:
        main(["data", "check", "--manifest", str(manifest), "--min_frames", "9"])
    err = capsys.readouterr().err
    assert bad.value.code == 2 and "2 bad clip(s)" in err and "Traceback" not in err
