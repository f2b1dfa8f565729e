"""The workdir of a training run: created (or checked) before anything is written, and locked so
that one run at a time uses it."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time

import jax

from eca_flax.errors import ConfigError
from eca_flax.training.checkpoints import CHECKPOINT_DIR
from eca_flax.training.reporting import logger

LOCK_FILE = "train.lock"


def prepare_workdir(workdir: str) -> str:
    """The absolute workdir, created if missing; ConfigError when it is a file."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--workdir {path} is a file, not a directory")
    root = os.path.join(path, CHECKPOINT_DIR)
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConfigError(f"{root} is a file; checkpoints go into a directory of that name")
    os.makedirs(path, exist_ok=True)
    return path


class WorkdirLock:
    """One run per workdir: an advisory lock file with the owner's host and pid (process 0).

    A lock whose process is gone (same host, no such pid) is reported and taken over; one held
    by a live process, or by another host, stops this run with a line saying whose it is.
    """

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, LOCK_FILE)
        self.held = False

    def __enter__(self) -> WorkdirLock:
        if jax.process_index() != 0:
            return self
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%c")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._check_owner(me)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise ConfigError(f"{self.path}: could not take the workdir lock")

    def _check_owner(self, me: dict) -> None:
        try:
            with open(self.path) as f:
                owner = json.load(f)
        except (OSError, ValueError):
            owner = {}
        host, pid = owner.get("host", "?"), owner.get("pid", "?")
        if host == me["host"] and isinstance(pid, int) and not _alive(pid):
            logger.warning(
                f"{self.path}: left by pid {pid} on {host}, which no longer runs: "
                "taking the workdir over"
            )
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            return
        raise ConfigError(
            f"workdir {os.path.dirname(self.path)} is in use by pid {pid} on {host} (since "
            f"{owner.get('since', '?')}); wait for that run, or delete {self.path} if it is gone"
        )

    def __exit__(self, *exc: object) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
