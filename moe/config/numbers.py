"""Number types with their allowed ranges, shared by the configs and the command line, and the
one-line message a rejected value gets.

pydantic takes `nan` and `inf` for a float field and any size of int unless told otherwise: a
NaN `--lora_multiplier` merged into a NaN checkpoint, a seed past 2**63 overflowed inside torch.
Configs set `allow_inf_nan=False` and bounds on their fields; plain command options use these
types through `moe.cli.options`. Either way a bad value stops at the boundary with one line
naming the option and the allowed range.
"""

from __future__ import annotations

from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, BeforeValidator, Field, TypeAdapter, ValidationError

# numpy's legacy seeding and many samplers take 32-bit seeds; torch's generators take 64 bits,
# and the loop multiplies the seed per epoch, so the range stays where every consumer is exact.
SEED_MAX = 2**32 - 1
# Frame sizes and lengths past these are typos (Wan2.2 works at 480p-720p and 81 frames); the
# caps keep `--size 100000x100000` from allocating hundreds of GB before anything can fail.
MAX_SIDE = 4096
MAX_FRAMES = 1025
MAX_RANK = 1024

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
PretrainSteps = Annotated[int, Field(ge=0, le=100_000)]  # the tiny base DiTs' pre-training, per expert
Count = Annotated[int, Field(ge=1)]
Frames = Annotated[int, Field(ge=1, le=MAX_FRAMES)]
Side = Annotated[int, Field(ge=2, le=MAX_SIDE)]  # a frame's width or height in pixels


def _size_items(value: Any) -> Any:
    """`WxH` as well as `W,H` (a 1-tuple when it comes from the comma-splitting CLI)."""
    if isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        items = [item.strip() for item in value.lower().replace("x", ",").split(",")]
        if len(items) != 2 or not all(item.isdigit() for item in items):
            raise ValueError(f"must look like WIDTHxHEIGHT (e.g. 832x480), got {value!r}")
        value = items
    return value


VideoSize = Annotated[tuple[Side, Side], BeforeValidator(_size_items)]  # (width, height), written WIDTHxHEIGHT


def even_size(size: tuple[int, int]) -> tuple[int, int]:
    """H.264 (yuv420p) needs an even width and height."""
    if size[0] % 2 or size[1] % 2:
        raise ValueError(f"needs an even width and height (H.264 yuv420p), got {size[0]}x{size[1]}")
    return size


# Spellings of the compute dtypes (`--dtype bf16` or `--dtype bfloat16`), canonical torch names.
DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}

_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}
_SYMBOLS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds(metadata: list) -> list[str]:
    """`>= 0`, `<= 1` ... from the annotated-types constraints pydantic keeps in `metadata`."""
    found = []
    for item in metadata:
        for name in ("gt", "ge", "lt", "le"):
            value = getattr(item, name, None)
            if value is not None:
                found.append(f"{_SYMBOLS[name]} {value:g}" if isinstance(value, float) else f"{_SYMBOLS[name]} {value}")
        found += _bounds(getattr(item, "metadata", []))  # a FieldInfo inside Annotated
    return found


def is_whole_number(annotation: Any) -> bool:
    """int, `int | None` or `Annotated[int, ...]`."""
    if get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation is int or (int in get_args(annotation) and float not in get_args(annotation))


def allowed_range(annotation: Any, metadata: list) -> str:
    """`a finite number >= 0 and <= 1`, `a whole number >= 1` ..."""
    bounds = _bounds(metadata)
    return ("a whole number" if is_whole_number(annotation) else "a finite number") + (" " + " and ".join(bounds) if bounds else "")


def _shown(value: Any) -> str:
    """A rejected value as the user typed it (quoted only when it would not read as one word)."""
    return repr(value) if isinstance(value, str) and (not value.strip() or " " in value) else str(value)


def describe_error(err: dict, allowed: str | None) -> str:
    """One pydantic error as what follows the option's name: ` must be <allowed>, got <value>`,
    ` is required`, or `: <pydantic's message>`."""
    kind = err["type"]
    if kind == "missing":
        return " is required"
    if kind == "extra_forbidden":
        return " is not an option of this command"
    got = err.get("input")
    if kind in _BOUND_ERRORS and allowed:
        return f" must be {allowed}, got {_shown(got)}"
    message = err["msg"].removeprefix("Value error, ")
    simple = isinstance(got, (int, float, str)) and len(str(got)) < 80 and kind != "value_error"
    return f": {message}" + (f", got {_shown(got)}" if simple else "")


def validation_message(e: ValidationError, model: type[BaseModel] | None) -> str:
    """Every problem of a rejected config in one line, each naming its option (with the
    allowed range when `model` is given)."""
    parts: list[str] = []
    for err in e.errors():
        name = str(err["loc"][0]) if err["loc"] else ""
        field = model.model_fields.get(name) if model is not None else None
        if field is None and not name:  # a model-level check: its message names the options
            part = err["msg"].removeprefix("Value error, ")
        else:
            allowed = _field_range(field, err["loc"][1:]) if field is not None else None
            part = f"--{name}{describe_error(err, allowed)}"
        if part not in parts:  # both sides of a WIDTHxHEIGHT can fail the same way
            parts.append(part)
    return "; ".join(parts)


def _field_range(field, item_loc: tuple) -> str:
    """The allowed range of a field, or of the tuple item an error points at."""
    annotation = field.annotation
    if item_loc and get_origin(annotation) is tuple:
        items = get_args(annotation)
        item = items[0] if len(items) == 2 and items[1] is Ellipsis else items[min(int(item_loc[0]), len(items) - 1)]
        base, *metadata = get_args(item) if get_origin(item) is Annotated else (item,)
        return allowed_range(base, metadata)
    return allowed_range(annotation, field.metadata)


def check_number(annotation: Any, value: Any) -> Any:
    """`value` (a string from the command line, or a number) validated as `annotation`;
    otherwise a ValueError saying what is allowed (`must be a finite number > 0, got nan`)."""
    try:
        return TypeAdapter(annotation).validate_python(value)
    except ValidationError as e:
        base, *metadata = get_args(annotation) if get_origin(annotation) is Annotated else (annotation,)
        raise ValueError(describe_error(e.errors()[0], allowed_range(base, metadata)).lstrip(": ")) from None


def checked(annotation: Any, value: Any, flag: str) -> Any:
    """`check_number` for library entry points: a MoeError naming `flag`."""
    from moe.errors import MoeError

    try:
        return check_number(annotation, value)
    except ValueError as e:
        raise MoeError(f"{flag} {e}") from None
