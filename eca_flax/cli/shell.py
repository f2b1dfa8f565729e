"""The one entry of the command lines: the process behaviour a program installs and the library
never, and how a command's end becomes its output and exit status.

``run(body)`` installs ``unraisable``'s hook and log filters, runs ``body`` and turns its end
into an exit status: 0; 1 for an ``eca_flax.Error`` or an OSError, printed as one line
``error: ...`` (``ECA_FLAX_TRACEBACK=1`` prints the traceback above it); 130 for Ctrl-C, printed as
one line (the ``Interrupted`` message of a training run, else the command's own).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator

from eca_flax import errors
from eca_flax.cli import unraisable

TRACEBACK_ENV = "ECA_FLAX_TRACEBACK"


_sigint: list[int] = []  # the SIGINTs that came (Python's Ctrl-C handler, counting), and the
# SIGTERMs taken as Ctrl-C (sigterm_as_ctrl_c)


def _on_sigint(signum: int, frame: object) -> None:
    _sigint.append(signum)
    raise KeyboardInterrupt


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one: the first's clean-up runs
    _sigint.append(signum)
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM inside the block stops the command as Ctrl-C does: a KeyboardInterrupt, so what
    was half-written is removed (exit 130, one line); a second SIGTERM is ignored while that
    removal runs. A SIGTERM that is ignored or handled already stays so; main thread only."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def ctrl_c_deferred() -> Iterator[None]:
    """Ctrl-C inside the block is held until the block ends, then raised there: raised inside
    an extension module's import (jaxlib's, while Python loads JAX) it can crash the
    interpreter (SIGSEGV, measured) or print an import's traceback. Main thread only; an
    ignored SIGINT stays ignored."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    ):
        yield
        return
    came: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: came.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _sigint.extend(came)  # by_ctrl_c: an error the block raised after it came is Ctrl-C's
    if came:
        raise KeyboardInterrupt


def install() -> None:
    """The command lines' process behaviour (idempotent): ``unraisable.install``, and Python's
    Ctrl-C handler counting what comes (an ignored SIGINT, as in background jobs, stays so)."""
    unraisable.install()
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _on_sigint)


def error_line(error: BaseException, where: str | None = None) -> str:
    """``error: <the message on one line>``; with ``where``, an OSError as ``FILE: reason`` (its
    file, else ``where``)."""
    message = str(error)
    if where is not None and isinstance(error, OSError) and error.strerror:
        message = f"{error.filename or where}: {error.strerror}"
    return f"error: {' '.join(message.split())}"


def report(line: str, error: BaseException | None = None) -> None:
    """One line on stderr (flushed: it is a program's last word); with ECA_FLAX_TRACEBACK=1 the
    traceback of ``error`` before it."""
    if error is not None and os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        traceback.print_exception(error, file=sys.stderr)
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)


def by_ctrl_c(error: BaseException) -> bool:
    """Whether Ctrl-C caused ``error``: a KeyboardInterrupt, or any exception after a SIGINT
    came (one during an extension's import becomes an ImportError: numpy's, jaxlib's)."""
    if _sigint:
        return True
    while error is not None:
        if isinstance(error, KeyboardInterrupt):
            return True
        error = error.__cause__ or error.__context__
    return False


def run(
    body: Callable[[], object], *, interrupted: str = "interrupted", where: str | None = None
) -> int:
    """``body()``'s exit status (what it returns if an int, else 0), its user errors and Ctrl-C
    reported in one line (``interrupted``: the line for Ctrl-C; ``where``: what an OSError
    without a file name is about)."""
    install()
    _sigint.clear()  # this run's (in-process callers, the tests, run several)
    try:
        code = body()
        return code if isinstance(code, int) else 0
    except errors.Interrupted as e:
        report(f"interrupted: {e}", e)
        return 130
    except KeyboardInterrupt as e:
        report(interrupted, e)
        return 130
    except (errors.Error, OSError) as e:
        report(error_line(e, where), e)
        return 1
    except Exception as e:
        if by_ctrl_c(e):
            report(interrupted, e)
            return 130
        raise


def exit_now(code: int) -> None:
    """Ends the process at once with ``code``, output flushed: after Ctrl-C in a training run,
    finalizing with JAX's threads cut mid-way can crash the interpreter."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
