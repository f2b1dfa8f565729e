"""SIGTERM and Ctrl-C in a training run: the command line's signal handlers, which ask the loop
to finish its step, save and stop (``training.loop.StopRequests``)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils

from eca_flax.cli import shell
from eca_flax.training.reporting import logger


class Preemption:
    """SIGTERM and Ctrl-C: the loop finishes its step, saves, waits for the save and stops.

    A second Ctrl-C stops at once (KeyboardInterrupt), without saving. With several processes,
    JAX's preemption sync point makes all of them stop at the same step (jax.distributed catches
    SIGTERM on any host); alone, signal handlers set a flag.
    """

    def __init__(self) -> None:
        self.multihost = jax.process_count() > 1
        self.signal: str | None = None
        self._announced = False
        self._previous: dict[int, Any] = {}

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
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal == "Ctrl-C" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second one
        self.signal = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"

    def requested(self, step: int) -> bool:
        if self.signal == "Ctrl-C" and not self._announced:  # not in the handler: a log line
            self._announced = True  # there could land inside another write to the stream
            logger.warning(
                "Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again "
                "stops at once, without saving)"
            )
        if self.signal or not self.multihost:
            return self.signal is not None
        try:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = "SIGTERM"
        except RuntimeError:  # No preemption service in this JAX setup.
            self.multihost = False
        return self.signal is not None
