"""Which DiT modules get LoRA, at which rank (SPEC section 2).

The default is the reference workflow's: self-attention q (rank 8) and k/v/o (rank 4) in the
last 8 of 40 blocks, and the FFN's first linear (`ffn.0`, rank 4) in the last 3 of 40 blocks,
alpha 1.0. Block counts are stated on a reference depth of 40 and scaled to the model's depth
(at least one block), so the same spec is meaningful for the 30-block 5B model and tiny models.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moe.config.presets import BLOCK_MODULES
from moe.errors import MoeError

REFERENCE_DEPTH = 40
# Sub-modules a LoRA may target: the Linear layers of a block (original names).
LINEAR_SUBMODULES = tuple(m for m in BLOCK_MODULES if m.split(".")[-1] in {"q", "k", "v", "o", "0", "2"})


class TargetGroup(BaseModel):
    """Some sub-modules of the last blocks, each with its rank."""

    model_config = ConfigDict(frozen=True)

    ranks: dict[str, int]  # sub-module (e.g. "self_attn.q") -> rank
    last_blocks: int = Field(gt=0)  # how many final blocks, counted on a 40-block model
    blocks: tuple[int, ...] | None = None  # explicit block indices; overrides last_blocks

    @field_validator("ranks")
    @classmethod
    def _known_submodules(cls, ranks: dict[str, int]) -> dict[str, int]:
        unknown = [m for m in ranks if m not in LINEAR_SUBMODULES]
        if unknown:
            raise ValueError(f"unknown LoRA sub-module(s) {unknown}; choose from {list(LINEAR_SUBMODULES)}")
        bad = [m for m, r in ranks.items() if r <= 0]
        if bad:
            raise ValueError(f"ranks must be positive: {bad}")
        return ranks

    def block_indices(self, num_layers: int) -> list[int]:
        if self.blocks is not None:
            out_of_range = [b for b in self.blocks if not 0 <= b < num_layers]
            if out_of_range:
                raise MoeError(f"target blocks {out_of_range} do not exist in a {num_layers}-block model")
            return sorted(self.blocks)
        n = max(1, min(num_layers, round(self.last_blocks * num_layers / REFERENCE_DEPTH)))
        return list(range(num_layers - n, num_layers))


class TargetSpec(BaseModel):
    """The LoRA target spec shared by stage 1 and stage 2."""

    model_config = ConfigDict(frozen=True)

    groups: tuple[TargetGroup, ...] = (
        TargetGroup(ranks={"self_attn.q": 8, "self_attn.k": 4, "self_attn.v": 4, "self_attn.o": 4}, last_blocks=8),
        TargetGroup(ranks={"ffn.0": 4}, last_blocks=3),
    )
    alpha: float = 1.0

    def resolve(self, num_layers: int) -> dict[str, int]:
        """Original module name (`blocks.37.ffn.0`) -> rank, for a model of `num_layers` blocks."""
        modules: dict[str, int] = {}
        for group in self.groups:
            for b in group.block_indices(num_layers):
                for sub, rank in group.ranks.items():
                    modules[f"blocks.{b}.{sub}"] = rank
        return dict(sorted(modules.items(), key=lambda kv: _module_sort_key(kv[0])))

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TargetSpec:
        return cls.model_validate_json(text)

    @classmethod
    def from_flags(
        cls,
        network_dim: int = 4,
        network_alpha: float = 1.0,
        rank_q: int | None = 8,
        rank_kvo: int | None = None,
        rank_k: int | None = None,
        rank_v: int | None = None,
        rank_o: int | None = None,
        rank_ffn: int | None = None,
        attn_last_blocks: int = 8,
        ffn_last_blocks: int = 3,
        cross_attn: bool = False,
        ffn2: bool = False,
    ) -> TargetSpec:
        """The reference CLI flags (`--network_dim 4 --rank_q 8 --rank_kvo 4 ...`) as a spec.
        Unset ranks fall back to `--rank_kvo`, then `--network_dim`."""

        def rank(given: int | None, fallback: int) -> int:
            return fallback if given is None else given  # an explicit 0 is an error, not "unset"

        kvo = rank(rank_kvo, network_dim)
        attn = {"q": rank(rank_q, network_dim), "k": rank(rank_k, kvo), "v": rank(rank_v, kvo), "o": rank(rank_o, kvo)}
        attn_ranks = {f"self_attn.{p}": r for p, r in attn.items()}
        if cross_attn:
            attn_ranks |= {f"cross_attn.{p}": r for p, r in attn.items()}
        ffn_ranks = {"ffn.0": rank(rank_ffn, network_dim)}
        if ffn2:
            ffn_ranks["ffn.2"] = rank(rank_ffn, network_dim)
        return cls(
            groups=(
                TargetGroup(ranks=attn_ranks, last_blocks=attn_last_blocks),
                TargetGroup(ranks=ffn_ranks, last_blocks=ffn_last_blocks),
            ),
            alpha=network_alpha,
        )


def _module_sort_key(module: str) -> tuple[int, int]:
    _, idx, rest = module.split(".", 2)
    return int(idx), LINEAR_SUBMODULES.index(rest)


def describe_modules(modules: dict[str, int]) -> str:
    """Compact human summary: `blocks 6-7: self_attn.q r8, ...; blocks 7: ffn.0 r4`."""
    by_sub: dict[tuple[str, int], list[int]] = {}
    for m, r in modules.items():
        _, idx, sub = m.split(".", 2)
        by_sub.setdefault((sub, r), []).append(int(idx))
    parts = [f"{sub} r{r} in blocks {_ranges(idx)}" for (sub, r), idx in by_sub.items()]
    return "; ".join(parts)


def _ranges(idx: list[int]) -> str:
    idx = sorted(idx)
    out, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(out)


def check_same_targets(stage1: dict[str, int], stage2: dict[str, int], what1: str, what2: str) -> None:
    """Stage 1 and stage 2 must use the same modules and ranks."""
    if stage1 != stage2:
        raise MoeError(
            f"target spec mismatch: {what1} has [{describe_modules(stage1)}] but {what2} has "
            f"[{describe_modules(stage2)}]; use the same --rank_* flags in both stages"
        )
