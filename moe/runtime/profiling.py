"""Memory probes on the autograd graph, shared by the benchmarks and the tests.

`saved_activation_bytes` counts what autograd keeps for backward while a function runs: the
distinct storages packed by `torch.autograd.graph.saved_tensors_hooks`, each counted once (q, k
and v saving the same input cost one copy), without the parameters (they live anyway).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def saved_activation_bytes(fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor] = ()) -> tuple[int, torch.Tensor]:
    """(bytes saved for backward by `fn()` excluding the storages of `params`, fn's output)."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved.values()), out
