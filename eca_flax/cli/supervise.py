"""A multi-process run's processes, each guarded: train.py with ``--config.distributed=True``
runs the trainer as its child, and turns the child's end into one line when it cannot say it.

When a process of a multi-process run dies, JAX's runtime ends the others itself: the
coordination service misses its heartbeats (``distributed_heartbeat_s``), or a survivor loses
the coordinator or a collective's peer, and aborts the process from C++ with a check failure
and a stack dump (exit 134), which no Python code in that process outlives. So the trainer
child writes what goes to file descriptor 2 (JAX's and XLA's C++ logs, Python's fatal-error
dumps) to a runtime log, while its own lines still reach the terminal; and the parent, which
only waits, forwards signals and reads that log afterwards, prints the one line: which process
was lost, the last good checkpoint, where the log is.

The child is in a process group of its own (Ctrl-C reaches the parent, which passes each
signal on exactly once) and dies with the parent (Linux's parent-death signal: a ``kill -9`` of
what the user started ends the trainer too).
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable

from eca_flax import errors
from eca_flax.cli import shell

LOG_ENV = "ECA_FLAX_RUNTIME_LOG"  # set for the child: where its file descriptor 2 goes
PARENT_ENV = "ECA_FLAX_SUPERVISOR_PID"
CRASHED = 70  # the child's exit status after an unexpected exception (its traceback: the log)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)


_child: list[bool] = []  # [True] once to_log ran: this process is the supervised trainer


def is_child() -> bool:
    """Whether this process is a supervised trainer (train.py then installs ``to_log``)."""
    return bool(_child) or LOG_ENV in os.environ


def to_log() -> None:
    """In the child, before absl and JAX load: file descriptor 2 to the runtime log, Python's
    ``sys.stderr`` (logging, the error lines) on a copy of the terminal's; it dies with its
    parent. ``dumps_to_log`` again once absl's app.run has enabled faulthandler. The variables
    that say so leave the environment: the processes it starts (grain's workers run train.py's
    top level again) are not supervised trainers."""
    path, parent = os.environ.pop(LOG_ENV), int(os.environ.pop(PARENT_ENV, "0"))
    _child.append(True)
    _die_with_parent(parent)
    terminal = os.dup(2)
    log = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log, 2)
    os.close(log)
    sys.stderr = open(  # noqa: SIM115 - the process's stderr from now on
        terminal, "w", buffering=1, encoding="utf-8", errors="backslashreplace"
    )
    dumps_to_log()


def dumps_to_log() -> None:
    """Python's fatal-error dumps (faulthandler: an abort's thread stacks) to the runtime log."""
    faulthandler.enable(file=sys.__stderr__, all_threads=True)  # fd 2


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the parent (the supervisor) ends: prctl(PR_SET_PDEATHSIG) on Linux; ends now
    if it already has (it was then no longer ``parent``)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:
        os._exit(1)


def guarded(body: Callable[[], object]) -> Callable[[], object]:
    """``body`` for ``shell.run`` in the child: an unexpected exception (a collective that lost
    its peer raises one) is written with its traceback to the runtime log and ends the process
    at once with CRASHED, for the parent to name; eca_flax's errors and Ctrl-C stay shell's."""

    def run() -> object:
        try:
            return body()
        except (errors.Error, OSError, KeyboardInterrupt):
            raise
        except Exception as e:
            if shell.by_ctrl_c(e):
                raise
            traceback.print_exception(e, file=sys.__stderr__)
            sys.__stderr__.flush()
            shell.exit_now(CRASHED)
        return None

    return run


def run(argv: list[str], workdir: str, last_good: Callable[[str], str | None]) -> int:
    """Runs ``argv`` (the interpreter's arguments of this command, ``sys.orig_argv[1:]``) as the
    guarded child and returns the exit status: the child's own when it said its word (0, 1,
    130), else 1 after the one line naming what was lost. ``last_good(workdir)``: the workdir's
    last good checkpoint (None: none), for that line. The runtime log is kept in the workdir
    after a crash or a finished run (when not empty), else removed."""
    fd, log = tempfile.mkstemp(prefix="eca_flax-runtime-", suffix=".log")
    os.close(fd)
    env = dict(os.environ, **{LOG_ENV: log, PARENT_ENV: str(os.getpid())})
    pending: list[int] = []
    child: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        if child is None:
            pending.append(signum)
        else:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        child = subprocess.Popen([sys.executable, *argv], env=env, process_group=0)
        for signum in pending:
            child.send_signal(signum)
        code = child.wait()  # SIGINT too is forwarded: no KeyboardInterrupt here
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code in (0, 1, 130):  # the child's own end, its line said
        _keep_or_remove(log, workdir, keep=code == 0)
        return code
    kept, text = _keep_or_remove(log, workdir, keep=True), ""
    if kept is not None:
        with open(kept, errors="replace") as f:
            text = f.read()
    if os.environ.get(shell.TRACEBACK_ENV, "") not in ("", "0"):
        sys.stderr.write(text)
    good = last_good(workdir)
    again = f"the last good checkpoint is {good}: start" if good else "no checkpoint: start"
    wrote = f"what JAX's runtime wrote is in {kept}" if kept else "JAX's runtime wrote nothing"
    shell.report(
        f"error: {describe_end(code, text, os.environ)}; {again} every process again"
        f"{' to resume from it' if good else ''}; {wrote}"
    )
    return 1


def runtime_log_name(environ: os._Environ | dict) -> str:
    """runtime.processI.log (JAX_PROCESS_ID=I), else runtime.log (the cluster numbers them)."""
    index = environ.get("JAX_PROCESS_ID")
    return f"runtime.process{index}.log" if index else "runtime.log"


def _keep_or_remove(log: str, workdir: str, keep: bool) -> str | None:
    """Where the runtime log is kept (``keep`` and not empty: moved into the workdir, or left
    in the temporary folder when there is no workdir), or None: removed."""
    if not keep or not os.path.getsize(log):
        os.remove(log)
        return None
    if os.path.isdir(workdir):
        kept = os.path.join(workdir, runtime_log_name(os.environ))
        shutil.move(log, kept)
        return kept
    return log


def describe_end(code: int, log: str, environ: os._Environ | dict) -> str:
    """What ended the child, from its exit status and what JAX's runtime logged: "process I of
    N: process J was lost" (its heartbeats stopped, or a collective lost it), "...: the
    coordinator (process 0 at ADDRESS) was lost", else the signal or the exception."""
    me, count = environ.get("JAX_PROCESS_ID", "?"), environ.get("JAX_NUM_PROCESSES", "?")
    who = f"process {me} of {count}"
    lost = _lost_process(log, me, count)
    if lost is not None:
        coordinator = environ.get("JAX_COORDINATOR_ADDRESS")
        if lost == "0" or lost == "coordinator":
            lost = "the coordinator (process 0" + (f" at {coordinator})" if coordinator else ")")
        elif lost != "another process":
            lost = f"process {lost}"
        return f"{who}: {lost} was lost, and JAX's runtime stopped this one"
    if code == CRASHED:
        last = [line for line in log.strip().splitlines() if line.strip()]
        return f"{who} failed: {last[-1].strip() if last else 'no traceback'}"
    if code < 0:
        name = signal.Signals(-code).name
        return f"{who} ended by {name}" + (" (out of host memory?)" if name == "SIGKILL" else "")
    return f"{who} ended with exit status {code}"


# What JAX's runtime logs (C++) when it stops a survivor, as of jax 0.10 to 0.12.
_HEARTBEATS = re.compile(r"stopped sending heartbeats\)?:?(.*?)(?:The tasks|$)", re.S)
_COORDINATOR = ("Failed to send RPC to coordination service", "leader task")
_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def _lost_process(log: str, me: str, count: str) -> str | None:
    """The process the runtime lost ("1", "coordinator", "another process"), or None."""
    if match := _HEARTBEATS.search(log):
        named = match.group(1)[:500]  # task names (/job:.../task:1), or numbers on a line
        first = next((line for line in named.splitlines() if line.strip()), "")
        found = re.findall(r"task:(\d+)", named) or re.findall(r"\d+", first)
        ids = sorted({int(i) for i in found})
        return ", ".join(map(str, ids)) if ids else "another process"
    if me != "0" and any(s in log for s in _COORDINATOR):
        return "coordinator"
    if "Gloo" in log and any(s in log for s in _PEER) or "distributed service detected" in log:
        if count == "2" and me in ("0", "1"):
            return "1" if me == "0" else "coordinator"
        return "another process"
    return None
