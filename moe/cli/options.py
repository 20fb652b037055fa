"""Option helpers shared by the typer commands."""

from __future__ import annotations

from typing import Any

import typer

from moe.config_types import check_number, is_whole_number

OVERWRITE_HELP = "Replace an existing output, but only one that this command wrote (never an input)."


def number(annotation: Any) -> dict:
    """`typer.Option` keyword arguments that validate a number as `annotation` (a type from
    `moe.config_types`): a bad value is a usage error naming the option and the allowed range,
    e.g. `Invalid value for '--lora_multiplier': must be a finite number, got nan`."""

    def parse(value):
        try:
            return check_number(annotation, value)
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None

    return {"parser": parse, "metavar": "INT" if is_whole_number(annotation) else "FLOAT"}
