"""`--model SCHEME:...` for generation: a registered model resolved to local files by a plugin.

moe never imports the orchestration side (MLflow, S3); the project's `tasks` package declares a
resolver for `models:/NAME@ALIAS` URIs as an entry point of the group below (pyproject.toml),
and this module finds it by the URI's scheme. A resolver returns the `lora-moe generate` inputs
as local paths (`dit`, `dit_high_noise`, `lora_moe_weights`, `vae`, `text_encoder`, `tokenizer`)
and the `task`, each file fetched and verified on the way.
"""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

from pydantic import BaseModel, ValidationError

from moe.errors import MoeError

RESOLVER_GROUP = "lora_moe.model_uri_resolvers"


class ResolvedModel(BaseModel):
    """A registered model's `lora-moe generate` inputs as local paths, by option name (what a
    resolver returns; tasks.registry.bundle builds it)."""

    task: str
    dit: Path
    dit_high_noise: Path | None = None
    lora_moe_weights: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    source: str  # what was resolved, for messages
    # Where the resolver keeps what it fetched, and that folder's size before and after this
    # resolution (`lora-moe generate --model` reports them); None when it keeps no cache.
    download_cache: Path | None = None
    cache_bytes_before: int | None = None
    cache_bytes: int | None = None

    def report(self, uri: str) -> str:
        """One line: which version `uri` resolved to, and where its files are cached."""
        line = f"--model {uri}: {self.source} (task {self.task})"
        if self.download_cache is not None:
            line += f"; download cache {self.download_cache}"
            if self.cache_bytes is not None:
                grew = self.cache_bytes - (self.cache_bytes_before or 0)
                line += f": {human_bytes(self.cache_bytes)}" + (
                    f" (+{human_bytes(grew)} fetched now)" if grew > 0 else " (nothing fetched: all cached)"
                )
        return line


def human_bytes(n: int) -> str:
    """1234567 -> "1.235 MB" (powers of 1000, 4 significant digits)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n} B" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1000
    return f"{n} B"


def resolve_model_uri(uri: str) -> ResolvedModel:
    """The local files of the model `uri` names, through the resolver installed for its scheme."""
    scheme, sep, _ = uri.partition(":")
    found = entry_points(group=RESOLVER_GROUP, name=scheme) if sep else ()
    if not sep:  # NAME@ALIAS or NAME/VERSION without its scheme: not a missing package
        example = f"models:/{uri}" if re.fullmatch(r"[^/@\s]+(@[^/@\s]+|/\d+)", uri) else "models:/NAME@ALIAS"
        raise MoeError(f"--model {uri} is not a model URI: write it with its scheme, e.g. --model {example} (or models:/NAME/VERSION)")
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
