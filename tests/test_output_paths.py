"""Overwriting and data loss (issue 12, class 2): every command that writes refuses an output
that is one of its inputs (after resolving links and folders) and an existing output unless
--overwrite, and even then replaces only what it wrote itself."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import run_cli

from moe.errors import MoeError
from moe.files.hashing import sha256_tree
from moe.files.output_paths import check_not_an_input


@pytest.fixture(scope="module")
def ws(stage2_run):
    r = stage2_run
    return {
        "dit": r["models"].low_noise,
        "dit_high": r["models"].high_noise,
        "models": r["root"] / "models",
        "lora": r["vanilla_lora"],
        "moe": r["lora_moe"],
        "merged_low": r["merged_low"],
        "merged_high": r["merged_high"],
        "cache": r["cache"],
        "manifest": r["manifest"],
        "data": r["manifest"].parent,
        "stage1": r["root"] / "stage1",
    }


def _merge(ws, out, *extra):
    return ["merge", "--quiet", "--dit", ws["dit"], "--lora_weight", ws["lora"], "--save_merged_model", out, *extra]


def _export(ws, out, *extra, source=None):
    return ["export-expert", "--lora_moe_weights", source or ws["moe"], "--expert", "hook", "--out", out, *extra]


def _generate(ws, out, *extra):
    return [
        "generate",
        "--dit",
        ws["dit"],
        "--dit_high_noise",
        ws["dit_high"],
        "--model_set",
        ws["models"],
        "--prompt",
        "a hook",
        "--infer_steps",
        "1",
        "--video_size",
        "32x32",
        "--video_length",
        "5",
        "--save_path",
        out,
        *extra,
    ]


def _stage1(ws, out, *extra, dataset=None):
    return [
        "stage1",
        "--dit",
        ws["dit"],
        "--dit_high_noise",
        ws["dit_high"],
        "--dataset",
        dataset or ws["cache"],
        "--output_dir",
        out,
        "--max_train_epochs",
        "1",
        "--no_progress",
        *extra,
    ]


def _stage2(ws, out, *extra):
    return [
        "stage2",
        "--dit",
        ws["merged_low"],
        "--dit_high_noise",
        ws["merged_high"],
        "--dataset",
        ws["cache"],
        "--network_dim",
        "8",
        "--output_dir",
        out,
        "--max_train_epochs",
        "1",
        "--no_progress",
        *extra,
    ]


def _cache(ws, out, *extra, frames=17):
    return [
        "cache",
        "--quiet",
        "--manifest",
        ws["manifest"],
        "--model_set",
        ws["models"],
        "--size",
        "64x64",
        "--frames",
        frames,
        "--out",
        out,
        *extra,
    ]


def _output_of(argv) -> Path:
    return Path(next(a for flag, a in zip(argv, argv[1:]) if flag in ("--save_merged_model", "--out", "--save_path", "--output_dir")))


def _link(tmp: Path, target: Path, name: str) -> Path:
    (tmp / name).symlink_to(target)
    return tmp / name


# (case id, argv from (ws, tmp_path), what the one line says)
OUTPUT_IS_AN_INPUT = [
    ("merge: out == --dit", lambda ws, t: _merge(ws, ws["dit"]), "is the input --dit"),
    ("merge: out links to --lora_weight", lambda ws, t: _merge(ws, _link(t, ws["lora"], "m.safetensors")), "is the input --lora_weight"),
    ("export: out == input", lambda ws, t: _export(ws, ws["moe"]), "is the input --lora_moe_weights"),
    ("generate: save_path links to --dit", lambda ws, t: _generate(ws, _link(t, ws["dit"], "v.mp4")), "is the input --dit"),
    ("stage1: output_dir == --dataset", lambda ws, t: _stage1(ws, ws["cache"]), "is the input --dataset"),
    ("stage1: output_dir holds --dit", lambda ws, t: _stage1(ws, ws["models"]), "contains the input --dit"),
    ("stage2: output_dir inside --dataset", lambda ws, t: _stage2(ws, ws["cache"] / "run"), "is inside the input --dataset"),
    ("cache: out == --model_set", lambda ws, t: _cache(ws, ws["models"]), "is the input --model_set"),
    ("cache: out links to the model set", lambda ws, t: _cache(ws, _link(t, ws["models"], "c")), "is the input --model_set"),
]


@pytest.mark.parametrize("case, argv, message", OUTPUT_IS_AN_INPUT, ids=[c[0] for c in OUTPUT_IS_AN_INPUT])
def test_an_output_that_is_an_input_is_refused(ws, tmp_path, capsys, case, argv, message):
    before = {k: sha256_tree(v) for k, v in ws.items()}
    code, _, err = run_cli(capsys, argv(ws, tmp_path))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and "inputs are never modified" in err, err
    assert {k: sha256_tree(v) for k, v in ws.items()} == before
    assert not (ws["cache"] / "run").exists()


def _foreign_folder(tmp: Path) -> Path:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("a user's own file")
    return tmp / "mine"


def _foreign_mp4(tmp: Path) -> Path:
    (tmp / "holiday.mp4").write_bytes(b"not written by lora-moe")
    return tmp / "holiday.mp4"


NEVER_REPLACED = "already exists and is not a {what} this command writes; it is never replaced"
NEEDS_OVERWRITE = "already exists; pass"
# (case, argv, message): an output that exists. One lora-moe did not write is refused even with
# --overwrite; one it wrote is refused without it.
EXISTING = [
    ("merge: a base DiT", lambda ws, t: _merge(ws, shutil.copy(ws["dit_high"], t / "x.safetensors"), "--overwrite"), NEVER_REPLACED),
    ("export: a merged DiT", lambda ws, t: _export(ws, shutil.copy(ws["merged_low"], t / "x.safetensors"), "--overwrite"), NEVER_REPLACED),
    ("generate: someone's MP4", lambda ws, t: _generate(ws, _foreign_mp4(t), "--overwrite"), NEVER_REPLACED),
    ("stage1: a user folder", lambda ws, t: _stage1(ws, _foreign_folder(t), "--overwrite"), NEVER_REPLACED),
    ("stage2: a stage-1 run", lambda ws, t: _stage2(ws, shutil.copytree(ws["stage1"], t / "s1"), "--overwrite"), NEVER_REPLACED),
    ("models tiny: a user folder", lambda ws, t: ["models", "tiny", "--out", _foreign_folder(t), "--overwrite"], NEVER_REPLACED),
    (
        "data synth: a model set",
        lambda ws, t: ["data", "synth", "--clips", "1", "--out", shutil.copytree(ws["models"], t / "m"), "--overwrite"],
        NEVER_REPLACED,
    ),
    ("cache: a user folder", lambda ws, t: _cache(ws, _foreign_folder(t), "--overwrite"), NEVER_REPLACED),
    ("workflow: a user folder", lambda ws, t: ["workflow", "run", "--quiet", "--output_dir", _foreign_folder(t), "--overwrite"], NEVER_REPLACED),
    ("merge: ours", lambda ws, t: _merge(ws, shutil.copy(ws["merged_low"], t / "m.safetensors")), NEEDS_OVERWRITE),
    ("export: ours", lambda ws, t: _export(ws, shutil.copy(ws["lora"], t / "e.safetensors")), NEEDS_OVERWRITE),
    ("generate: ours", lambda ws, t: _generate(ws, shutil.copy(next((ws["data"] / "videos").glob("*.mp4")), t / "v.mp4")), NEEDS_OVERWRITE),
    ("stage1: ours", lambda ws, t: _stage1(ws, shutil.copytree(ws["stage1"], t / "s1")), NEEDS_OVERWRITE),
    ("models tiny: ours", lambda ws, t: ["models", "tiny", "--out", shutil.copytree(ws["models"], t / "m")], NEEDS_OVERWRITE),
    ("data synth: ours", lambda ws, t: ["data", "synth", "--clips", "1", "--out", shutil.copytree(ws["data"], t / "d")], NEEDS_OVERWRITE),
    ("workflow: ours", lambda ws, t: ["workflow", "run", "--quiet", "--output_dir", _workflow_dir(ws, t)], NEEDS_OVERWRITE),
]


def _workflow_dir(ws, tmp: Path) -> Path:
    shutil.copytree(ws["models"], tmp / "w" / "models")
    return tmp / "w"


@pytest.mark.parametrize("case, argv, message", EXISTING, ids=[c[0] for c in EXISTING])
def test_an_existing_output_is_kept(ws, tmp_path, capsys, case, argv, message):
    argv = argv(ws, tmp_path)
    out = _output_of(argv)
    before = sha256_tree(out)
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and err.count("\n") == 1, err
    assert f"{out} " + message.format(what="folder" if out.is_dir() else "file") in err, err
    assert message == NEVER_REPLACED or "--overwrite to replace it" in err, err
    assert sha256_tree(out) == before


def test_a_cache_is_updated_in_place_but_rebuilt_only_with_overwrite(ws, tmp_path, capsys):
    out = shutil.copytree(ws["cache"], tmp_path / "cache")
    code, _, err = run_cli(capsys, _cache(ws, out))  # same settings: every clip skipped
    assert code == 0, err
    before = sha256_tree(out)
    code, _, err = run_cli(capsys, _cache(ws, out, frames=9))
    assert code == 2 and "holds a cache built with other settings (frames differ)" in err and "--overwrite" in err, err
    assert sha256_tree(out) == before


def test_overwrite_replaces_only_what_the_command_wrote(ws, tmp_path, capsys):
    """A previous stage-1 run with a stale later state and a user's note: --overwrite removes the
    run's own files (so a later --resume cannot pick up the stale state) and keeps the note."""
    out = shutil.copytree(ws["stage1"], tmp_path / "s1")
    shutil.copytree(out / "state-epoch-3", out / "state-epoch-9")
    (out / "notes.txt").write_text("keep me")
    code, _, err = run_cli(capsys, _stage1(ws, out, "--overwrite"))
    assert code == 0, err
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.glob("state-epoch-*")) == ["state-epoch-1"]
    assert json.loads((out / "stage1_config.json").read_text())["max_train_epochs"] == 1


@pytest.mark.parametrize("command", ["merge", "export", "generate", "data synth"])
def test_overwrite_replaces_our_own_file(ws, tmp_path, capsys, command):
    argv = {
        "merge": lambda: _merge(ws, shutil.copy(ws["merged_low"], tmp_path / "m.safetensors"), "--overwrite", "--lora_multiplier", "0.5"),
        "export": lambda: _export(ws, shutil.copy(ws["lora"], tmp_path / "e.safetensors"), "--overwrite"),
        "generate": lambda: _generate(ws, shutil.copy(next((ws["data"] / "videos").glob("*.mp4")), tmp_path / "v.mp4"), "--overwrite"),
        "data synth": lambda: [
            "data",
            "synth",
            "--clips",
            "1",
            "--frames",
            "5",
            "--size",
            "32x32",
            "--out",
            _synth_with_note(tmp_path),
            "--overwrite",
        ],
    }[command]()
    out = _output_of(argv)
    before = sha256_tree(out)
    code, _, err = run_cli(capsys, argv)
    assert code == 0, err
    assert sha256_tree(out) != before
    assert not list(out.parent.glob(".*.tmp-*")) and not list(out.parent.glob(".*.lock"))
    if command == "data synth":
        assert (out / "notes.txt").read_text() == "keep me"


def _synth_with_note(tmp: Path) -> Path:
    from moe.tiny.synth import synthesize_dataset

    synthesize_dataset(tmp / "d", clips=2, frames=5, size=(32, 32), seed=3)
    (tmp / "d" / "notes.txt").write_text("keep me")
    return tmp / "d"


def test_input_relations_after_resolving_links(tmp_path):
    """The path rules themselves: the same file, a link to it, a folder holding it, a path inside
    an input folder are refused; a sibling is fine."""
    (tmp_path / "ckpt").mkdir()
    dit = tmp_path / "ckpt" / "dit.safetensors"
    dit.write_bytes(b"x")
    (tmp_path / "alias").symlink_to(tmp_path / "ckpt")
    refused = [
        (dit, {"--dit": dit}, "is the input --dit"),
        (tmp_path / "alias" / "dit.safetensors", {"--dit": dit}, "is the input --dit"),
        (tmp_path / "ckpt", {"--dit": dit}, "contains the input --dit"),
        (tmp_path, {"--dit": [None, dit]}, "contains the input --dit"),
        (tmp_path / "alias" / "out.safetensors", {"--dit": tmp_path / "ckpt"}, "is inside the input --dit"),
    ]
    for out, inputs, message in refused:
        with pytest.raises(MoeError, match=message):
            check_not_an_input(out, "--out", inputs)
    check_not_an_input(tmp_path / "ckpt" / "merged.safetensors", "--out", {"--dit": dit})  # beside a file input
    check_not_an_input(tmp_path / "other", "--out", {"--dit": dit, "--lora": None})
