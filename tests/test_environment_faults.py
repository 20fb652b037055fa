"""Environment faults (issue 12, class 5): a read-only output folder, a full disk in the middle
of a write, a device or dtype this machine does not have, an unknown task: one line, exit
code 2, and no temporary file (or lock) left behind."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from moe.config.presets import PRESETS


def _cli(capsys, argv):
    """(exit code, the `error:` line); progress bars may share stderr."""
    code, _, err = run_cli(capsys, argv)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) <= 1, err
    return code, (errors[0] + "\n" if errors else err)


def _writable(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.write_text("x")
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.fixture
def readonly(tmp_path):
    """A real read-only folder: mode 555, and for root (whom modes do not stop) the immutable
    attribute as well; skipped where neither works."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = False
    if _writable(folder) and shutil.which("chattr"):
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
    if _writable(folder):
        folder.chmod(0o755)
        pytest.skip("cannot make a read-only folder here (root without chattr)")
    yield folder
    if immutable:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    folder.chmod(0o755)


@pytest.fixture(scope="module")
def ws(stage2_run):
    r = stage2_run
    return r | {"model_dir": r["root"] / "models", "low": r["models"].low_noise, "high": r["models"].high_noise}


def _gen(ws, *extra):
    return [
        "generate",
        "--dit",
        ws["low"],
        "--dit_high_noise",
        ws["high"],
        "--model_set",
        ws["model_dir"],
        "--prompt",
        "x",
        "--infer_steps",
        "1",
        "--video_size",
        "32x32",
        "--video_length",
        "5",
        *extra,
    ]


# (command, argv writing into folder `d`)
WRITERS = [
    ("merge", lambda ws, d: ["merge", "--dit", ws["low"], "--lora_weight", ws["vanilla_lora"], "--save_merged_model", d / "m.safetensors"]),
    ("export-expert", lambda ws, d: ["export-expert", "--lora_moe_weights", ws["lora_moe"], "--expert", "hook", "--out", d / "e.safetensors"]),
    ("generate", lambda ws, d: _gen(ws, "--save_path", d / "v.mp4")),
    ("models tiny", lambda ws, d: ["models", "tiny", "--out", d / "m"]),
    ("data synth", lambda ws, d: ["data", "synth", "--clips", "1", "--out", d / "data"]),
    (
        "cache",
        lambda ws, d: ["cache", "--manifest", ws["manifest"], "--model_set", ws["model_dir"], "--size", "64x64", "--frames", "17", "--out", d / "c"],
    ),
    ("stage1", lambda ws, d: ["stage1", "--dit", ws["low"], "--dit_high_noise", ws["high"], "--dataset", ws["cache"], "--output_dir", d / "s1"]),
    ("workflow", lambda ws, d: ["workflow", "run", "--quiet", "--output_dir", d / "w"]),
]


@pytest.mark.parametrize("command, argv", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_read_only_output_folder_is_one_line(ws, readonly, capsys, command, argv):
    code, err = _cli(capsys, argv(ws, readonly))
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: cannot write "), err
    assert ("Permission denied" in err or "Operation not permitted" in err) and "choose another path" in err, err
    assert list(readonly.iterdir()) == []


def _enospc_after(first_calls: int, real):
    """`real`, raising ENOSPC from its (first_calls + 1)-th call on: the disk fills up mid-write."""
    calls = {"n": 0}

    def write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > first_calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    return write


def _partial_then_enospc(real_writer_path_arg: int):
    """A writer that leaves half a file at its path argument, then fails with ENOSPC."""

    def write(*args, **kwargs):
        Path(args[real_writer_path_arg]).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return write


# (case, what to patch: (module, attribute, replacement from the original), argv writing into d)
DISK_FULL = [
    (
        "merge, in its write loop",
        ("moe.merge", "_StreamCopier.write", lambda real: _enospc_after(1, real)),
        lambda ws, d: ["merge", "--dit", ws["low"], "--lora_weight", ws["vanilla_lora"], "--save_merged_model", d / "m.safetensors"],
    ),
    (
        "export-expert, saving the LoRA",
        ("moe.lora.file", "save_file", lambda real: _partial_then_enospc(1)),
        lambda ws, d: ["export-expert", "--lora_moe_weights", ws["lora_moe"], "--expert", "hook", "--out", d / "e.safetensors"],
    ),
    (
        "data synth, encoding a clip",
        ("moe.data.video", "_encode", lambda real: _partial_then_enospc(0)),
        lambda ws, d: ["data", "synth", "--clips", "2", "--out", d / "data"],
    ),
    (
        "cache, saving a clip",
        ("moe.data.cache", "save_file", lambda real: _partial_then_enospc(1)),
        lambda ws, d: ["cache", "--manifest", ws["manifest"], "--model_set", ws["model_dir"], "--size", "64x64", "--frames", "17", "--out", d / "c"],
    ),
]


@pytest.mark.parametrize("case, patch, argv", DISK_FULL, ids=[c[0] for c in DISK_FULL])
def test_a_full_disk_mid_write_leaves_no_temporary(ws, tmp_path, capsys, monkeypatch, case, patch, argv):
    import importlib

    module_name, attribute, make = patch
    module = importlib.import_module(module_name)
    owner, _, name = attribute.rpartition(".")
    target = getattr(module, owner) if owner else module
    monkeypatch.setattr(target, name, make(getattr(target, name)))
    code, err = _cli(capsys, argv(ws, tmp_path))
    assert code == 2 and err.count("\n") == 1, err
    assert "No space left on device; free space on that disk or choose another path" in err, err
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp-" in p.name or p.name.endswith(".lock")]
    assert leftovers == []
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "e.safetensors").exists()


# (case, argv, message)
DEVICES_AND_TASKS = [
    ("generate --device foo", lambda ws, t: _gen(ws, "--device", "foo", "--save_path", t / "v.mp4"), "--device 'foo' is not a torch device"),
    (
        "cache --device foo",
        lambda ws, t: ["cache", "--manifest", ws["manifest"], "--model_set", ws["model_dir"], "--device", "foo", "--out", t / "c"],
        "--device 'foo' is not a torch device",
    ),
    (
        "cache --dtype foo",
        lambda ws, t: ["cache", "--manifest", ws["manifest"], "--model_set", ws["model_dir"], "--dtype", "foo", "--out", t / "c"],
        "error: --dtype must be one of float32, bf16, fp16, got 'foo'",
    ),
    (
        "cache --embed_dtype fp16",
        lambda ws, t: ["cache", "--manifest", ws["manifest"], "--model_set", ws["model_dir"], "--embed_dtype", "fp16", "--out", t / "c"],
        "--embed_dtype must be one of float32, bf16",
    ),
    ("generate --dtype foo", lambda ws, t: _gen(ws, "--dtype", "foo", "--save_path", t / "v.mp4"), "Invalid value for '--dtype'"),
]
UNKNOWN_TASK = f"unknown task 'foo'; choose one of: {', '.join(PRESETS)}"
for _name, _argv in [
    ("merge", lambda ws, t: ["merge", "--dit", ws["low"], "--lora_weight", ws["vanilla_lora"], "--save_merged_model", t / "m.safetensors"]),
    ("stage1", lambda ws, t: ["stage1", "--dit", ws["low"], "--dataset", ws["cache"], "--output_dir", t / "s"]),
    ("stage2", lambda ws, t: ["stage2", "--dit", ws["merged_low"], "--dataset", ws["cache"], "--output_dir", t / "s"]),
    ("generate", lambda ws, t: _gen(ws, "--save_path", t / "v.mp4")),
    ("models tiny", lambda ws, t: ["models", "tiny", "--out", t / "m"]),
    (
        "cache",
        lambda ws, t: [
            "cache",
            "--manifest",
            ws["manifest"],
            "--vae",
            ws["model_dir"] / "vae",
            "--text_encoder",
            ws["model_dir"] / "text_encoder",
            "--tokenizer",
            ws["model_dir"] / "tokenizer",
            "--out",
            t / "c",
        ],
    ),
]:
    DEVICES_AND_TASKS.append((f"{_name} --task foo", lambda ws, t, a=_argv: a(ws, t) + ["--task", "foo"], UNKNOWN_TASK))


@pytest.mark.parametrize("case, argv, message", DEVICES_AND_TASKS, ids=[c[0] for c in DEVICES_AND_TASKS])
def test_devices_dtypes_and_tasks_this_machine_lacks(ws, tmp_path, capsys, case, argv, message):
    code, err = _cli(capsys, argv(ws, tmp_path))
    assert code == 2 and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("command", ["generate", "cache"])
def test_cuda_without_cuda(ws, tmp_path, capsys, command):
    argv = (
        _gen(ws, "--save_path", tmp_path / "v.mp4")
        if command == "generate"
        else ["cache", "--manifest", ws["manifest"], "--model_set", ws["model_dir"], "--out", tmp_path / "c"]
    )
    code, err = _cli(capsys, argv + ["--device", "cuda"])
    assert code == 2 and err.count("\n") == 1, err
    assert "error: --device cuda was asked for, but torch sees" in err and "use --device cpu" in err
    assert list(tmp_path.iterdir()) == []
