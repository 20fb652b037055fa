"""Option helpers shared by the typer commands."""

from __future__ import annotations

import os
from typing import Any

import typer
from typer.core import TyperCommand

from moe.config.numbers import check_number, is_whole_number


def number(annotation: Any) -> dict:
    """`typer.Option` keyword arguments that validate a number as `annotation` (a type from
    `moe.config.numbers`): a bad value is a usage error naming the option and the allowed range,
    e.g. `Invalid value for '--lora_multiplier': must be a finite number, got nan`."""

    def parse(value):
        try:
            return check_number(annotation, value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None

    return {"parser": parse, "metavar": "INT" if is_whole_number(annotation) else "FLOAT"}


def _parse_task(value: str) -> str:
    from moe.config.presets import get_preset

    try:
        get_preset(value)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    return value


# `typer.Option` keyword arguments for a `--task`: an unknown one is a usage error naming the option.
TASK = {"parser": _parse_task, "metavar": "TASK"}


# What each path option names, by its parameter name, for `check_path` (moe.files.input_paths): an
# input must exist and be readable; an output is checked for what no writer can use (a pipe, a
# path through a file), and `claim_output` decides later what may be replaced; `inspect` also
# reports on a path that is gone (the temporaries an interrupted write left).
OUTPUT_PATHS = frozenset({"out", "output_dir", "save_path", "save_merged_model"})
MAYBE_MISSING_PATHS = frozenset({"path"})  # lora-moe inspect PATH
INPUT_PATHS = frozenset(
    {
        "dit",
        "dit_high_noise",
        "merged_dit",
        "merged_dit_high_noise",
        "lora_weight",
        "lora_moe_weights",
        "src",
        "dataset",
        "manifest",
        "label_map",
        "model_set",
        "vae",
        "text_encoder",
        "tokenizer",
        "image",
        "sample_prompts",
        "root",
        "config",
        "gate",
    }
)
PATH_OPTIONS = OUTPUT_PATHS | MAYBE_MISSING_PATHS | INPUT_PATHS


def check_path_option(name: str, value, flag: str | None = None) -> None:
    """The shared check of one path option's value (nothing for other options or no value)."""
    from moe.files.input_paths import check_path

    if name in PATH_OPTIONS and isinstance(value, (str, os.PathLike)):
        check_path(value, flag or f"--{name}", must_exist=name in INPUT_PATHS)


class CheckedCommand(TyperCommand):
    """A typer command whose path options (`PATH_OPTIONS`) are checked by `check_path_option`
    after click parsed them and before the command runs."""

    def invoke(self, ctx):
        for param in self.params:
            flag = param.opts[0] if param.param_type_name == "option" else (getattr(param, "metavar", None) or param.name.upper())
            check_path_option(param.name, ctx.params.get(param.name), flag)
        return super().invoke(ctx)
