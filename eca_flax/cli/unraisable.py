"""Exceptions Python cannot raise anywhere ("unraisable", or asyncio tasks nobody awaits): two
kinds a user must not see.

- Ctrl-C that lands in a garbage-collector callback (JAX registers one) is printed as "Exception
  ignored in: <function _xla_gc_callback>" and lost, so the program runs on. It is delivered
  again, to the main thread, a moment later.
- A failed Orbax restore or save (a damaged checkpoint, a full disk) leaves TensorStore reads and
  writes in flight; when they end, their callbacks find Orbax's event loop closed and print
  dozens of "RuntimeError: Event loop is closed" and "Encountered error while reading array"
  tracebacks, asyncio logs "Task exception was never retrieved" for each failed write, and
  Orbax's threads log their exception with its traceback. The failure itself is raised in the
  main thread, where it becomes one line, so these echoes are dropped.

Installed by the command lines (``eca_flax.cli.shell.install``), never by importing the library;
anything else goes to the previous hook. With them, Orbax's warnings about mid-epoch checkpoints
without metrics and about items without _CHECKPOINT_METADATA (both by design in the trainer)
are dropped too.
"""

from __future__ import annotations

import _thread
import logging
import os
import sys
import threading
import time
from typing import Any

_ECHO_PACKAGES = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorstore{os.sep}")
_ORBAX_WRITES = (".orbax-checkpoint-tmp", "in OCDBT database")  # TensorStore's own words


def _in_orbax(tb: Any) -> bool:
    """Whether a traceback passes through Orbax or TensorStore."""
    while tb is not None:
        if any(p in tb.tb_frame.f_code.co_filename for p in _ECHO_PACKAGES):
            return True
        tb = tb.tb_next
    return False


def _orbax_echo(unraisable: Any) -> bool:
    """An error of an Orbax / TensorStore operation that has already failed in the main thread."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    return _in_orbax(unraisable.exc_traceback)


def _orbax_task(record: logging.LogRecord) -> bool:
    """asyncio's log filter: False for a task or future of Orbax that failed unobserved (its
    frames pass through Orbax, or the failed write it reports is in an Orbax checkpoint's
    TensorStore: a future set from C++ has no Python frames)."""
    tb = record.exc_info[2] if record.exc_info else None
    message = record.getMessage()
    return not (_in_orbax(tb) or any(p in message for p in (*_ECHO_PACKAGES, *_ORBAX_WRITES)))


def _orbax_thread(record: logging.LogRecord) -> bool:
    """absl's log filter: False for an error an Orbax thread logs (it is raised again)."""
    if record.levelno < logging.ERROR:
        return True
    tb = record.exc_info[2] if record.exc_info else None
    return _ECHO_PACKAGES[0] not in record.pathname and not _in_orbax(tb)


# Orbax's warnings by design: mid-epoch checkpoints without metrics, the items of a step
# (``model``) without _CHECKPOINT_METADATA of their own, and its preemption sync point at every
# save that meets one (the trainer says in its own line when a run stops for a SIGTERM).
_ORBAX_BY_DESIGN = ("did not provide metrics", "_CHECKPOINT_METADATA", "Reached preemption sync")


def _quiet_orbax(record: logging.LogRecord) -> bool:
    """absl's log filter: False for Orbax's warnings by design (``_ORBAX_BY_DESIGN``)."""
    message = record.getMessage()
    return not any(words in message for words in _ORBAX_BY_DESIGN)


_lost = threading.Event()  # a Ctrl-C was lost: deliver it again
_redeliver: threading.Thread | None = None


def _deliver_lost() -> None:
    """The thread that raises a lost Ctrl-C in the main thread again, once its hook returned."""
    while True:
        _lost.wait()
        time.sleep(0.05)  # the hook and the gc callback are done by then
        _lost.clear()
        _thread.interrupt_main()


def _start_redelivery() -> None:
    global _redeliver
    if _redeliver is None:
        _redeliver = threading.Thread(target=_deliver_lost, name="eca_flax-ctrl-c", daemon=True)
        _redeliver.start()


def _hook(unraisable: Any) -> None:
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        if threading.current_thread() is threading.main_thread():
            # Raised here it would be lost again: from another thread, after this returns. The
            # thread runs already (install): nothing here waits, so no Ctrl-C lands in the hook.
            _start_redelivery()
            _lost.set()
            return
    elif _orbax_echo(unraisable):
        return
    _previous(unraisable)


_previous = sys.unraisablehook


def install() -> None:
    """Route unraisable exceptions through this module (idempotent)."""
    global _previous
    _start_redelivery()
    if sys.unraisablehook is not _hook:
        _previous = sys.unraisablehook
        sys.unraisablehook = _hook
    filters = (("asyncio", _orbax_task), ("absl", _orbax_thread), ("absl", _quiet_orbax))
    for name, log_filter in filters:
        if log_filter not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(log_filter)
