"""The stage-2 experts (SPEC section 5): one per instrument class, and `other` for clips with none
of them. The order is the expert index used by gates [B, E], router logits and files."""

from __future__ import annotations

from moe.errors import MoeError

EXPERTS: tuple[str, ...] = ("scissors", "hook", "suction", "other")
FALLBACK_EXPERT = "other"


def expert_index(name: str, experts: tuple[str, ...] = EXPERTS) -> int:
    """Index of an expert by name (e.g. for `--instrument_hint`); an unknown name is a clear error."""
    try:
        return experts.index(name)
    except ValueError:
        raise MoeError(f"unknown expert {name!r}; choose one of: {', '.join(experts)}") from None
