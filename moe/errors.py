"""User-facing errors.

Anything a user can cause (a wrong file, a bad flag, a bad manifest row) raises `MoeError` with
one actionable sentence. The CLI prints it as a single line without a traceback.
"""


class MoeError(ValueError):
    """A problem with the user's input, explained in the message."""


def list_names(names, limit: int = 6) -> str:
    """`a, b, c ... (N in all)`: a bounded list for one-line messages."""
    names = list(names)
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def key_set_problems(expected: dict[str, tuple], got: dict[str, tuple], limit: int = 6) -> list[str]:
    """Missing, unexpected and mis-shaped keys of a state dict (name -> shape), as message parts;
    empty when the key sets and shapes match."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k]))
    problems = []
    if missing:
        problems.append(f"missing keys: {list_names(missing, limit)}")
    if unexpected:
        problems.append(f"unexpected keys: {list_names(unexpected, limit)}")
    if wrong:
        problems.append("shape mismatches: " + list_names([f"{k} {tuple(got[k])} != {tuple(expected[k])}" for k in wrong], limit))
    return problems


# The exit code of a training command stopped by SIGTERM after saving a resumable state: 128 +
# SIGTERM, what a shell reports for a process the signal ended. Not 2, so an orchestrator
# (tasks.stages.launcher, Prefect's retries) retries it, and the retry resumes.
EXIT_STOPPED = 143


class TrainingStopped(Exception):
    """Training stopped on SIGTERM at an optimizer-step boundary, its state saved; the CLI prints
    the message as one `error:` line and exits with `EXIT_STOPPED`."""
