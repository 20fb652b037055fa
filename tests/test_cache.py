"""The latent cache: tensors and shapes, ROI rasterisation, skipping, loading checks and the CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from moe.cli import main
from moe.data.cache import build_cache
from moe.data.cache_index import CACHE_FORMAT, CacheIndex
from moe.data.cover_crop import fit_frames
from moe.data.dataset import CachedClipDataset, collate_clips, load_clip
from moe.data.manifest import ClipRecord, read_manifest, write_manifest
from moe.data.roi import roi_mask
from moe.data.video import read_video, write_video
from moe.errors import MoeError
from moe.tiny.model_set import write_tiny_model_set
from moe.tiny.synth import synthesize_dataset
from moe.wan.component_loaders import load_text_encoder, load_tokenizer, load_vae
from moe.wan.encoding import (
    encode_prompts,
    encode_video,
    i2v_condition,
    i2v_first_frame_mask,
)

SIZE = (64, 64)
FRAMES = 9  # -> 3 latent frames of 8x8 cells
BOXES = [[2, 8, 16, 16, 24], [0, 0, 0, 4, 8], [0, 2, 0, 6, 8]]  # one full cell; a union of 3/4


@pytest.fixture(scope="session")
def model_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("model_sets")
    return {task: write_tiny_model_set(root / task, task).vae.parent for task in ("tiny-t2v", "tiny-i2v")}


def _mask_video(path):
    """A white cell (rows 8-15, columns 16-23) on frames 5-8 and a half cell on frame 1."""
    frames = np.zeros((FRAMES, *SIZE[::-1], 3), dtype=np.uint8)
    frames[5:, 8:16, 16:24] = 255
    frames[1, 0:8, 0:4] = 255
    write_video(path, frames, fps=16, crf=0)


def _wide_video(path, source):
    """A 64x48 cut of a synthetic clip, so the cache has to resize and crop it."""
    write_video(path, read_video(source)[:, 8:56], fps=16)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """Synthetic clips under a manifest whose ROIs are known: a = boxes, b = mask video,
    c = nothing (and no split), d = 64x48 source, e = the synthetic tip boxes."""
    root = tmp_path_factory.mktemp("data")
    synth = read_manifest(synthesize_dataset(root, clips=4, frames=FRAMES, size=SIZE, seed=3))
    _mask_video(root / "videos" / "mask_b.mp4")
    _wide_video(root / "videos" / "wide.mp4", root / synth[3].video)
    records = [
        ClipRecord(id="a", video=synth[0].video, caption="a hook", instruments=["hook", "other"], roi=BOXES, split="train"),
        ClipRecord(
            id="b",
            video=synth[1].video,
            caption="scissors",
            instruments=["scissors"],
            mask="videos/mask_b.mp4",
            split="train",
        ),
        ClipRecord(id="c", video=synth[2].video, caption="suction", instruments=["suction"]),
        ClipRecord(id="d", video="videos/wide.mp4", caption="a grasper", instruments=["other"], split="val"),
        synth[3].model_copy(update={"id": "e", "split": "train"}),
    ]
    return write_manifest(root / "manifest.jsonl", records)


def _build(manifest, out, model_set, size=SIZE, frames=FRAMES):
    return build_cache(manifest, out, model_set=model_set, size=size, frames=frames, progress=False)


@pytest.fixture(scope="session")
def t2v_cache(tmp_path_factory, dataset, model_sets):
    return _build(dataset, tmp_path_factory.mktemp("cache_t2v"), model_sets["tiny-t2v"])


@pytest.fixture(scope="session")
def i2v_cache(tmp_path_factory, dataset, model_sets):
    return _build(dataset, tmp_path_factory.mktemp("cache_i2v"), model_sets["tiny-i2v"])


def _raw(dataset, clip_id):
    record = next(r for r in read_manifest(dataset) if r.id == clip_id)
    return torch.from_numpy(read_video(dataset.parent / record.video, FRAMES))


def test_t2v_clip_files_hold_every_tensor_with_its_shape(t2v_cache):
    assert t2v_cache.report.encoded == ["a", "b", "c", "d", "e"]
    index = CacheIndex.load(t2v_cache.root, task="tiny-t2v")
    assert [e.id for e in index.clips] == ["a", "b", "c", "d", "e"]
    assert index.settings.size == SIZE and index.settings.frames == FRAMES
    assert set(index.settings.components) == {"vae", "text_encoder", "tokenizer"}
    for entry in index.clips:
        clip = load_clip(index, entry)
        assert set(clip) == {"latents", "text_embeds", "text_mask", "roi", "labels"}
        assert clip["latents"].shape == (16, 3, 8, 8) and clip["latents"].dtype == torch.float32
        assert clip["text_embeds"].shape == (32, 32) and clip["text_embeds"].dtype == torch.float32
        assert clip["text_mask"].shape == (32,) and clip["text_mask"].dtype == torch.int64
        assert clip["roi"].shape == (3, 8, 8) and clip["labels"].shape == (4,)
        assert entry.latent_shape == [16, 3, 8, 8] and entry.split in ("train", "val")
    with safe_open(str(index.root / index.entry("a").file), "pt") as f:
        meta = f.metadata()
    assert meta["lora_moe.format"] == CACHE_FORMAT and meta["lora_moe.task"] == "tiny-t2v"
    assert meta["lora_moe.clip_id"] == "a" and meta["lora_moe.instruments"] == '["hook", "other"]'
    assert meta["lora_moe.fingerprint"] == index.entry("a").fingerprint


def test_latents_and_text_match_the_component_encoders(t2v_cache, dataset, model_sets):
    folder = model_sets["tiny-t2v"]
    vae = load_vae(folder / "vae")
    a = load_clip(t2v_cache, "a")
    torch.testing.assert_close(a["latents"], encode_video(vae, _raw(dataset, "a"))[0], atol=1e-5, rtol=1e-5)
    text_encoder, tokenizer = load_text_encoder(folder / "text_encoder"), load_tokenizer(folder / "tokenizer")
    embeds, mask = encode_prompts(text_encoder, tokenizer, ["a hook"], 32)
    torch.testing.assert_close(a["text_embeds"], embeds[0])
    assert torch.equal(a["text_mask"], mask[0]) and a["text_mask"].sum() == 3  # a, hook, </s>
    wide = _raw(dataset, "d")
    assert wide.shape[1:3] == (48, 64)
    fitted = fit_frames(wide, SIZE)  # 64x48 covers 64x64 at 85x64, cropped from column 10
    x = wide.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    expected = F.interpolate(x, size=(64, 85), mode="bilinear", antialias=True)[..., 10:74]
    torch.testing.assert_close(fitted[0].transpose(0, 1), expected.clamp(-1, 1))
    latents = load_clip(t2v_cache, "d")["latents"]
    torch.testing.assert_close(latents, encode_video(vae, fitted)[0], atol=1e-5, rtol=1e-5)


def test_roi_from_boxes_is_the_exact_cell_coverage(t2v_cache):
    roi = load_clip(t2v_cache, "a")["roi"]
    expected = torch.zeros(3, 8, 8)
    expected[1, 2, 1] = 1.0  # frame 2 -> latent frame 1; the box is exactly cell (2, 1)
    expected[0, 0, 0] = 0.75  # frame 0: boxes x 0-4 and 2-6 overlap, union 6x8 of 8x8
    assert torch.equal(roi, expected)
    assert t2v_cache.entry("a").has_roi


def test_roi_from_a_mask_video(t2v_cache):
    roi = load_clip(t2v_cache, "b")["roi"]
    expected = torch.zeros(3, 8, 8)
    expected[2, 1, 2] = 1.0  # frames 5-8 -> latent frame 2
    expected[1, 0, 0] = 0.5  # frame 1 -> latent frame 1, half a cell
    assert torch.equal(roi, expected)


def test_clip_without_roi_gets_zeros_and_a_split(t2v_cache):
    entry = t2v_cache.entry("c")
    assert not entry.has_roi and entry.split in ("train", "val")
    clip = load_clip(t2v_cache, "c")
    assert not clip["roi"].any()
    assert clip["labels"].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert load_clip(t2v_cache, "a")["labels"].tolist() == [0.0, 1.0, 0.0, 1.0]  # hook + other


def test_roi_boxes_follow_the_resize_and_crop():
    # 64x48 -> 48x48: no scaling, 8 columns cropped on the left
    roi = roi_mask([[0, 8, 0, 16, 8], [0, 0, 8, 8, 16]], None, (64, 48), (48, 48), 1)
    expected = torch.zeros(1, 6, 6)
    expected[0, 0, 0] = 1.0  # the second box lies in the cropped-off columns
    assert torch.equal(roi, expected)
    # 128x128 -> 64x64: halved
    roi = roi_mask([[0, 16, 16, 32, 32], [0, 0, 0, 8, 16]], None, (128, 128), (64, 64), 1)
    assert roi[0, 1, 1] == 1.0 and roi[0, 0, 0] == 0.5 and roi.sum() == 1.5
    with pytest.raises(MoeError, match="outside the 64x48 video"):
        roi_mask([[0, 0, 0, 65, 8]], None, (64, 48), (48, 48), 1)


def test_i2v_cache_adds_the_first_frame_condition(i2v_cache, dataset, model_sets):
    vae = load_vae(model_sets["tiny-i2v"] / "vae")
    for entry in i2v_cache.clips:
        clip = load_clip(i2v_cache, entry)
        assert clip["i2v_condition"].shape == (20, 3, 8, 8)
        assert clip["latents"].shape == (16, 3, 8, 8)
    cond = load_clip(i2v_cache, "d")["i2v_condition"]
    assert torch.equal(cond[:4], i2v_first_frame_mask(1, FRAMES, 8, 8)[0])
    expected = i2v_condition(vae, fit_frames(_raw(dataset, "d"), SIZE)[:, :, 0], FRAMES)[0]
    torch.testing.assert_close(cond, expected, atol=1e-5, rtol=1e-5)


def test_rerun_skips_unchanged_clips_and_reencodes_changed_ones(t2v_cache, dataset, model_sets, tmp_path):
    out = shutil.copytree(t2v_cache.root, tmp_path / "cache")
    again = _build(dataset, out, model_sets["tiny-t2v"])
    assert again.report.encoded == [] and again.report.skipped == ["a", "b", "c", "d", "e"]
    (out / "index.json").unlink()  # fingerprints live in the clip files: an interrupted run resumes
    assert _build(dataset, out, model_sets["tiny-t2v"]).report.encoded == []

    records = read_manifest(dataset)
    records[1] = records[1].model_copy(update={"caption": "scissors cutting tissue"})
    changed = write_manifest(dataset.parent / "manifest_changed.jsonl", records[:4])
    index = _build(changed, out, model_sets["tiny-t2v"])
    assert index.report.encoded == ["b"] and index.report.dropped == ["e"]
    assert [e.id for e in CacheIndex.load(out).clips] == ["a", "b", "c", "d"]
    assert not (out / "clips" / "e.safetensors").exists()
    assert load_clip(index, "b")["text_mask"].sum() == 4


def test_too_few_frames_names_the_clip(dataset, model_sets, tmp_path):
    videos = dataset.parent / "videos"
    write_video(videos / "short.mp4", read_video(videos / "wide.mp4")[:5], fps=16)
    manifest = write_manifest(
        dataset.parent / "manifest_short.jsonl",
        [ClipRecord(id="short", video="videos/short.mp4", caption="hook", instruments=["hook"])],
    )
    with pytest.raises(MoeError, match=r"clip 'short': .* has 5 frames, fewer than --frames 9"):
        _build(manifest, tmp_path, model_sets["tiny-t2v"], size=(48, 48))
    with pytest.raises(MoeError, match="4k\\+1"):
        _build(manifest, tmp_path, model_sets["tiny-t2v"], frames=8)
    with pytest.raises(MoeError, match="multiples of 16"):
        _build(manifest, tmp_path, model_sets["tiny-t2v"], size=(56, 64))


def test_loading_refuses_another_task_and_foreign_folders(t2v_cache, i2v_cache, tmp_path):
    with pytest.raises(MoeError, match=r"built for task 'tiny-t2v' \(first clip 'a'\), not 'tiny-i2v'"):
        CacheIndex.load(t2v_cache.root, task="tiny-i2v")
    with pytest.raises(MoeError, match="not a latent cache"):
        CacheIndex.load(tmp_path)
    mixed = CacheIndex.load(shutil.copytree(i2v_cache.root, tmp_path / "mixed"), task="tiny-i2v")
    shutil.copy(t2v_cache.root / "clips" / "c.safetensors", mixed.root / "clips" / "c.safetensors")
    with pytest.raises(MoeError, match=r"clip 'c': .* built for task 'tiny-t2v'"):
        load_clip(mixed, "c")


def test_dataset_and_collate(t2v_cache):
    train = CachedClipDataset(t2v_cache, "train")
    assert len(train) == sum(e.split == "train" for e in t2v_cache.clips) >= 3
    assert [item["id"] for item in CachedClipDataset(t2v_cache, "val")] == [e.id for e in t2v_cache.clips if e.split == "val"]
    batch = collate_clips([train[0], train[1]])
    assert batch["id"] == [train.entries[0].id, train.entries[1].id]
    assert batch["latents"].shape == (2, 16, 3, 8, 8) and batch["roi"].shape == (2, 3, 8, 8)
    assert batch["text_embeds"].shape == (2, 32, 32) and batch["labels"].shape == (2, 4)
    odd = {**train[1], "latents": torch.zeros(16, 5, 8, 8)}
    with pytest.raises(MoeError, match="latents shapes \\[16, 3, 8, 8\\] and \\[16, 5, 8, 8\\] differ"):
        collate_clips([train[0], odd])


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as e:
        main(["cache", "--quiet", *map(str, args)])
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def test_cli_builds_and_reports_errors(dataset, model_sets, tmp_path, capsys):
    manifest = write_manifest(dataset.parent / "manifest_cli.jsonl", read_manifest(dataset)[:1])
    common = ["--manifest", manifest, "--model_set", model_sets["tiny-t2v"], "--out", tmp_path / "c"]
    code, out, _ = _cli(capsys, *common, "--size", "64x64", "--frames", "9", "--embed_dtype", "bf16")
    assert code == 0
    assert out.strip() == f"cache {tmp_path / 'c'}: 1 tiny-t2v clips (1 encoded, 0 skipped, 0 dropped)"
    assert load_clip(CacheIndex.load(tmp_path / "c"), "a")["text_embeds"].dtype == torch.bfloat16
    code, _, err = _cli(capsys, *common, "--size", "64x64", "--frames", "8")
    assert code == 2
    assert err.startswith("error:") and err.count("\n") == 1 and "4k+1" in err
