"""The `lora-moe` command line. Each sub-module registers its commands on `moe.cli.app.app`.

Exit codes: 0 success; 2 a usage error (click's usage message: unknown command or option with a
"did you mean" hint, a missing option, a value of the wrong type) or a user error (one
`error: ...` line: a wrong or damaged file, a number out of range, an output that exists or is
locked, a full disk); 130 interrupted; 143 (`moe.errors.EXIT_STOPPED`) a training stopped by
SIGTERM after saving its state (run it again with --resume). A traceback means a bug.
"""

from __future__ import annotations

import errno
import logging
import sys

import typer
from pydantic import ValidationError

from moe.cli.app import app
from moe.config.numbers import validation_message
from moe.errors import EXIT_STOPPED, MoeError, TrainingStopped
from moe.files.atomic import write_error

PLUGIN_GROUP = "lora_moe.cli"  # entry points: NAME = "module:typer_app", added as `lora-moe NAME ...`


def _register_commands() -> None:
    # Imported for their side effect of adding commands to `app`; each module imports its heavy
    # dependencies inside the command, so start-up stays cheap.
    from moe.cli import cache, checkpoints, data, eval, lora, training, workflow  # noqa: F401

    _register_plugins()


def _register_plugins() -> None:
    """Command groups other packages declare (the project's `tasks` adds `registry`): moe never
    imports them by name. A plugin that cannot be imported becomes a command saying why."""
    from importlib.metadata import entry_points

    registered = {info.name for info in app.registered_groups}
    for ep in entry_points(group=PLUGIN_GROUP):
        if ep.name in registered:  # one distribution seen twice on sys.path
            continue
        registered.add(ep.name)
        try:
            plugin = ep.load()
        except ImportError as e:
            plugin = _broken_plugin(ep.name, ep.value, e)
        app.add_typer(plugin, name=ep.name)


def _broken_plugin(name: str, value: str, error: ImportError) -> typer.Typer:
    broken = typer.Typer(help=f"(unavailable: {value} cannot be imported)")

    @broken.callback(invoke_without_command=True)
    def unavailable() -> None:
        raise MoeError(f"`lora-moe {name}` comes from {value}, which cannot be imported here: {error}")

    return broken


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test's capture, a redirected log)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _show_warnings() -> None:
    """The library's own warnings (a stale lock taken over, temporaries removed) as
    `warning: ...` lines on stderr."""
    logger = logging.getLogger("moe")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)


def _fail(message: str) -> None:
    one_line = " ".join(part.strip() for part in message.splitlines() if part.strip())
    typer.echo(f"error: {one_line}", err=True)
    sys.exit(2)


# A file a user named that cannot be read: bad input (exit 2), said in one line. Other OSErrors
# (an I/O error of the disk) are not the user's to fix, and stay tracebacks.
_READ_ERRNOS = frozenset(
    {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENODEV, errno.ENXIO, errno.ENAMETOOLONG}
)


def main(argv: list[str] | None = None) -> None:
    """Entry point: typer runs in standalone mode (so `--help` exits 0 and usage errors are
    click's own, exit 2); user errors become one line on stderr and exit code 2."""
    from moe.runtime.progress import quiet_third_party_output

    _register_commands()
    _show_warnings()
    quiet_third_party_output()  # in a log: no Hugging Face bars, and one known warning less
    try:
        app(args=argv, prog_name="lora-moe")
    except MoeError as e:
        _fail(str(e))
    except TrainingStopped as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(EXIT_STOPPED)
    except ValidationError as e:  # a config built inside a command; boundaries convert theirs
        _fail(validation_message(e, None))
    except OSError as e:
        error = write_error(e.filename or "the output", e)
        if error is None and e.errno in _READ_ERRNOS and e.filename:
            error = f"cannot read {e.filename}: {e.strerror}; check the path"
        if error is None:
            raise
        _fail(str(error))
