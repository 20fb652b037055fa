"""Command-line options generated from a pydantic config model.

Every field of a training config becomes `--field_name` (booleans get `--name/--no_name`), with
the field's description as help. `--config FILE` (YAML or TOML) supplies values first; options
given on the command line override it; pydantic then validates the merged result. This keeps one
spelling of each option across the CLI, config files and the Prefect task parameters.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Literal, get_args, get_origin

import click
from click.core import ParameterSource
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from moe.train.config import build_config, read_config_file


def _unwrap_optional(ann):
    if get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _option(name: str, field, aliases: tuple[str, ...]) -> click.Option:
    ann = _unwrap_optional(field.annotation)
    names = [f"--{name}", *(f"--{a}" for a in aliases)]
    default = None if field.default is PydanticUndefined else field.default
    help_text = (field.description or "") + ("" if default is None else f"  [default: {default}]")
    if field.default is PydanticUndefined:
        help_text += "  [required]"
    if ann is bool:
        return click.Option([f"--{name}/--no_{name}", *(f"--{a}" for a in aliases)], default=None, help=help_text)
    if get_origin(ann) is Literal:
        kind = click.Choice([str(a) for a in get_args(ann)])
    elif get_origin(ann) is tuple:
        kind = click.STRING  # comma-separated
    else:
        kind = {int: click.INT, float: click.FLOAT, str: click.STRING, Path: click.Path(path_type=Path)}.get(ann, click.STRING)
    return click.Option(names, type=kind, default=None, help=help_text, show_default=False)


def config_command(
    name: str,
    config_cls: type[BaseModel],
    run: Callable[[BaseModel], None],
    help: str,
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> click.Command:
    """A click command whose options are `config_cls`'s fields; it calls `run(config)`."""
    aliases = aliases or {}
    params: list[click.Parameter] = [
        click.Option(["--config"], type=click.Path(path_type=Path), help="YAML or TOML file of options.")
    ]
    params += [_option(field_name, f, aliases.get(field_name, ())) for field_name, f in config_cls.model_fields.items()]
    tuple_fields = {n for n, f in config_cls.model_fields.items() if get_origin(_unwrap_optional(f.annotation)) is tuple}

    def callback(**kwargs):
        ctx = click.get_current_context()
        file_values = read_config_file(kwargs.pop("config")) if kwargs.get("config") else {}
        kwargs.pop("config", None)
        flags = {
            k: (tuple(x.strip() for x in v.split(",")) if k in tuple_fields else v)  # pydantic converts items
            for k, v in kwargs.items()
            if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE
        }
        run(build_config(config_cls, file_values, flags))

    return click.Command(name, params=params, callback=callback, help=help)
