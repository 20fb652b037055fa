"""Command-line options generated from a pydantic config model.

Every field of a config becomes `--field_name` (booleans get `--name/--no_name`), with the
field's description as help. `--config FILE` (YAML or TOML) supplies values first; options
given on the command line override it; pydantic then validates the merged result, and a rejected
value is one line naming the option and its allowed range. This keeps one spelling of each
option across the CLI, config files and the Prefect task parameters.

The commands are ordinary typer commands (a generated signature), so `--help`, typos ("did you
mean"), unknown options and unparsable values behave as in every other command. `group=True`
makes a group that also runs itself (`lora-moe eval` and `lora-moe eval multiplier-sweep`).
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Literal, get_args, get_origin

import typer
from pydantic import BaseModel

from moe.cli.options import check_path_option
from moe.config.loader import build_config, read_config_file

# Options whose file a config's validator reads (the eval gate's thresholds).
READ_WHILE_VALIDATING = ("gate",)


def _unwrap_optional(ann):
    if get_origin(ann) in (typing.Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _cli_type(ann) -> type:
    """What the command line parses a field as; pydantic validates the value afterwards."""
    if ann in (bool, int, float, Path) or get_origin(ann) is Literal:
        return ann
    return str  # str, and tuples given comma-separated


def shown_default(name: str, value) -> str | None:
    """A default as a user writes it on the command line (None: nothing worth showing): `64x64`
    for a size, `0.1,0.5` for a tuple, a path as is, an enum by its value, `--no_name` for a
    switch that is off."""
    if value is None or isinstance(value, BaseModel):
        return None
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no_{name}"
    if isinstance(value, enum.Enum):
        return shown_default(name, value.value)
    if isinstance(value, (tuple, list)):
        if name.endswith("size") and len(value) == 2:
            return "x".join(str(v) for v in value)
        return ",".join(shown_default(name, v) or "" for v in value)
    if isinstance(value, str) and value == "":
        return '""'
    return str(value)


def argument_name(field) -> str | None:
    """The metavar of a field given as a positional argument (`Field(json_schema_extra=
    {"argument": "PATH"})`: `lora-moe inspect PATH`), None for an option."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return extra.get("argument")


def _parameter(name: str, field, aliases: tuple[str, ...]) -> inspect.Parameter:
    ann = _unwrap_optional(field.annotation)
    if metavar := argument_name(field):  # required on the command line (click says so when it is missing)
        argument = typer.Argument(metavar=metavar, help=field.description or "", show_default=False)
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[_cli_type(ann), argument])
    required = field.is_required()
    default = None if required else field.get_default(call_default_factory=True)
    shown = None if required else shown_default(name, default)
    help_text = (field.description or "") + ("  [required]" if required else f"  [default: {shown}]" if shown is not None else "")
    decls = [f"--{name}/--no_{name}"] if ann is bool else [f"--{name}"]
    option = typer.Option(*decls, *(f"--{a}" for a in aliases), help=help_text.strip(), show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[_cli_type(ann) | None, option])


def _command(config_cls: type[BaseModel], run: Callable[[BaseModel], None], aliases: dict, group: bool) -> Callable:
    """A function with one keyword parameter per field (typer reads the generated signature)
    that validates the merged options and calls `run(config)`. An option left out is None here
    and does not override the config file. A `group` first gets typer's context, so it runs only
    when no subcommand is named."""
    config_option = typer.Option("--config", help="YAML or TOML file of options; flags override it.")
    params = [inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Path | None, config_option])]
    params += [_parameter(n, f, aliases.get(n, ())) for n, f in config_cls.model_fields.items()]
    if group:
        params.insert(0, inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context))
    tuple_fields = {n for n, f in config_cls.model_fields.items() if get_origin(_unwrap_optional(f.annotation)) is tuple}

    def command(ctx: typer.Context | None = None, config: Path | None = None, **flags) -> None:
        if ctx is not None and ctx.invoked_subcommand is not None:
            return
        check_path_option("config", config)
        file_values = read_config_file(config) if config else {}
        given = {
            k: (tuple(x.strip() for x in v.split(",")) if k in tuple_fields else v)  # pydantic converts items
            for k, v in flags.items()
            if v is not None
        }
        merged = file_values | given
        for name in READ_WHILE_VALIDATING:  # a file a validator reads (--gate): checked before it is opened
            check_path_option(name, merged.get(name))
        cfg = build_config(config_cls, file_values, given)
        for name, field in config_cls.model_fields.items():  # after validation, whose messages come first
            if name not in READ_WHILE_VALIDATING:
                check_path_option(name, getattr(cfg, name), argument_name(field))
        run(cfg)

    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def config_command(
    app: typer.Typer,
    name: str,
    config_cls: type[BaseModel],
    run: Callable[[BaseModel], None],
    help: str,
    aliases: dict[str, tuple[str, ...]] | None = None,
    group: bool = False,
) -> typer.Typer:
    """Register `name` on `app`: a command whose options are `config_cls`'s fields; it calls
    `run(config)`. With `group` it is a group that runs itself when no subcommand is named
    (`lora-moe eval --flags` and `lora-moe eval multiplier-sweep --flags`): register the
    subcommands on the returned app (otherwise `app` itself is returned)."""
    command = _command(config_cls, run, aliases or {}, group=group)
    if not group:
        app.command(name, help=help)(command)
        return app
    sub = typer.Typer(help=help)
    sub.callback(invoke_without_command=True, help=help)(command)
    app.add_typer(sub, name=name)
    return sub
