"""SIGTERM and Ctrl-C in a training run: the command line's signal handlers, which ask the loop
to finish its step, save and stop (``training.loop.StopRequests``)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

from eca_flax.cli import shell
from eca_flax.training.reporting import logger


class Preemption:
    """SIGTERM and Ctrl-C: the loop finishes its step, saves, waits for the save and stops.

    A second Ctrl-C stops at once (KeyboardInterrupt), without saving. Ctrl-Cs are counted as
    they arrive, by a thread reading Python's signal wakeup fd: Python runs a handler only once
    the main thread is back from a wait in C++ (a training step), and two Ctrl-Cs during one
    wait ran it once, so the second was taken for the first. With several processes, JAX's
    preemption sync point makes all of them stop at the same step (jax.distributed catches
    SIGTERM on any host); Ctrl-C on one host is passed to it as a SIGTERM of that process, so
    the others stop at that step too. Alone, a flag says it.
    """

    def __init__(self) -> None:
        self.multihost = jax.process_count() > 1
        self.signal: str | None = None
        self._announced = False
        self._previous: dict[int, Any] = {}
        self._ctrl_c = 0  # counted by the watcher thread
        self._raised = False  # the second Ctrl-C's KeyboardInterrupt, raised once
        self._wakeup: tuple[int, int, int] | None = None  # (read end, write end, previous fd)
        self.synced = False  # stopped at JAX's preemption sync point, with the other processes

    def outside_the_loop(self) -> contextlib.AbstractContextManager:
        """Around the whole run: SIGTERM before the loop (writing ``digits:N``, building,
        compiling) and after it stops the run as Ctrl-C there does (``shell.sigterm_as_ctrl_c``:
        what was half-written is removed, exit 130), not by the signal's default, which leaves
        it behind. With several processes SIGTERM stays jax.distributed's."""
        return contextlib.nullcontext() if self.multihost else shell.sigterm_as_ctrl_c()

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT] + ([] if self.multihost else [signal.SIGTERM])
            self._previous = {s: signal.signal(s, self._handle) for s in signals}
            read, write = os.pipe()
            os.set_blocking(write, False)
            previous = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
            self._wakeup = (read, write, previous)
            watcher = threading.Thread(
                target=self._watch, args=(read,), name="eca_flax-signals", daemon=True
            )
            watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        if self._wakeup is not None:
            read, write, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(write)  # the watcher reads the end of the pipe and ends; it closes read
            self._wakeup = None

    def _watch(self, read: int) -> None:
        """The watcher thread: each signal's number, written by Python's C-level handler as
        the signal arrives, whatever the main thread is doing."""
        try:
            while data := os.read(read, 64):
                for signum in data:
                    if signum == signal.SIGINT:
                        self._count_ctrl_c()
                    elif signum == signal.SIGTERM:
                        self.signal = self.signal or "SIGTERM"
        finally:
            os.close(read)

    def _count_ctrl_c(self) -> None:
        self._ctrl_c += 1
        if self._ctrl_c == 1:
            self.signal = "Ctrl-C"
            if self.multihost:  # JAX's preemption notice, which every process stops on
                os.kill(os.getpid(), signal.SIGTERM)
        elif self._ctrl_c == 2:  # the main thread's handler raises it: a real SIGINT to that
            # thread, which also ends a wait it is blocked in (a save in flight: a lock), where
            # _thread.interrupt_main only marks the signal for when the wait is over, the save
            # done. (It comes back here as a third Ctrl-C, which does nothing.)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def _handle(self, signum: int, frame: Any) -> None:
        """The main thread's handler: the watcher counts; the second Ctrl-C raises here."""
        if signum == signal.SIGINT and self._ctrl_c >= 2 and not self._raised:
            self._raised = True
            raise KeyboardInterrupt

    def requested(self, step: int) -> bool:
        if self.signal == "Ctrl-C" and not self._announced:  # not in the handler: a log line
            self._announced = True  # there could land inside another write to the stream
            logger.warning(
                "Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again "
                "stops at once, without saving)"
            )
        if not self.multihost:
            return self.signal is not None
        try:  # every process stops at the step the sync point agrees on
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = self.signal or "SIGTERM"
                self.synced = True
                return True
            return False
        except RuntimeError:  # No preemption service in this JAX setup.
            self.multihost = False
        return self.signal is not None

    def leave_together(self) -> None:
        """After a Ctrl-C that stopped every process at the sync point, saved: leave
        jax.distributed as the others do when they exit (their SIGTERM path), so that they end
        cleanly; ending this one without it made them report it lost. Not after a second
        Ctrl-C (the others did not stop: they report this one lost)."""
        if self.synced and not self._raised:
            with contextlib.suppress(Exception):
                jax.distributed.shutdown()
