"""The instrument vocabulary, one name for it everywhere: the classes a clip is labelled with
(manifests, the latent cache's label columns, the instrument classifier) and the stage-2 experts,
one per class, with `other` for clips showing none of them. The order is the expert index used
by gates [B, E], router logits and files."""

from __future__ import annotations

from moe.errors import MoeError

INSTRUMENT_CLASSES: tuple[str, ...] = ("scissors", "hook", "suction", "other")
FALLBACK_EXPERT = "other"


def expert_index(name: str, experts: tuple[str, ...] = INSTRUMENT_CLASSES) -> int:
    """Index of an expert by name (e.g. for `--instrument_hint`); an unknown name is a clear error."""
    try:
        return experts.index(name)
    except ValueError:
        raise MoeError(f"unknown expert {name!r}; choose one of: {', '.join(experts)}") from None
