"""The check of every path option (`config_command` runs it after validation): which option names
a file to read, which an output, and what `check_path` says about the value."""

from __future__ import annotations

import os

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
