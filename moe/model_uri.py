"""`--model SCHEME:...` for generation: a registered model resolved to local files by a plugin.

moe never imports the orchestration side (MLflow, S3); the project's `tasks` package declares a
resolver for `models:/NAME@ALIAS` URIs as an entry point of the group below (pyproject.toml),
and this module finds it by the URI's scheme. A resolver returns the `lora-moe generate` inputs
as local paths (`dit`, `dit_high_noise`, `lora_moe_weights`, `vae`, `text_encoder`, `tokenizer`)
and the `task`, each file fetched and verified on the way.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path

from pydantic import BaseModel, ValidationError

from moe.errors import MoeError

RESOLVER_GROUP = "lora_moe.model_uri_resolvers"


class ResolvedModel(BaseModel):
    """A registered model's `lora-moe generate` inputs as local paths, by option name (what a
    resolver returns; tasks.model_bundle builds it)."""

    task: str
    dit: Path
    dit_high_noise: Path | None = None
    lora_moe_weights: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    source: str  # what was resolved, for messages


def resolve_model_uri(uri: str) -> ResolvedModel:
    """The local files of the model `uri` names, through the resolver installed for its scheme."""
    scheme, sep, _ = uri.partition(":")
    found = entry_points(group=RESOLVER_GROUP, name=scheme) if sep else ()
    if not found:
        known = sorted({ep.name for ep in entry_points(group=RESOLVER_GROUP)})
        raise MoeError(
            f"--model {uri}: no resolver for {scheme + ':' if sep else 'this kind of'} URI is installed "
            f"(installed: {', '.join(known) or 'none'}); models:/NAME@ALIAS needs the project's orchestration "
            "package (`pip install -e .` in the repository installs it)"
        )
    resolver = next(iter(found))
    try:
        resolve = resolver.load()
    except ImportError as e:
        raise MoeError(f"--model {uri}: the resolver {resolver.value} cannot be imported: {e}") from None
    try:
        return ResolvedModel.model_validate(resolve(uri))
    except ValidationError as e:
        raise MoeError(f"--model {uri}: the resolver {resolver.value} returned an incomplete model: {e.errors()[0]['msg']}") from None
