"""Config files and flags into one validated config: the one loader every command, the pipeline
and the tests use. A file (YAML or TOML) supplies values first, flags override them, pydantic
validates the merge, and a rejected value is one line naming the option and its allowed range."""

from __future__ import annotations

import tomllib
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from moe.config.numbers import validation_message
from moe.errors import MoeError


def read_config_file(path: Path) -> dict:
    """A YAML or TOML config file as a dict (validated later, with the flags merged in)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MoeError(f"cannot read config file {path}: {e.strerror if isinstance(e, OSError) else 'not UTF-8 text'}") from None
    try:
        data = tomllib.loads(text) if str(path).endswith(".toml") else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        mark = getattr(e, "problem_mark", None)  # YAML's own message spans several lines
        reason = f"{e.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark and getattr(e, "problem", None) else e
        raise MoeError(f"config file {path} is not valid {'TOML' if str(path).endswith('.toml') else 'YAML'}: {reason}") from None
    if not isinstance(data, dict):
        raise MoeError(f"config file {path} must hold a mapping of option names to values")
    return data


def build_config(cls: type[BaseModel], file_values: dict, flag_values: dict) -> BaseModel:
    """Validate file values overridden by explicit flags; one line names every bad option and
    its allowed range."""
    try:
        return cls(**(file_values | flag_values))
    except ValidationError as e:
        raise MoeError(validation_message(e, cls)) from None
