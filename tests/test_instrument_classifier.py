"""The instrument-presence classifier (issue 19): it learns the synthetic instruments from real
train clips, reads held-out real clips of class X as X, is deterministic, round-trips through its
files, and scores generated clips against what they were asked for (hand-checked numbers)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moe.config.instruments import INSTRUMENT_CLASSES
from moe.data.manifest import read_manifest
from moe.errors import MoeError
from moe.eval.instrument_classifier import (
    CLASSIFIER_FORMAT,
    InstrumentAccuracy,
    classify_clips,
    describe,
    fit_classifier,
    instrument_accuracy,
    load_classifier,
    prepare_frames,
    presence_labels,
    read_clip,
    save_classifier,
    sidecar_path,
    train_classifier,
)
from moe.tiny.synth import synthesize_dataset

SIZE = (64, 64)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """120 seeded synthetic clips of 5 frames at 64x64: 96 train, 24 val."""
    return synthesize_dataset(tmp_path_factory.mktemp("synth"), clips=120, frames=5, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def trained(manifest):
    return train_classifier(manifest, size=SIZE, seed=0)


@pytest.fixture(scope="module")
def held_out(manifest):
    """(records, clips as uint8 [F, H, W, 3]) of the val split."""
    records = [r for r in read_manifest(manifest) if r.split == "val"]
    clips = [((read_clip(r, manifest.parent, SIZE).permute(0, 2, 3, 1) + 1) * 127.5).round().to(torch.uint8).numpy() for r in records]
    return records, clips


def test_held_out_accuracy_is_clearly_above_chance(trained):
    """Measured (seed 0): presence accuracy 0.99 over the 24 val clips x 4 classes, top-1 1.0,
    asked-for class found in 0.97 of requests; the majority baseline is 0.54-0.75 per class and
    a random top-1 about 0.3."""
    s = trained.summary
    assert (s.train_clips, s.train_frames, s.held_out.n_clips) == (96, 480, 24)
    assert s.held_out.top1 >= 0.8
    assert s.held_out.overall >= 0.85
    assert s.held_out.overall >= max(s.held_out.majority_baseline.values()) + 0.1
    assert s.held_out_as_asked.overall >= 0.75
    assert s.final_loss < 0.1


def test_real_clips_of_a_class_are_read_as_that_class(trained, held_out):
    """The sanity check behind "the scissors expert draws scissors": a real held-out clip showing
    one instrument is read as that instrument more often than as any other."""
    records, clips = held_out
    single = [i for i, r in enumerate(records) if len(r.instruments) == 1]
    probs = classify_clips(trained, [clips[i] for i in single])
    acc = instrument_accuracy(probs, [records[i].instruments[0] for i in single])
    confusion = np.asarray(acc.confusion)
    for k, name in enumerate(INSTRUMENT_CLASSES):
        assert confusion[k].sum() > 0, f"no single-instrument val clip of {name}"
        others = np.delete(confusion[k], k)
        assert confusion[k, k] > others.max(), (name, acc.confusion)
        assert acc.per_class[name] >= 0.5, (name, acc.per_class)
    assert acc.overall_top1 >= 0.8


def test_training_is_deterministic_and_leaves_global_state_alone(manifest):
    records = [r for r in read_manifest(manifest) if r.split == "train"][:12]
    clips = [read_clip(r, manifest.parent, SIZE, frames_per_clip=2) for r in records]
    labels = torch.stack([presence_labels(r.instruments) for r in records])
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    runs = [fit_classifier(clips, labels, size=SIZE, epochs=2, seed=seed)[0].state_dict() for seed in (3, 3, 4)]
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_save_load_round_trip(trained, held_out, tmp_path):
    _, clips = held_out
    path = save_classifier(trained, tmp_path / "eval" / "instrument_classifier.safetensors")
    info = json.loads(sidecar_path(path).read_text())
    assert info["format"] == CLASSIFIER_FORMAT and info["classes"] == list(INSTRUMENT_CLASSES)
    assert info["size"] == [64, 64] and "[-1, 1]" in info["normalisation"] and info["seed"] == 0
    assert info["training"]["held_out"]["overall"] == trained.summary.held_out.overall
    assert sorted(p.name for p in path.parent.iterdir()) == ["instrument_classifier.json", "instrument_classifier.safetensors"]
    loaded = load_classifier(path)
    assert loaded.summary == trained.summary
    np.testing.assert_array_equal(classify_clips(loaded, clips), classify_clips(trained, clips))


def test_load_refuses_other_classes_and_foreign_weights(trained, tmp_path):
    path = save_classifier(trained, tmp_path / "c.safetensors")
    with pytest.raises(MoeError, match=r"trained for classes \['scissors', 'hook', 'suction', 'other'\], not") as e:
        load_classifier(path, classes=("hook", "scissors", "suction", "other"))
    assert "\n" not in str(e.value)
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(MoeError, match="sha256 differs"):
        load_classifier(path)
    with pytest.raises(MoeError, match="does not exist"):
        load_classifier(tmp_path / "missing.safetensors")


def test_accuracy_and_confusion_on_a_hand_computed_example():
    probs = np.array(
        [
            [0.9, 0.1, 0.2, 0.3],  # asked scissors: found, top-1 scissors
            [0.4, 0.7, 0.1, 0.2],  # asked scissors: missed (0.4 < 0.5), top-1 hook
            [0.2, 0.6, 0.1, 0.8],  # asked hook: found, top-1 other
            [0.1, 0.2, 0.5, 0.3],  # asked suction: found (0.5 counts), top-1 suction
            [0.1, 0.3, 0.9, 0.2],  # asked hook + suction: hook missed, suction found, top-1 suction
        ],
        dtype=np.float32,
    )
    acc = instrument_accuracy(probs, ["scissors", "scissors", "hook", "suction", ["hook", "suction"]])
    assert acc == InstrumentAccuracy(
        classes=list(INSTRUMENT_CLASSES),
        per_class={"scissors": 0.5, "hook": 0.5, "suction": 1.0, "other": None},
        overall=4 / 6,
        per_class_top1={"scissors": 0.5, "hook": 0.0, "suction": 1.0, "other": None},
        overall_top1=3 / 5,
        confusion=[[1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 2, 0], [0, 0, 0, 0]],
        wrong_top1=[[0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]],  # suction is no mistake in clip 4
        n_clips=5,
        n_asked={"scissors": 2, "hook": 2, "suction": 2, "other": 0},
        threshold=0.5,
    )
    assert describe(acc) == (
        "The classifier sees the instrument that was asked for in 4 of 6 requests (67%): scissors 1/2, hook 1/2, "
        "suction 2/2; most common mix-up: asked for scissors, it saw mostly hook (1 clip)."
    )
    single = instrument_accuracy(probs[:4], ["scissors", "scissors", "hook", "suction"])
    assert describe(single).startswith("The classifier sees the instrument that was asked for in 3 of 4 clips (75%)")
    with pytest.raises(MoeError, match="'grasper' is not one of"):
        instrument_accuracy(probs[:1], ["grasper"])
    with pytest.raises(MoeError, match=r"must be \[N, 4\]"):
        instrument_accuracy(probs[:, :3], ["hook"] * 5)


def test_clip_forms_and_labels(trained):
    rng = np.random.default_rng(0)
    clip = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    as_float = torch.from_numpy(clip).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_array_equal(classify_clips(trained, [clip]), classify_clips(trained, [as_float]))
    assert prepare_frames(rng.integers(0, 256, (2, 96, 128, 3), dtype=np.uint8), SIZE).shape == (2, 3, 64, 64)
    assert classify_clips(trained, [torch.zeros(2, 3, 48, 80)]).shape == (1, 4)
    with pytest.raises(MoeError, match=r"uint8 \[F, H, W, 3\] or float"):
        prepare_frames(np.zeros((2, 3, 64, 64), np.uint8), SIZE)
    assert presence_labels(["hook", "other"]).tolist() == [0.0, 1.0, 0.0, 1.0]
    with pytest.raises(MoeError, match="map raw labels"):
        presence_labels(["Grasper"])
