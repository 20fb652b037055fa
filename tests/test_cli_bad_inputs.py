"""Bad inputs never end in a traceback (issue 22 part 7), and the command line follows the
ecosystem's habits (issue 21 part 6).

Every command runs for real (`moe.cli.main`, in this process) through a table of bad inputs:
a missing file, a folder for a file, an empty or foreign file, the wrong kind of safetensors
file, a named pipe (whose read would wait forever), a dangling link, a loop of links, a path
through a file, a device, a binary file where text belongs, bad sizes and numbers, unknown
names, an existing output, an output inside an input. Each is exit code 2 with no traceback,
and the message names the option and/or the file (the nouns are pinned, not the sentences)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import random_lora, run_cli

from moe.config.targets import TargetSpec
from moe.lora.file import write_lora_file


def _lora_moe_file(path: Path, preset) -> Path:
    from moe.config.instruments import INSTRUMENT_CLASSES
    from moe.lora_moe.file import write_lora_moe_file
    from moe.lora_moe.gates import TimestepGate
    from moe.lora_moe.model import inject_lora_moe
    from moe.lora_moe.router import Router, RouterConfig
    from moe.lora_moe.routing import RoutingState
    from moe.wan.checkpoint import build_random_transformer

    model = build_random_transformer(preset, seed=0)
    adapters = inject_lora_moe(model, TargetSpec().resolve(preset.dit.num_layers), 1.0, INSTRUMENT_CLASSES, RoutingState())
    return write_lora_moe_file(
        path,
        adapters,
        Router(RouterConfig.for_preset(preset)),
        TimestepGate(len(INSTRUMENT_CLASSES)),
        experts=INSTRUMENT_CLASSES,
        targets=TargetSpec(),
        task=preset.task,
        merged_dits={"high_noise": "a" * 64, "low_noise": "b" * 64},
    )


@pytest.fixture(scope="module")
def w(tmp_path_factory, tiny_state, tiny_preset):
    """Good inputs (a tiny model set, a LoRA, a LoRA-MoE, a 2-clip manifest) and bad ones."""
    from moe.tiny.model_set import write_tiny_model_set
    from moe.tiny.synth import synthesize_dataset

    root = tmp_path_factory.mktemp("bad_inputs")
    models = write_tiny_model_set(root / "models", "tiny-t2v", seed=0)
    lora = write_lora_file(root / "lora.safetensors", random_lora(tiny_state, TargetSpec().resolve(8)), TargetSpec(), "tiny-t2v")
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty_dir").mkdir()
    (bad / "one_lora").mkdir()
    shutil.copy(lora, bad / "one_lora" / "vanilla_lora.safetensors")
    (bad / "two_loras").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        shutil.copy(lora, bad / "two_loras" / name)
    (bad / "empty.safetensors").write_bytes(b"")
    (bad / "text.safetensors").write_text("hello\n")
    (bad / "bad.yaml").write_text("x: [\n")
    (bad / "binary.jsonl").write_bytes(lora.read_bytes()[:4096])
    (bad / "binary.yaml").write_bytes(b"\x80\x81\xfe\xff" * 64)
    (bad / "foreign.mp4").write_bytes(b"not ours")
    (bad / "foreign.safetensors").write_bytes(b"not ours")
    os.mkfifo(bad / "pipe")
    os.symlink(bad / "nowhere", bad / "dangling.safetensors")
    os.symlink(bad / "loop.safetensors", bad / "loop.safetensors")
    return {
        "root": root,
        "out": root / "out",
        "models": models,
        "model_set": root / "models",
        "dit": models.low_noise,
        "dit_high": models.high_noise,
        "lora": lora,
        "moe": _lora_moe_file(root / "moe.safetensors", tiny_preset),
        "manifest": synthesize_dataset(root / "data", clips=2, frames=5, size=(16, 16), seed=0, progress=False),
        "bad": bad,
        "missing": bad / "missing.safetensors",
        "under_file": lora / "x.safetensors",
    }


def cli(capsys, argv, timeout_s: int = 240):
    """`lora-moe ARGV` in this process: (code, stderr); no traceback (conftest.run_cli), and no
    hang: a read that blocks (a named pipe) fails the test instead of stopping the suite."""

    def hung(*_):
        raise TimeoutError(f"lora-moe {' '.join(map(str, argv))} did not return in {timeout_s} s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(timeout_s)
    try:
        code, _, err = run_cli(capsys, argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, err


def merge(w, lora=None, dit=None, out=None, *extra):
    return [
        "merge",
        "--dit",
        dit or w["dit"],
        "--lora_weight",
        lora or w["lora"],
        "--save_merged_model",
        out or w["out"] / "merged.safetensors",
        "--quiet",
        *extra,
    ]


def generate(w, *extra, save=None):
    return [
        "generate",
        "--dit",
        w["dit"],
        "--dit_high_noise",
        w["dit_high"],
        "--model_set",
        w["model_set"],
        "--prompt",
        "a hook",
        "--video_size",
        "16x16",
        "--video_length",
        "5",
        "--infer_steps",
        "1",
        "--save_path",
        save or w["out"] / "v.mp4",
        *extra,
    ]


def stage1(w, *extra):
    return [
        "stage1",
        "--dit",
        w["dit"],
        "--dit_high_noise",
        w["dit_high"],
        "--dataset",
        w["bad"] / "empty_dir",
        "--output_dir",
        w["out"] / "s1",
        *extra,
    ]


def ev(w, *extra):
    return [
        "eval",
        "--merged_dit",
        w["dit"],
        "--merged_dit_high_noise",
        w["dit_high"],
        "--lora_moe_weights",
        w["moe"],
        "--dataset",
        w["bad"] / "empty_dir",
        "--output_dir",
        w["out"] / "eval",
        *extra,
    ]


def export(w, src=None, *extra, out=None):
    return ["export-expert", "--lora_moe_weights", src or w["moe"], "--expert", "hook", "--out", out or w["out"] / "e.safetensors", *extra]


def cache(w, *extra):
    return [
        "cache",
        "--manifest",
        w["manifest"],
        "--model_set",
        w["model_set"],
        "--out",
        w["out"] / "cache",
        "--size",
        "16x16",
        "--frames",
        "5",
        "--quiet",
        *extra,
    ]


B = lambda w, name: w["bad"] / name  # noqa: E731

# (case, argv from the inputs, nouns the message must hold). Marked *: a traceback, a hang or a
# misleading message before this fixes.
CASES = [
    # a vanilla LoRA where every kind of bad file is given
    ("*merge --lora_weight missing", lambda w: merge(w, w["missing"]), ["--lora_weight", "missing.safetensors", "does not exist"]),
    ("merge --lora_weight folder of two", lambda w: merge(w, B(w, "two_loras")), ["two_loras", "2 .safetensors files"]),
    ("merge --lora_weight empty folder", lambda w: merge(w, B(w, "empty_dir")), ["empty_dir", "0 .safetensors files"]),
    ("merge --lora_weight empty file", lambda w: merge(w, B(w, "empty.safetensors")), ["empty.safetensors", "not a safetensors file"]),
    ("merge --lora_weight text file", lambda w: merge(w, B(w, "text.safetensors")), ["text.safetensors", "not a safetensors file"]),
    ("merge --lora_weight a LoRA-MoE", lambda w: merge(w, w["moe"]), ["moe.safetensors", "LoRA-MoE", "--lora_weight"]),
    ("merge --lora_weight a DiT", lambda w: merge(w, w["dit"]), ["low_noise_model.safetensors", "--lora_weight"]),
    ("merge --dit a LoRA", lambda w: merge(w, dit=w["lora"]), ["lora.safetensors", "vanilla LoRA", "--dit"]),
    ("*merge --lora_weight named pipe", lambda w: merge(w, B(w, "pipe")), ["--lora_weight", "pipe", "named pipe"]),
    ("*merge --dit named pipe", lambda w: merge(w, dit=B(w, "pipe")), ["--dit", "pipe", "named pipe"]),
    ("*merge --lora_weight dangling link", lambda w: merge(w, B(w, "dangling.safetensors")), ["--lora_weight", "dangling", "link"]),
    ("*merge --lora_weight link loop", lambda w: merge(w, B(w, "loop.safetensors")), ["--lora_weight", "loop.safetensors", "loop"]),
    ("*merge --lora_weight through a file", lambda w: merge(w, w["under_file"]), ["--lora_weight", "lora.safetensors", "is a file"]),
    ("*merge --lora_weight a device", lambda w: merge(w, "/dev/null"), ["--lora_weight", "/dev/null", "device"]),
    (
        "merge --save_merged_model exists",
        lambda w: merge(w, None, None, B(w, "foreign.safetensors")),
        ["--save_merged_model", "foreign.safetensors", "already exists"],
    ),
    ("merge --save_merged_model is the input", lambda w: merge(w, None, None, w["dit"]), ["--save_merged_model", "--dit"]),
    (
        "*merge --save_merged_model through a file",
        lambda w: merge(w, None, None, w["under_file"]),
        ["--save_merged_model", "lora.safetensors", "is a file"],
    ),
    ("merge --lora_multiplier nan", lambda w: merge(w, None, None, None, "--lora_multiplier", "nan"), ["--lora_multiplier"]),
    ("*merge --task foo", lambda w: merge(w, None, None, None, "--task", "foo"), ["--task", "foo"]),
    # convert-lora, export-expert, inspect: the same files through other options
    (
        "convert-lora IN a LoRA-MoE",
        lambda w: ["convert-lora", w["moe"], "--to", "musubi", "--out", w["out"] / "c.safetensors"],
        ["moe.safetensors", "LoRA-MoE"],
    ),
    (
        "*convert-lora IN named pipe",
        lambda w: ["convert-lora", B(w, "pipe"), "--to", "musubi", "--out", w["out"] / "c.safetensors"],
        ["IN", "pipe", "named pipe"],
    ),
    ("convert-lora --to foo", lambda w: ["convert-lora", w["lora"], "--to", "foo", "--out", w["out"] / "c.safetensors"], ["--to", "foo"]),
    ("convert-lora --out is IN", lambda w: ["convert-lora", w["lora"], "--to", "musubi", "--out", w["lora"]], ["--out", "IN"]),
    ("export-expert --lora_moe_weights a LoRA", lambda w: export(w, w["lora"]), ["lora.safetensors", "--lora_moe_weights"]),
    (
        "*export-expert --expert knife",
        lambda w: ["export-expert", "--lora_moe_weights", w["moe"], "--expert", "knife", "--out", w["out"] / "e.safetensors"],
        ["--expert", "knife"],
    ),
    ("*export-expert --save_format foo", lambda w: export(w, None, "--save_format", "foo"), ["--save_format", "foo"]),
    ("export-expert --out is the input", lambda w: export(w, out=w["moe"]), ["--out", "--lora_moe_weights"]),
    ("*inspect a named pipe", lambda w: ["inspect", B(w, "pipe")], ["pipe", "named pipe"]),
    ("inspect a text file", lambda w: ["inspect", B(w, "text.safetensors")], ["text.safetensors", "not a safetensors file"]),
    # generate (options generated from its config)
    ("*generate --lora_weight named pipe", lambda w: generate(w, "--lora_weight", B(w, "pipe")), ["--lora_weight", "named pipe"]),
    ("*generate --vae link loop", lambda w: generate(w, "--vae", B(w, "loop.safetensors")), ["--vae", "loop"]),
    ("generate --lora_moe_weights a LoRA", lambda w: generate(w, "--lora_moe_weights", w["lora"]), ["lora.safetensors", "--lora_moe_weights"]),
    (
        "*generate --instrument_hint knife",
        lambda w: generate(w, "--lora_moe_weights", w["moe"], "--instrument_hint", "knife"),
        ["--instrument_hint", "knife"],
    ),
    (
        "*generate --model NAME@ALIAS",
        lambda w: ["generate", "--model", "tiny@champion", "--prompt", "x", "--save_path", w["out"] / "v.mp4"],
        ["--model", "models:/tiny@champion"],
    ),
    (
        "generate --model NAME",
        lambda w: ["generate", "--model", "tiny", "--prompt", "x", "--save_path", w["out"] / "v.mp4"],
        ["--model", "models:/NAME@ALIAS"],
    ),
    (
        "generate --model_set a file",
        lambda w: generate(w, "--lora_weight", w["lora"])[:5] + ["--model_set", w["lora"], "--prompt", "x", "--save_path", w["out"] / "v.mp4"],
        ["lora.safetensors", "model set"],
    ),
    (
        "generate without --dit_high_noise",
        lambda w: [
            "generate",
            "--dit",
            w["dit"],
            "--lora_weight",
            w["lora"],
            "--model_set",
            w["model_set"],
            "--prompt",
            "x",
            "--save_path",
            w["out"] / "v.mp4",
        ],
        ["--dit_high_noise"],
    ),
    (
        "generate --save_path exists",
        lambda w: generate(w, "--lora_weight", w["lora"], save=B(w, "foreign.mp4")),
        ["--save_path", "foreign.mp4", "already exists"],
    ),
    ("generate --save_path .avi", lambda w: generate(w, "--lora_weight", w["lora"], save=w["out"] / "v.avi"), ["--save_path", ".mp4"]),
    (
        "generate --save_path in --model_set",
        lambda w: generate(w, "--lora_weight", w["lora"], save=w["model_set"] / "v.mp4"),
        ["--save_path", "--model_set"],
    ),
    ("generate --video_size abc", lambda w: generate(w, "--lora_weight", w["lora"], "--video_size", "abc"), ["--video_size", "abc"]),
    ("generate --video_size 0x0", lambda w: generate(w, "--lora_weight", w["lora"], "--video_size", "0x0"), ["--video_size"]),
    ("generate --video_size 33x32", lambda w: generate(w, "--lora_weight", w["lora"], "--video_size", "33x32"), ["--video_size", "33x32"]),
    ("generate --infer_steps 0", lambda w: generate(w, "--infer_steps", "0"), ["--infer_steps"]),
    ("generate --task foo", lambda w: generate(w, "--task", "foo"), ["--task", "foo"]),
    ("generate --dtype int8", lambda w: generate(w, "--dtype", "int8"), ["--dtype", "int8"]),
    ("*generate --config binary", lambda w: generate(w, "--config", B(w, "binary.yaml")), ["config file", "binary.yaml", "UTF-8"]),
    ("*generate --config bad YAML", lambda w: generate(w, "--config", B(w, "bad.yaml")), ["config file", "bad.yaml", "line"]),
    ("*generate --config named pipe", lambda w: generate(w, "--config", B(w, "pipe")), ["--config", "named pipe"]),
    # training and evaluation
    (
        "*stage1 --dataset missing",
        lambda w: stage1(w)[:5] + ["--dataset", w["missing"], "--output_dir", w["out"] / "s1"],
        ["--dataset", "missing.safetensors", "does not exist"],
    ),
    (
        "*stage1 --dataset named pipe",
        lambda w: stage1(w)[:5] + ["--dataset", B(w, "pipe"), "--output_dir", w["out"] / "s1"],
        ["--dataset", "named pipe"],
    ),
    (
        "*stage1 --output_dir through a file",
        lambda w: stage1(w)[:7] + ["--output_dir", w["under_file"] / "run"],
        ["--output_dir", "lora.safetensors", "is a file"],
    ),
    ("stage1 --network_dim 0", lambda w: stage1(w, "--network_dim", "0"), ["--network_dim"]),
    ("stage1 --network_dim -4", lambda w: stage1(w, "--network_dim", "-4"), ["--network_dim"]),
    ("stage1 --lr_scheduler foo", lambda w: stage1(w, "--lr_scheduler", "foo"), ["--lr_scheduler", "foo"]),
    ("stage1 --mixed_precision fp8", lambda w: stage1(w, "--mixed_precision", "fp8"), ["--mixed_precision", "fp8"]),
    ("stage1 --val_sigmas a,b", lambda w: stage1(w, "--val_sigmas", "a,b"), ["--val_sigmas"]),
    ("*stage1 --config missing", lambda w: stage1(w, "--config", w["missing"]), ["--config", "missing.safetensors"]),
    (
        "*stage2 --dit named pipe",
        lambda w: ["stage2", "--dit", B(w, "pipe"), "--dataset", w["bad"] / "empty_dir", "--output_dir", w["out"] / "s2"],
        ["--dit", "named pipe"],
    ),
    ("*eval --gate named pipe", lambda w: ev(w, "--gate", B(w, "pipe")), ["--gate", "named pipe"]),
    ("*eval --gate bad YAML", lambda w: ev(w, "--gate", B(w, "bad.yaml")), ["--gate", "bad.yaml", "line"]),
    ("eval --gate missing", lambda w: ev(w, "--gate", w["missing"]), ["--gate", "missing.safetensors"]),
    (
        "eval --lora_moe_weights a LoRA",
        lambda w: ev(w)[:5] + ["--lora_moe_weights", w["lora"], "--dataset", w["bad"] / "empty_dir", "--output_dir", w["out"] / "eval"],
        ["lora.safetensors"],
    ),
    (
        "*eval multiplier-sweep --lora_weight named pipe",
        lambda w: [
            "eval",
            "multiplier-sweep",
            "--dit",
            w["dit"],
            "--dit_high_noise",
            w["dit_high"],
            "--dataset",
            w["bad"] / "empty_dir",
            "--lora_weight",
            B(w, "pipe"),
        ],
        ["--lora_weight", "named pipe"],
    ),
    # data and the cache
    ("data synth --size 64", lambda w: ["data", "synth", "--out", w["out"] / "d", "--size", "64"], ["--size", "64"]),
    ("data synth --size 63x64", lambda w: ["data", "synth", "--out", w["out"] / "d", "--size", "63x64"], ["--size", "63x64"]),
    ("data synth --clips 0", lambda w: ["data", "synth", "--out", w["out"] / "d", "--clips", "0"], ["--clips"]),
    ("data synth --fps -1", lambda w: ["data", "synth", "--out", w["out"] / "d", "--fps", "-1"], ["--fps"]),
    ("data synth --out exists", lambda w: ["data", "synth", "--out", w["manifest"].parent], ["--out", "already exists"]),
    ("*data synth --out through a file", lambda w: ["data", "synth", "--out", w["lora"] / "d"], ["--out", "lora.safetensors", "is a file"]),
    ("*data synth --out named pipe", lambda w: ["data", "synth", "--out", B(w, "pipe")], ["--out", "named pipe"]),
    ("*data check --manifest missing", lambda w: ["data", "check", "--manifest", w["missing"]], ["--manifest", "does not exist"]),
    ("data check --manifest folder", lambda w: ["data", "check", "--manifest", B(w, "empty_dir")], ["manifest", "empty_dir", "folder"]),
    ("*data check --manifest binary", lambda w: ["data", "check", "--manifest", B(w, "binary.jsonl")], ["manifest", "binary.jsonl", "UTF-8"]),
    ("*data check --manifest named pipe", lambda w: ["data", "check", "--manifest", B(w, "pipe")], ["--manifest", "named pipe"]),
    ("data check --min_frames 0", lambda w: ["data", "check", "--manifest", w["manifest"], "--min_frames", "0"], ["--min_frames"]),
    ("*data cholec80 --root missing", lambda w: ["data", "cholec80", "--root", w["missing"], "--out", w["out"] / "ch"], ["--root", "does not exist"]),
    (
        "*data cholec80 --label_map binary",
        lambda w: ["data", "cholec80", "--root", B(w, "empty_dir"), "--out", w["out"] / "ch", "--label_map", B(w, "binary.yaml")],
        ["label map", "binary.yaml", "UTF-8"],
    ),
    ("cache --size abc", lambda w: cache(w, "--size", "abc"), ["--size", "abc"]),
    ("cache --dtype int8", lambda w: cache(w, "--dtype", "int8"), ["--dtype", "int8"]),
    ("*cache --task foo", lambda w: cache(w, "--task", "foo"), ["--task", "foo"]),
    (
        "cache --out contains --manifest",
        lambda w: ["cache", "--manifest", w["manifest"], "--model_set", w["model_set"], "--out", w["manifest"].parent],
        ["--out", "--manifest"],
    ),
    (
        "*cache --model_set missing",
        lambda w: ["cache", "--manifest", w["manifest"], "--model_set", w["missing"], "--out", w["out"] / "c"],
        ["--model_set", "does not exist"],
    ),
    (
        "*cache --vae a text file",
        lambda w: [
            "cache",
            "--manifest",
            w["manifest"],
            "--vae",
            B(w, "text.safetensors"),
            "--text_encoder",
            w["model_set"] / "text_encoder",
            "--tokenizer",
            w["model_set"] / "tokenizer",
            "--task",
            "tiny-t2v",
            "--size",
            "16x16",
            "--frames",
            "5",
            "--out",
            w["out"] / "c",
        ],
        ["text.safetensors"],
    ),
    ("*models tiny --task foo", lambda w: ["models", "tiny", "--out", w["out"] / "m", "--task", "foo"], ["--task", "foo"]),
    ("models tiny --out exists", lambda w: ["models", "tiny", "--out", w["model_set"]], ["--out", "already exists"]),
    ("workflow run --preset huge", lambda w: ["workflow", "run", "--output_dir", w["out"] / "wf", "--preset", "huge"], ["--preset", "huge"]),
    ("workflow run --until never", lambda w: ["workflow", "run", "--output_dir", w["out"] / "wf", "--until", "never"], ["--until", "never"]),
    ("workflow run --output_dir a file", lambda w: ["workflow", "run", "--output_dir", w["lora"]], ["--output_dir", "lora.safetensors"]),
]


@pytest.mark.parametrize("case, argv, nouns", CASES, ids=[c[0].lstrip("*") for c in CASES])
def test_a_bad_input_is_one_line_naming_it(w, capsys, case, argv, nouns):
    code, err = cli(capsys, argv(w))
    assert code == 2, err
    assert "Traceback" not in err and "Exception" not in err
    message = err.strip().splitlines()[-1]
    assert message.startswith(("error: ", "Error: ")), err
    if message.startswith("error: "):  # ours: exactly one line, nothing printed before it
        assert err.count("\n") == 1, err
    for noun in nouns:
        assert noun in message, message
    assert not (w["out"].exists() and list(w["out"].iterdir())), "a bad input wrote something"


def test_a_folder_holding_one_lora_is_read_as_that_lora(w, capsys, tmp_path):
    """A folder holding exactly one .safetensors file stands for that file (as for a DiT): it used
    to be classified through the folder and then opened as a file (`OSError: No such device`)."""
    folder = w["bad"] / "one_lora"
    code, err = cli(capsys, merge(w, folder, None, tmp_path / "merged.safetensors"))
    assert code == 0 and (tmp_path / "merged.safetensors").is_file(), err
    code, out, err = run_cli(capsys, ["inspect", folder])
    assert code == 0 and "a vanilla LoRA" in out, err
    code, err = cli(capsys, ["convert-lora", folder, "--to", "musubi", "--out", tmp_path / "c.safetensors"])
    assert code == 2 and err.count("\n") == 1 and "one_lora is a folder" in err, err  # convert-lora wants the file itself


def test_an_existing_save_path_is_refused_before_the_model_is_fetched(w, capsys, monkeypatch):
    """`generate --model` could fetch ~57 GB before it looked at --save_path: now the output is
    checked first (the registry is not even asked: here there is none)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code, err = cli(capsys, ["generate", "--model", "models:/tiny@champion", "--prompt", "x", "--save_path", w["bad"] / "foreign.mp4"])
    assert code == 2 and err.count("\n") == 1, err
    assert "--save_path" in err and "foreign.mp4" in err and "already exists" in err and "MLFLOW" not in err


def _without_root_powers() -> list[str] | None:
    """A command prefix that runs as this user without the capabilities that let root read any
    file (`setpriv`), so that permissions apply; None when there is no such tool."""
    if shutil.which("setpriv") is None:
        return None
    return ["setpriv", "--inh-caps", "-all", "--bounding-set", "-dac_override,-dac_read_search", "--"]


UNREADABLE = [
    ("merge --lora_weight", lambda w, f, d: merge(w, f), "--lora_weight"),
    ("data check --manifest", lambda w, f, d: ["data", "check", "--manifest", f], "--manifest"),
    ("stage1 --dataset (a folder)", lambda w, f, d: stage1(w)[:5] + ["--dataset", d, "--output_dir", w["out"] / "s1"], "--dataset"),
]


@pytest.mark.parametrize("case, argv, flag", UNREADABLE, ids=[c[0] for c in UNREADABLE])
def test_an_unreadable_file_or_folder_is_named(w, tmp_path, case, argv, flag):
    prefix = _without_root_powers()
    if prefix is None:
        pytest.skip("no setpriv to drop root's read-anything capability")
    locked_file, locked_dir = tmp_path / "locked.safetensors", tmp_path / "locked_dir"
    shutil.copy(w["lora"], locked_file)
    locked_dir.mkdir()
    locked_file.chmod(0)
    locked_dir.chmod(0)
    try:
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "moe", *map(str, argv(w, locked_file, locked_dir))],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
            timeout=300,
        )
    finally:
        locked_dir.chmod(0o755)
    if os.geteuid() == 0 and "Operation not permitted" in done.stderr and "setpriv" in done.stderr:
        pytest.skip("this container does not let setpriv drop capabilities")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    message = done.stderr.strip().splitlines()[-1]
    assert flag in message and ("permission denied" in message or "is not readable" in message), done.stderr
    assert done.stderr.count("\n") == 1 or message.startswith("Error: Invalid value for"), done.stderr  # ours, or click's


# --- the command line's habits (issue 21 part 6) ---------------------------------------------


def test_options_take_snake_and_kebab_case_and_out_means_output_dir(capsys, tmp_path):
    """--snake_case (musubi-tuner's) and --kebab-case (click's) are the same option everywhere, and
    --out / --output_dir name the same output; a typo's suggestion stays the spelling --help shows."""
    for argv, message in [
        (["merge", "--dit", "a", "--lora-weight", "b", "--save-merged-model", "c", "--lora-multiplier", "nan"], "--lora_multiplier"),
        (["data", "synth", "--output-dir", tmp_path / "d", "--val-fraction", "2"], "--val_fraction"),
        (["data", "synth", "--output_dir", tmp_path / "d", "--val_fraction", "2"], "--val_fraction"),
        (["stage1", "--out", tmp_path / "s", "--network-dim", "0"], "--network_dim"),
        (["stage2", "--lora-dim", "0"], "--network_dim"),  # a config alias (of --network_dim), in kebab case
        (["generate", "--save-path", tmp_path / "v.avi", "--prompt", "x", "--no-overwrite"], "--dit"),
    ]:
        code, err = cli(capsys, argv)
        assert code == 2 and message in err and "No such option" not in err, (argv, err)
    code, err = cli(capsys, ["merge", "--lora-multiplyer", "1"])
    assert code == 2 and "(Possible options: --lora_multiplier)" in err, err
    code, err = cli(capsys, ["export_expert", "--help"])  # a command name with underscores
    assert code == 0


def test_help_shows_one_spelling(capsys):
    code, out, _ = run_cli(capsys, ["data", "cholec80", "--help"])
    assert code == 0 and "--val_fraction" in out and "--val-fraction" not in out and "--frames_per_clip" in out
    code, out, _ = run_cli(capsys, ["cache", "--help"])
    assert code == 0 and "--model_set" in out and "--model-set" not in out


def test_version(capsys):
    from moe import __version__

    code, out, err = run_cli(capsys, ["--version"])
    assert code == 0 and out.strip() == f"lora-moe (wan-lora-moe) {__version__}" and err == ""


def test_commands_are_listed_in_workflow_order(capsys):
    code, out, _ = run_cli(capsys, ["--help"])
    listed = [line.split()[0] for line in out.split("Commands:")[1].splitlines() if line.startswith("  ")]
    order = [
        "workflow",
        "models",
        "data",
        "cache",
        "stage1",
        "merge",
        "stage2",
        "eval",
        "generate",
        "registry",
        "export-expert",
        "convert-lora",
        "inspect",
    ]
    assert [name for name in listed if name in order] == [name for name in order if name in listed], listed
    assert listed.index("stage1") < listed.index("merge") < listed.index("stage2") < listed.index("eval")


def test_defaults_are_shown_as_written(capsys):
    code, out, _ = run_cli(capsys, ["generate", "--help"])
    text = " ".join(out.split())
    assert code == 0 and "[default: 64x64]" in text and "(64, 64)" not in text
    assert "[default: None]" not in text and "[default: --no_overwrite]" in text and "[default: False]" not in text
    code, out, _ = run_cli(capsys, ["stage1", "--help"])
    text = " ".join(out.split())
    assert "[default: 0.1,0.25,0.5,0.75,0.9,0.95]" in text and "[default: --progress]" in text
    code, out, _ = run_cli(capsys, ["eval", "--help"])
    text = " ".join(out.split())
    assert "Promotion thresholds: a YAML/TOML file. --" in text  # --gate has a default: not [required]


def test_flows_run_help_lists_the_set_names():
    from flows.__main__ import set_names
    from flows.params import Stage1Settings

    names = "\n".join(set_names())
    assert names.splitlines()[0].startswith("preset, artifact_root")
    assert "stage1.{" in names and "max_train_epochs" in names and "resources.{prepare_data, stage1, merge, stage2, eval}.{gpus" in names
    assert all(field in names for field in Stage1Settings.model_fields)


def test_generate_model_says_which_version_and_where_its_cache_is(w, capsys, monkeypatch, tmp_path):
    """`generate --model` names the registered version it resolved, its download cache and how
    much that grew (a resolver stands in for the registry: moe finds it by the URI's scheme)."""
    import moe.model_uri

    cache = tmp_path / "downloads"
    (cache / "sha256").mkdir(parents=True)
    (cache / "sha256" / "old").write_bytes(b"x" * 1000)

    def resolve(uri):
        (cache / "sha256" / "new").write_bytes(b"y" * 2_500_000)  # what this fetch brought
        ms = w["models"]
        return {
            "task": "tiny-t2v",
            "dit": ms.low_noise,
            "dit_high_noise": ms.high_noise,
            "lora_moe_weights": w["moe"],
            "vae": ms.vae,
            "text_encoder": ms.text_encoder,
            "tokenizer": ms.tokenizer,
            "source": "tiny-moe v7",
            "download_cache": cache,
            "cache_bytes_before": 1000,
            "cache_bytes": 2_501_000,
        }

    class EntryPoint:
        name, value = "fake", "tests:resolve"

        def load(self):
            return resolve

    monkeypatch.setattr(moe.model_uri, "entry_points", lambda group, name=None: [EntryPoint()])
    save = tmp_path / "v.mp4"
    code, out, err = run_cli(
        capsys,
        [
            "generate",
            "--model",
            "fake:/tiny-moe@champion",
            "--prompt",
            "a hook",
            "--instrument_hint",
            "hook",
            "--video_size",
            "16x16",
            "--video_length",
            "5",
            "--infer_steps",
            "1",
            "--save_path",
            save,
        ],
    )
    assert code == 0, err
    assert out.startswith(f"wrote {save}")
    assert (
        f"--model fake:/tiny-moe@champion: tiny-moe v7 (task tiny-t2v); download cache {cache}: 2.501 MB (+2.5 MB fetched now)"
    ) in err.splitlines()


def test_every_path_option_goes_through_the_shared_check():
    """A path option added later is checked too: it must be in moe.cli.options' table, and the
    command that takes one is generated from its config (`config_command` checks every path)."""
    import inspect
    import types
    import typing

    from moe.cli import _register_commands
    from moe.cli.app import app
    from moe.cli.options import PATH_OPTIONS

    def path_params(fn) -> list[str]:
        found = []
        for name, p in inspect.signature(fn, eval_str=True).parameters.items():
            ann = typing.get_args(p.annotation)[0] if typing.get_origin(p.annotation) is typing.Annotated else p.annotation
            args = typing.get_args(ann) if typing.get_origin(ann) in (typing.Union, types.UnionType) else (ann,)
            found += [name] if Path in args else []
        return found

    _register_commands()
    unchecked, seen = [], 0

    def walk(typer_app, path):
        nonlocal seen
        commands = [(c.name, c.callback, c.cls) for c in typer_app.registered_commands]
        for group in typer_app.registered_groups:
            callback = group.typer_instance.registered_callback
            if callback is not None and callback.callback is not None:
                commands.append((group.name, callback.callback, None))
            walk(group.typer_instance, f"{path} {group.name}")
        for name, callback, cls in commands:
            params = path_params(callback)
            seen += len(params)
            generated = callback.__module__ == "moe.cli.config_command"
            unchecked.extend(f"{path} {name} --{p}" for p in params if p not in PATH_OPTIONS or not generated)

    walk(app, "lora-moe")
    assert seen > 40 and unchecked == []
