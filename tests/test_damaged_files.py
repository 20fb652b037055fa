"""Truncated and corrupt files (issue 12, class 3): the header's byte ranges are checked against
the file size before anything else, so every reader says "truncated or corrupt: expected N
bytes, found M" in one line, and `inspect` never calls a half file valid. A folder given where a
file is expected (and the reverse) is named as such."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest
from conftest import run_cli

from moe.files.safetensors_file import read_header
from moe.train.train_state import TRAINABLE_FILE
from moe.wan.checkpoint import read_checkpoint, write_checkpoint


@pytest.fixture(scope="module")
def originals(stage2_run):
    r = stage2_run
    return {
        "DiT": r["models"].low_noise,
        "LoRA": r["vanilla_lora"],
        "LoRA-MoE": r["lora_moe"],
        "merged DiT": r["merged_low"],
        "training state": r["root"] / "stage1" / "state-epoch-1" / TRAINABLE_FILE,
        "cache clip": next((r["cache"] / "clips").glob("*.safetensors")),
    }


def _cut(src: Path, dst: Path, size: int) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:size] if size <= len(data) else data + b"\0" * (size - len(data)))
    return dst


def _sizes(path: Path) -> tuple[int, int]:
    """(header end, total size) of a valid file."""
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n, path.stat().st_size


# (damage, new size from (header end, full size), the message for a file of full size N)
DAMAGE = [
    ("cut at 50%", lambda h, n: n // 2, lambda h, n: f"truncated or corrupt: expected {n} bytes, found {n // 2}"),
    ("data section gone", lambda h, n: h, lambda h, n: f"truncated or corrupt: expected {n} bytes, found {h}"),
    ("one byte short", lambda h, n: n - 1, lambda h, n: f"truncated or corrupt: expected {n} bytes, found {n - 1}"),
    ("one byte extra", lambda h, n: n + 1, lambda h, n: f"expected {n} bytes, found {n + 1} (bytes after the last tensor)"),
    ("cut inside the header", lambda h, n: h // 2, lambda h, n: f"truncated or corrupt: expected {h} bytes, found {h // 2}"),
    ("empty", lambda h, n: 0, lambda h, n: "is not a safetensors file (too short: 0 bytes)"),
]
KINDS = ["DiT", "LoRA", "LoRA-MoE", "merged DiT", "training state", "cache clip"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage, size, message", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_inspect_refuses_a_damaged_file(originals, tmp_path, capsys, kind, damage, size, message):
    src = originals[kind]
    header_end, full = _sizes(src)
    bad = _cut(src, tmp_path / src.name, size(header_end, full))
    code, out, err = run_cli(capsys, ["inspect", bad])
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"error: {bad} ") and message(header_end, full) in err, err


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_reports_the_intact_file(originals, capsys, kind):
    """The control: the same files, whole, are reported without error."""
    code, out, err = run_cli(capsys, ["inspect", originals[kind]])
    assert code == 0 and out.startswith(f"{originals[kind]}: "), err


def _half(originals, tmp, kind) -> Path:
    src = originals[kind]
    return _cut(src, tmp / src.name, src.stat().st_size // 2)


def _generate(r, tmp, *extra):
    return [
        "generate",
        "--model_set",
        r["root"] / "models",
        "--prompt",
        "x",
        "--infer_steps",
        "1",
        "--video_size",
        "32x32",
        "--video_length",
        "5",
        "--save_path",
        tmp / "v.mp4",
        *extra,
    ]


# (reader, argv from (run, originals, tmp)): each reads one half file
READERS = [
    ("merge --dit", lambda r, o, t: ["merge", "--dit", _half(o, t, "DiT"), "--lora_weight", o["LoRA"], "--save_merged_model", t / "m.safetensors"]),
    (
        "merge --lora_weight",
        lambda r, o, t: ["merge", "--dit", o["DiT"], "--lora_weight", _half(o, t, "LoRA"), "--save_merged_model", t / "m.safetensors"],
    ),
    (
        "generate --lora_weight",
        lambda r, o, t: _generate(r, t, "--dit", o["DiT"], "--dit_high_noise", r["models"].high_noise, "--lora_weight", _half(o, t, "LoRA")),
    ),
    (
        "generate --lora_moe_weights",
        lambda r, o, t: _generate(
            r, t, "--dit", o["merged DiT"], "--dit_high_noise", r["merged_high"], "--lora_moe_weights", _half(o, t, "LoRA-MoE")
        ),
    ),
    (
        "export-expert",
        lambda r, o, t: ["export-expert", "--lora_moe_weights", _half(o, t, "LoRA-MoE"), "--expert", "hook", "--out", t / "e.safetensors"],
    ),
    (
        "stage1 --dit",
        lambda r, o, t: [
            "stage1",
            "--dit",
            _half(o, t, "DiT"),
            "--dit_high_noise",
            r["models"].high_noise,
            "--dataset",
            r["cache"],
            "--output_dir",
            t / "s1",
        ],
    ),
    (
        "stage2 --dit",
        lambda r, o, t: [
            "stage2",
            "--dit",
            _half(o, t, "merged DiT"),
            "--dit_high_noise",
            r["merged_high"],
            "--dataset",
            r["cache"],
            "--output_dir",
            t / "s2",
        ],
    ),
]


@pytest.mark.parametrize("reader, argv", READERS, ids=[r[0] for r in READERS])
def test_every_reader_names_the_truncated_file(stage2_run, originals, tmp_path, capsys, reader, argv):
    code, _, err = run_cli(capsys, argv(stage2_run, originals, tmp_path))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "truncated or corrupt: expected" in err, err
    assert not [p.name for p in tmp_path.iterdir() if p.suffix != ".safetensors"]  # no output, lock or temporary


def test_resume_from_a_truncated_state_is_one_line(stage2_run, tmp_path, capsys):
    r = stage2_run
    out = shutil.copytree(r["root"] / "stage1", tmp_path / "s1")
    state = out / "state-epoch-3" / TRAINABLE_FILE
    _cut(state, state, state.stat().st_size // 2)
    code, _, err = run_cli(
        capsys,
        [
            "stage1",
            "--dit",
            r["models"].low_noise,
            "--dit_high_noise",
            r["models"].high_noise,
            "--dataset",
            r["cache"],
            "--output_dir",
            out,
            "--network_dim",
            "8",
            "--max_train_epochs",
            "4",
            "--resume",
            "--no_progress",
        ],
    )
    assert code == 2 and err.count("\n") == 1, err
    assert f"cannot resume from {out / 'state-epoch-3'}: {state} is truncated or corrupt" in err
    assert "Delete state-epoch-3 to resume from the one before" in err


def test_training_on_a_cache_with_a_truncated_clip_names_the_clip(stage2_run, tmp_path, capsys):
    r = stage2_run
    cache = shutil.copytree(r["cache"], tmp_path / "cache")
    for clip in (cache / "clips").glob("*.safetensors"):
        _cut(clip, clip, clip.stat().st_size - 10)
    code, _, err = run_cli(
        capsys,
        [
            "stage1",
            "--dit",
            r["models"].low_noise,
            "--dit_high_noise",
            r["models"].high_noise,
            "--dataset",
            cache,
            "--output_dir",
            tmp_path / "s1",
            "--max_train_epochs",
            "1",
            "--no_progress",
        ],
    )
    assert code == 2 and err.count("\n") == 1, err
    assert "error: clip '" in err and "is truncated or corrupt: expected" in err and "rebuild the cache" in err


def test_a_truncated_shard_is_found_before_anything_is_read(tiny_state, tmp_path):
    folder = write_checkpoint(tiny_state, tmp_path / "sharded", max_shard_bytes=100_000)
    shards = sorted(folder.glob("*-of-*.safetensors"))
    assert len(shards) > 2
    _cut(shards[1], shards[1], shards[1].stat().st_size - 4)
    with pytest.raises(Exception, match=f"{shards[1]} is truncated or corrupt"):
        read_checkpoint(folder)
    with pytest.raises(Exception, match="is corrupt: the byte range of tensor"):
        _overlapping_offsets(shards[0], tmp_path / "bad.safetensors")


def _overlapping_offsets(src: Path, dst: Path):
    """A header whose first tensor's range is shifted by 4 bytes (same total size)."""
    import json

    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    first = min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    header[first]["data_offsets"][0] += 4
    body = json.dumps(header, separators=(",", ":")).encode()
    dst.write_bytes(struct.pack("<Q", len(body)) + body + raw[8 + n :])
    return read_header(dst)


# (case, argv from (run, tmp), message): a folder where a file belongs, and the reverse
FOLDER_OR_FILE = [
    (
        "--save_path is a folder",
        lambda r, t: _generate(r, t, "--dit", r["models"].low_noise, "--dit_high_noise", r["models"].high_noise)[:-2] + ["--save_path", t],
        "is a folder; it expects a file path",
    ),
    (
        "--save_merged_model is a folder",
        lambda r, t: ["merge", "--dit", r["models"].low_noise, "--lora_weight", r["vanilla_lora"], "--save_merged_model", t],
        "is a folder; pass a .safetensors file path",
    ),
    (
        "--lora_weight is a folder",
        lambda r, t: ["merge", "--dit", r["models"].low_noise, "--lora_weight", r["root"] / "stage1", "--save_merged_model", t / "m.safetensors"],
        ".safetensors files and no *.safetensors.index.json",
    ),
    (
        "--dataset is a file",
        lambda r, t: ["stage1", "--dit", r["models"].low_noise, "--dataset", r["manifest"], "--output_dir", t / "o"],
        "is a file; a latent cache is a folder",
    ),
    (
        "--output_dir is a file",
        lambda r, t: [
            "stage1",
            "--dit",
            r["models"].low_noise,
            "--dit_high_noise",
            r["models"].high_noise,
            "--dataset",
            r["cache"],
            "--output_dir",
            r["manifest"],
        ],
        "is a file; it expects a folder",
    ),
    (
        "--manifest is a folder",
        lambda r, t: ["cache", "--manifest", r["manifest"].parent, "--model_set", r["root"] / "models", "--out", t / "c"],
        "is a folder; pass the manifest file",
    ),
    (
        "--model_set is a file",
        lambda r, t: ["cache", "--manifest", r["manifest"], "--model_set", r["models"].low_noise, "--out", t / "c"],
        "is a file; a model set is a folder",
    ),
    ("a path under a file", lambda r, t: ["inspect", r["models"].low_noise / "x.safetensors"], "x.safetensors does not exist"),
]


@pytest.mark.parametrize("case, argv, message", FOLDER_OR_FILE, ids=[c[0] for c in FOLDER_OR_FILE])
def test_a_folder_for_a_file_and_the_reverse_are_named(stage2_run, tmp_path, capsys, case, argv, message):
    code, _, err = run_cli(capsys, argv(stage2_run, tmp_path))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
