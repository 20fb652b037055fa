"""Usage errors (issue 12, class 1): `--help` exits 0 for every command, usage errors are click's
own message with exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import typer
from conftest import run_cli

from moe.cli import _register_commands
from moe.cli.app import app


def _commands() -> list[list[str]]:
    """Every registered command path (`merge`, `data synth` ...), found from the app itself so
    that a command added later is covered without editing this test."""
    _register_commands()
    found = []

    def walk(command, path):
        subcommands = getattr(command, "commands", None)
        if subcommands:
            for name, sub in subcommands.items():
                walk(sub, [*path, name])
        else:
            found.append(path)

    walk(typer.main.get_command(app), [])
    return found


def test_the_command_list_is_complete():
    names = {" ".join(c) for c in _commands()}
    assert {
        "stage1",
        "stage2",
        "generate",
        "merge",
        "cache",
        "inspect",
        "export-expert",
        "models tiny",
        "data synth",
        "data cholec80",
        "data check",
        "workflow run",
    } <= names


@pytest.mark.parametrize("command", [[]] + _commands(), ids=lambda c: " ".join(c) or "lora-moe")
def test_help_exits_zero(capsys, command):
    code, out, err = run_cli(capsys, [*command, "--help"])
    assert code == 0, err
    assert out.startswith(f"Usage: lora-moe {' '.join(command)}".rstrip()) and "--help" in out
    assert err == ""


USAGE_ERRORS = [
    # (argv, what click says): typer commands and the config-generated ones alike
    (["mrege"], "Error: No such command 'mrege'. Did you mean 'merge'?"),
    (
        ["merge", "--dit", "a", "--lora_weight", "b", "--save_merged_model", "c", "--lora_multiplyer", "1"],
        "Error: No such option: --lora_multiplyer (Possible options: --lora_multiplier)",
    ),
    (["stage1", "--network_dimm", "4"], "Error: No such option: --network_dimm (Possible options: --network_alpha, --network_dim)"),
    (["generate", "--lora_multiplyer", "1"], "(Possible options: --lora_multiplier)"),
    (["merge", "--dit", "a.safetensors"], "--lora_weight is required"),
    (["data", "synth", "--clips", "abc", "--out", "x"], "Error: Invalid value for '--clips': Input should be a valid integer"),
    (["stage1", "--network_dim", "abc"], "Error: Invalid value for '--network_dim': Input should be a valid integer"),
    (["stage1", "--lr_scheduler", "foo"], "Error: Invalid value for '--lr_scheduler'"),
    (["generate", "--dtype", "foo"], "Error: Invalid value for '--dtype'"),
    (["inspect"], "Error: Missing argument"),
    (["inspect", "a", "b"], "Error: Got unexpected extra argument(s) (b)"),
    ([], "Usage: lora-moe [OPTIONS] COMMAND [ARGS]..."),
]


@pytest.mark.parametrize("argv, message", USAGE_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_usage_errors_are_clicks_own(capsys, argv, message):
    code, _, err = run_cli(capsys, argv)
    assert code == 2
    assert message in err, err
    assert "Traceback" not in err and "Exception" not in err


def test_missing_config_option_is_one_line(capsys):
    """A config-generated command takes its required options from flags or --config, so a
    missing one is reported by the config's validation: one `error:` line."""
    code, _, err = run_cli(capsys, ["stage1", "--output_dir", "out"])
    assert code == 2
    assert err == "error: --dit is required; --dataset is required\n"


def test_installed_entry_point_in_a_fresh_process(tmp_path):
    """The real process: `--help` and a typo, as a user's shell sees them."""
    ok = subprocess.run([sys.executable, "-m", "moe", "stage1", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--rank_q" in ok.stdout and ok.stderr == ""
    bad = subprocess.run([sys.executable, "-m", "moe", "stage2", "--lora_dimm", "4"], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "No such option: --lora_dimm (Possible options: --lora_dim, --network_dim, --train_dit)" in bad.stderr


def test_the_cli_uses_only_typers_public_api():
    """typer 0.29 vendors its own click: code importing `click` (or typer's private modules)
    catches the wrong exception classes, which is how `--help` came to exit 1 with a traceback."""
    import ast
    from pathlib import Path

    offenders = []
    for path in (Path(__file__).resolve().parent.parent / "moe").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == "click" or n.startswith("typer._")]
    assert offenders == []
