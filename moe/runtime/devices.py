"""The compute device and dtype a command asks for, checked before any model is loaded.

`--device cuda` on a machine without CUDA used to fail deep inside torch (an AssertionError
from a CPU build); here it is one line saying what torch sees.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from moe.config.numbers import DTYPE_ALIASES
from moe.errors import MoeError


def resolve_device(text: str | torch.device, flag: str = "--device") -> torch.device:
    """`text` as a torch device that exists on this machine."""
    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        raise MoeError(f"{flag} {text!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA GPU"
            raise MoeError(f"{flag} {text} was asked for, but torch sees {build} ({torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MoeError(f"{flag} {text}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise MoeError(f"{flag} {text} was asked for, but torch sees no Apple GPU; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise MoeError(f"{flag} {text}: use cpu, cuda or cuda:N")
    return device


def resolve_dtype(text: str, flag: str, choices: tuple[str, ...]) -> torch.dtype:
    """The torch dtype named by `text`; `choices` are the spellings the error lists, and any
    alias of them (bf16 / bfloat16, fp32 / float32, fp16 / float16) is accepted."""
    name = DTYPE_ALIASES.get(text.strip().lower())
    if name is None or name not in {DTYPE_ALIASES[choice] for choice in choices}:
        raise MoeError(f"{flag} must be one of {', '.join(choices)}, got {text!r}")
    return getattr(torch, name)


@contextlib.contextmanager
def one_cpu_thread(device: str | torch.device = "cpu") -> Iterator[None]:
    """One torch CPU thread for the duration (nothing changes for another device): small models and
    many small ops run about as fast on one thread as on two idle ones, and 10-15x slower on two
    threads of a busy 2-core machine, where they spin. The caller's setting is restored."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
