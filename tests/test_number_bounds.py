"""Numbers that make no sense (issue 12, class 4): every numeric option is checked at the
command-line / config boundary (finite, in range) and the message names the option and the
allowed range. Nothing is written."""

from __future__ import annotations

import re

import pytest
from conftest import run_cli

from moe.config.numbers import FiniteFloat, Fraction, PositiveFloat, Seed, check_number
from moe.errors import MoeError
from moe.merge import merge_lora_into_checkpoint


@pytest.fixture(scope="module")
def argv_for(stage2_run, tmp_path_factory):
    """Complete, valid command lines per command; a case appends one bad option."""
    r, out = stage2_run, tmp_path_factory.mktemp("numbers")
    models = r["root"] / "models"
    return {
        "merge": ["merge", "--dit", r["models"].low_noise, "--lora_weight", r["vanilla_lora"], "--save_merged_model", out / "m.safetensors"],
        "stage1": [
            "stage1",
            "--dit",
            r["models"].low_noise,
            "--dit_high_noise",
            r["models"].high_noise,
            "--dataset",
            r["cache"],
            "--output_dir",
            out / "s1",
        ],
        "stage2": ["stage2", "--dit", r["merged_low"], "--dit_high_noise", r["merged_high"], "--dataset", r["cache"], "--output_dir", out / "s2"],
        "generate": [
            "generate",
            "--dit",
            r["merged_low"],
            "--dit_high_noise",
            r["merged_high"],
            "--model_set",
            models,
            "--lora_moe_weights",
            r["lora_moe"],
            "--prompt",
            "x",
            "--save_path",
            out / "v.mp4",
        ],
        "export": ["export-expert", "--lora_moe_weights", r["lora_moe"], "--expert", "hook", "--out", out / "e.safetensors"],
        "synth": ["data", "synth", "--out", out / "d"],
        "cache": ["cache", "--manifest", r["manifest"], "--model_set", models, "--out", out / "c"],
        "models": ["models", "tiny", "--out", out / "m"],
        "workflow": ["workflow", "run", "--output_dir", out / "w"],
        "_out": out,
    }


FINITE = "must be a finite number"
SEED = "must be a whole number >= 0 and <= 4294967295"
# (command, bad option, the message as it reads today): the test pins its nouns (`_nouns`: the
# options it names, the allowed range, the value refused), not the sentence. `error: ...` lines come
# from the configs, `Invalid value` lines are click's usage errors from the typer commands.
CASES = [
    ("merge", ["--lora_multiplier", "nan"], f"error: --lora_multiplier {FINITE}, got nan"),
    ("merge", ["--lora_multiplier", "inf"], f"error: --lora_multiplier {FINITE}, got inf"),
    ("stage1", ["--timestep_boundary", "nan"], f"error: --timestep_boundary {FINITE} >= 0 and <= 1000, got nan"),
    ("stage1", ["--timestep_boundary", "1500"], f"error: --timestep_boundary {FINITE} >= 0 and <= 1000, got 1500.0"),
    ("stage1", ["--rank_q", "0"], "error: --rank_q must be a whole number >= 1 and <= 1024, got 0"),
    ("stage1", ["--rank_kvo", "-1"], "error: --rank_kvo must be a whole number >= 1 and <= 1024, got -1"),
    ("stage1", ["--network_dim", "-2"], "error: --network_dim must be a whole number >= 1 and <= 1024, got -2"),
    ("stage1", ["--learning_rate", "nan"], f"error: --learning_rate {FINITE} > 0, got nan"),
    ("stage1", ["--network_alpha", "inf"], f"error: --network_alpha {FINITE} > 0, got inf"),
    ("stage1", ["--seed", str(2**70)], f"error: --seed {SEED}, got {2**70}"),
    ("stage1", ["--val_sigmas", "0.5,2"], f"error: --val_sigmas {FINITE} >= 0 and <= 1, got 2"),
    ("stage2", ["--alpha_expert", "inf"], f"error: --alpha_expert {FINITE}, got inf"),
    ("stage2", ["--top_k", "5"], "error: --top_k 5 is more than --num_experts 4"),
    ("stage2", ["--lambda_teach", "-0.1"], f"error: --lambda_teach {FINITE} >= 0, got -0.1"),
    ("generate", ["--video_length", "-5"], "error: --video_length must be a whole number >= 1 and <= 1025, got -5"),
    ("generate", ["--video_size", "100000x100000"], "error: --video_size must be a whole number >= 2 and <= 4096, got 100000\n"),
    ("generate", ["--alpha_expert", "inf"], f"error: --alpha_expert {FINITE}, got inf"),
    ("generate", ["--lora_multiplier", "nan"], f"error: --lora_multiplier {FINITE}, got nan"),
    ("generate", ["--seed", "-1"], f"error: --seed {SEED}, got -1"),
    ("generate", ["--infer_steps", "0"], "error: --infer_steps must be a whole number >= 1 and <= 1000, got 0"),
    ("generate", ["--guidance_scale", "nan"], f"error: --guidance_scale {FINITE} >= 0 and <= 100, got nan"),
    ("export", ["--bake_sigma", "nan"], f"Invalid value for '--bake_sigma': {FINITE} >= 0 and <= 1, got nan"),
    ("export", ["--bake_sigma", "2"], f"Invalid value for '--bake_sigma': {FINITE} >= 0 and <= 1, got 2"),
    ("export", ["--alpha_expert", "inf"], f"Invalid value for '--alpha_expert': {FINITE}, got inf"),
    ("synth", ["--size", "100000x100000"], "error: --size must be a whole number >= 2 and <= 4096, got 100000"),
    ("synth", ["--clips", "0"], "error: --clips must be a whole number >= 1, got 0"),
    ("synth", ["--frames", "5000"], "error: --frames must be a whole number >= 1 and <= 1025, got 5000"),
    ("synth", ["--fps", "nan"], f"error: --fps {FINITE} > 0, got nan"),
    ("synth", ["--val_fraction", "2"], f"error: --val_fraction {FINITE} >= 0 and <= 1, got 2"),
    ("synth", ["--seed", "-1"], f"error: --seed {SEED}, got -1"),
    ("cache", ["--frames", "-1"], "error: --frames must be a whole number >= 1 and <= 1025, got -1"),
    ("cache", ["--size", "99998x99998"], "error: --size must be a whole number >= 2 and <= 4096, got 99998"),
    ("models", ["--seed", "-1"], f"error: --seed {SEED}, got -1"),
    ("workflow", ["--seed", "99999999999"], f"Invalid value for '--seed': {SEED}, got 99999999999"),
]


def _nouns(message: str) -> list[str]:
    """What a message must name: every option, the allowed range (`>= 1 and <= 1025`, `a finite
    number`) and the value refused."""
    nouns = re.findall(r"--[a-z_]+", message)
    if match := re.search(r"must be (?:a )?(.*?)(?:, got (.*))?$", message):
        nouns += [part for part in match.groups() if part]
    return nouns


def test_nouns_of_a_message():
    assert _nouns("error: --rank_q must be a whole number >= 1 and <= 1024, got 0") == ["--rank_q", "whole number >= 1 and <= 1024", "0"]
    assert _nouns("error: --top_k 5 is more than --num_experts 4") == ["--top_k", "--num_experts"]


@pytest.mark.parametrize("command, option, message", CASES, ids=[f"{c} {' '.join(o)}" for c, o, _ in CASES])
def test_bad_numbers_are_refused_with_the_range(argv_for, capsys, command, option, message):
    code, _, err = run_cli(capsys, argv_for[command] + option)
    assert code == 2, err
    assert all(noun in err for noun in _nouns(message)), (_nouns(message), err)
    assert "Traceback" not in err
    if message.startswith("error:"):
        assert err.count("\n") == 1 and err.startswith("error: "), err
    assert not [p for p in argv_for["_out"].iterdir()]  # nothing written, not even a lock


def test_config_file_values_get_the_same_message(argv_for, tmp_path, capsys):
    config = tmp_path / "stage1.yaml"
    config.write_text("rank_q: 0\nlearning_rate: .nan\n")
    code, _, err = run_cli(capsys, argv_for["stage1"] + ["--config", config])
    assert code == 2
    assert err == f"error: --rank_q must be a whole number >= 1 and <= 1024, got 0; --learning_rate {FINITE} > 0, got nan\n"


def test_the_library_refuses_a_nan_multiplier_too(stage2_run, tmp_path):
    """Callers that skip the CLI (the workflow, Prefect tasks) get the same refusal before a
    28 GB NaN checkpoint is written."""
    with pytest.raises(MoeError, match=f"--lora_multiplier {FINITE}, got nan"):
        merge_lora_into_checkpoint(
            stage2_run["models"].low_noise, stage2_run["vanilla_lora"], tmp_path / "m.safetensors", float("nan"), progress=False
        )
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "annotation, text, expected",
    [
        (FiniteFloat, "1e3", 1000.0),
        (FiniteFloat, "-0.5", -0.5),
        (PositiveFloat, "16", 16.0),
        (Fraction, "1", 1.0),
        (Seed, "4294967295", 4294967295),
        (FiniteFloat, "nan", "must be a finite number, got nan"),
        (FiniteFloat, "-inf", "must be a finite number, got -inf"),
        (PositiveFloat, "0", "must be a finite number > 0, got 0"),
        (Fraction, "-0.1", "must be a finite number >= 0 and <= 1, got -0.1"),
        (Seed, "4294967296", "must be a whole number >= 0 and <= 4294967295, got 4294967296"),
        (Seed, "1.5", "Input should be a valid integer"),
    ],
)
def test_number_types(annotation, text, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError) as e:
            check_number(annotation, text)
        assert expected in str(e.value)
    else:
        assert check_number(annotation, text) == expected
