"""The resumable training states in a run folder: their names and their order.

    state-epoch-N/                   at the end of epoch N (`--save_every_n_epochs`)
    state-epoch-N-step-SSSSSSSS/     after optimizer step S, with N epochs done: a save by
                                     `--save_every_n_steps`, `--save_every_n_minutes` or SIGTERM

The number after `epoch` is always the epochs completed, so the states sort by (epochs done,
optimizer step): `state-epoch-1` < `state-epoch-1-step-00000012` < `state-epoch-2`. The newest is
the one `--resume` continues from. `state-nonfinite-step-N/` (the last good state before a NaN)
is not among them: it is kept for inspection and resumed from only by renaming it.

No torch here: the pipeline's flow process reads these names too (`tasks.stages.runner.saved_states`).
"""

from __future__ import annotations

import re
from pathlib import Path

STATE_RE = re.compile(r"state-epoch-(\d+)(?:-step-(\d+))?")


def state_name(epochs_done: int, step: int | None = None) -> str:
    """`state-epoch-N` (the end of epoch N), or `state-epoch-N-step-S` (after step S)."""
    return f"state-epoch-{epochs_done}" if step is None else f"state-epoch-{epochs_done}-step-{step:08d}"


def state_order(path: Path) -> tuple[int, int, int] | None:
    """The sort key of a state folder (None for any other name): (epochs done, 0 for an epoch
    state or 1 for a step state, step)."""
    m = STATE_RE.fullmatch(Path(path).name)
    if m is None:
        return None
    epoch, step = int(m.group(1)), m.group(2)
    return (epoch, 0, 0) if step is None else (epoch, 1, int(step))


def resumable_states(output_dir: Path) -> list[Path]:
    """The resumable states in `output_dir`, oldest first."""
    found = [(key, p) for p in Path(output_dir).glob("state-epoch-*") if (key := state_order(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_state(output_dir: Path) -> Path | None:
    """The newest resumable state (by optimizer step), or None."""
    states = resumable_states(output_dir)
    return states[-1] if states else None
