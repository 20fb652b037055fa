"""Progress and status lines that read well on a terminal and in a log.

On a terminal (`stderr` is a TTY) `progress` is plain tqdm, exactly as before. Anywhere else (a
log file, the Prefect UI through `tasks.stages.launcher`, a test's capture) tqdm's redraws would each
become a line, so `progress` is `LogProgress`: a short line after the first step, then at every
tenth of the way or every 30 s, whichever comes first, with the rate and the time left, and one
line when it ends (so at most about a dozen lines per loop, however long; none when it fails
before its first step, so that the error is the only line).

`phase` says what a long step that draws no bar is doing (a line when it starts, one with its
duration when it ends); `metrics_line` writes numbers with 4 significant digits;
`quiet_third_party_output` turns off other libraries' bars in a log and one known warning.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tqdm import tqdm

INTERVAL_S = 30.0  # a log line at least this often while a loop advances
EVERY_FRACTION = 0.1  # and one at each tenth of the way


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress(iterable: Iterable | None = None, *, file=None, **kwargs):
    """A progress bar for `iterable` (or one advanced with `update`): tqdm on a terminal, a
    `LogProgress` otherwise; takes tqdm's arguments (`total`, `desc`, `unit`, `unit_scale`,
    `initial`, `disable`, `mininterval` ...)."""
    if kwargs.get("disable") or is_terminal(file):
        return tqdm(iterable, file=file, **kwargs)
    return LogProgress(iterable, file=file, **kwargs)


def format_duration(seconds: float) -> str:
    """12.34 -> '12.3 s', 754 -> '12 min 34 s', 7384 -> '2 h 03 min'."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    minutes, s = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def format_number(value: Any) -> str:
    """A number with 4 significant digits (`0.3333`, `2.363`, `123500`, `1.235e-05`); others as str."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    text = f"{value:.4g}"
    if "e+" in text and abs(value) < 1e15:  # 1.235e+05 -> 123500
        text = f"{float(text):.0f}"
    return text


def metrics_line(metrics: Mapping[str, Any]) -> str:
    """`name value, name value` with 4 significant digits: a metrics dict in a log line."""
    return ", ".join(f"{name} {format_number(value)}" for name, value in metrics.items())


class LogProgress:
    """tqdm's interface (iteration, `update`, `set_postfix`, `close`, a context manager) for a
    log: periodic one-line summaries instead of redraws (see the module docstring)."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        *,
        total: float | None = None,
        desc: str | None = None,
        unit: str = "it",
        unit_scale: bool = False,
        initial: float = 0,
        disable: bool = False,
        file=None,
        interval_s: float = INTERVAL_S,
        every_fraction: float = EVERY_FRACTION,
        **_tqdm_only,
    ):
        if total is None and iterable is not None:
            with contextlib.suppress(TypeError):
                total = len(iterable)  # type: ignore[arg-type]
        self.iterable, self.total, self.desc, self.unit, self.unit_scale = iterable, total, desc or "", unit, unit_scale
        self.n = self.initial = initial
        self.disable, self.file = disable, file
        self.interval_s, self.every_fraction = interval_s, every_fraction
        self.postfix = ""
        self.started = self._last_line_t = time.monotonic()
        self._next_fraction = self._fraction_after(self._fraction())
        self._closed = False
        self._lines = 0

    # tqdm's interface
    def __iter__(self) -> Iterator:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __len__(self) -> int:
        return int(self.total or 0)

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        fraction = self._fraction()
        due = self._lines == 0 or now - self._last_line_t >= self.interval_s  # the first step says it runs
        if fraction is not None and fraction >= self._next_fraction:
            self._next_fraction = self._fraction_after(fraction)
            due = fraction < 1  # the last one is close()'s
        if due:
            self._line(self._status(now))

    def set_postfix(self, ordered_dict: Mapping | None = None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={format_number(v)}" for k, v in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = s

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        self.desc = desc or ""

    def refresh(self, *args, **kwargs) -> None:
        pass

    def clear(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        elapsed = time.monotonic() - self.started
        done = self.n - self.initial
        if not done:  # nothing happened (a loop over nothing, or a failure before the first step)
            return
        rate = f", {self._rate(done / elapsed)}" if done and elapsed > 0 else ""
        finished = not self.total or self.n >= self.total
        self._line(
            f"{'done' if finished else 'stopped'}: {self._amount(finished)} in {format_duration(elapsed)}{rate}"
            + (f" ({self.postfix})" if self.postfix else "")
        )

    # the lines
    def _fraction(self) -> float | None:
        return self.n / self.total if self.total else None

    def _fraction_after(self, fraction: float | None) -> float:
        if fraction is None:
            return math.inf
        return (math.floor(fraction / self.every_fraction + 1e-9) + 1) * self.every_fraction

    def _count(self, n: float) -> str:
        if self.unit_scale:  # 1.23G
            return tqdm.format_sizeof(n, divisor=1000).strip()
        return str(int(n)) if float(n).is_integer() else f"{n:.4g}"

    def _amount(self, alone: bool = False) -> str:
        """`12/64 clip`, `1.20GB/2.40GB`, or without the total (`alone`, or none known)."""
        if self.unit_scale:
            done = f"{self._count(self.n)}{self.unit}"
            return done if alone or not self.total else f"{done}/{self._count(self.total)}{self.unit}"
        done = self._count(self.n)
        return f"{done} {self.unit}" if alone or not self.total else f"{done}/{self._count(self.total)} {self.unit}"

    def _rate(self, per_s: float) -> str:
        if self.unit_scale:
            return f"{self._count(per_s)}{self.unit}/s"
        if per_s >= 1:
            return f"{format_number(float(per_s))} {self.unit}/s"
        return f"{format_number(1 / per_s)} s/{self.unit}"

    def _status(self, now: float) -> str:
        elapsed = now - self.started
        done = self.n - self.initial
        parts = [self._amount() + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            parts.append(self._rate(rate))
            if self.total:
                parts.append(f"ETA {format_duration(max(self.total - self.n, 0) / rate)}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _line(self, text: str) -> None:
        self._last_line_t = time.monotonic()
        self._lines += 1
        if self.disable:
            return
        stream = sys.stderr if self.file is None else self.file
        print(f"{self.desc}: {text}" if self.desc else text, file=stream, flush=True)


@contextlib.contextmanager
def phase(what: str, log=None) -> Iterator[None]:
    """`what...` when a long step starts and `what: done in 12.3 s` when it ends (`log` takes a
    line; default: stderr), for steps that draw no progress bar."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.monotonic()
    log(f"{what}...")
    yield
    log(f"{what}: done in {format_duration(time.monotonic() - started)}")


# transformers' warning that its CLIP image processor falls back to PIL without torchvision: it
# comes with importing diffusers' Wan I2V pipeline (which names CLIPImageProcessor), even for a
# T2V run that never uses it. Dropped on that one logger, for that one message.
_NOISE = {"transformers.utils.import_utils": ("requires torchvision (not installed); falling back to",)}


class _DropMessages(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def quiet_third_party_output(stream=None) -> None:
    """Drop the known third-party warnings (`_NOISE`, on their own loggers only) and, when
    `stream` (stderr) is not a terminal, Hugging Face's progress bars (transformers' "Loading
    weights", hub downloads): in a log each redraw would be a line. Idempotent."""
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(fragments))
    if not is_terminal(stream):
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read by transformers when imported
        for module in ("transformers.utils.logging", "diffusers.utils.logging"):  # already imported: tell them
            if module in sys.modules:
                sys.modules[module].disable_progress_bar()
