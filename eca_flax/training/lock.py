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
_HELD: set[str] = set()  # the lock files this process holds (its own pid in one it does not)


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

    A lock left behind is reported in one line and taken over: one whose process is gone (same
    host, no such pid), one holding this process's own pid that this process does not hold (a
    restarted container reuses its pid and hostname), and one that cannot be read. One held by
    a live process, or by another host, stops this run with a line saying whose it is.
    """

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
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
                f.write(json.dumps(me))  # one write: a reader sees it whole, or briefly empty
            self.held = True
            _HELD.add(self.path)
            return self
        raise ConfigError(f"{self.path}: could not take the workdir lock")

    def _check_owner(self, me: dict) -> None:
        """Returns once a lock left behind is removed; raises if its owner may still run."""
        try:
            owner, problem = _read_owner(self.path)
        except FileNotFoundError:  # its run just ended: try again
            return
        if owner is None:
            self._take_over(f"{self.path} is unreadable ({problem})")
            return
        host, pid = owner["host"], owner["pid"]
        if host == me["host"] and pid == me["pid"] and self.path not in _HELD:
            self._take_over(f"{self.path}: left by pid {pid} on {host}, this process's own pid")
            return
        if host == me["host"] and pid != me["pid"] and not _alive(pid):
            self._take_over(f"{self.path}: left by pid {pid} on {host}, which no longer runs")
            return
        raise ConfigError(
            f"workdir {os.path.dirname(self.path)} is in use by pid {pid} on {host} (since "
            f"{owner.get('since', '?')}); wait for that run, or delete {self.path} if it is gone"
        )

    def _take_over(self, why: str) -> None:
        logger.warning(f"{why}: taking the workdir over")
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def __exit__(self, *exc: object) -> None:
        if self.held:
            _HELD.discard(self.path)
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            self.held = False


def _read_owner(path: str) -> tuple[dict | None, str]:
    """(the lock's {"host", "pid", ...}, "") or (None, why it cannot be read); FileNotFoundError
    when it is gone. A lock being written (created, its one write not yet done) is read again
    after a moment."""
    for attempt in range(2):
        try:
            with open(path) as f:
                owner = json.load(f)
        except FileNotFoundError:
            raise
        except OSError as e:
            return None, e.strerror or str(e)
        except ValueError:
            owner = None
        if isinstance(owner, dict):
            if isinstance(owner.get("host"), str) and type(owner.get("pid")) is int:
                return owner, ""
            return None, "no host and pid"
        if not attempt:
            time.sleep(0.5)
    return None, "not the JSON of a lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
