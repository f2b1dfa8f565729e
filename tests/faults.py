"""Helpers for fault tests: a real full disk (``run_on_small_disk``: a command runs with a tmpfs
of a chosen size mounted over a directory, in its own user and mount namespace, ``unshare
-rm``: no root needed, nothing left mounted; skipped where the kernel does not allow it),
commands that take Ctrl-C as in a terminal (``popen_interruptible``), the processes a command
started (``process_tree``, ``running``: from /proc), a free port for a coordinator, and the
environment of the train.py runs these tests start (``trainer_env``)."""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

# XLA:CPU options for the train.py runs of tests whose subject is the trainer's behaviour
# (signals, processes, resume, faults), never for numeric parity or the quick start: users run
# XLA's defaults. A train.py run of test_eca_resnet spends 21 s of CPU with the defaults and
# 12 s with these (less optimised code: its steps run slower, which a few steps of the tiny
# model do not feel); with the programs in the compilation cache, 6 s either way.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def trainer_env(devices: int, fast_compile: bool = True, **extra: str) -> dict[str, str]:
    """The environment of a train.py a test starts: ``devices`` CPU devices, the run's shared
    compilation cache (conftest.py) for every program, ``FAST_COMPILE``, and ``extra``."""
    flags = [f"--xla_force_host_platform_device_count={devices}"]
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        XLA_FLAGS=" ".join(flags + list(FAST_COMPILE if fast_compile else ())),
    )
    env.update(extra)
    return env


_SCRIPT = """
mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99
disk=$2; listing=$3; shift 3
{setup}
"$@"; rc=$?
(cd "$disk" && find . -mindepth 1 | sort) > "$listing"
exit $rc
"""


@functools.cache
def available() -> bool:
    """Whether this machine lets a process mount a tmpfs in a namespace of its own."""
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as tmp:
        probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {tmp}"]
        return subprocess.run(probe, capture_output=True).returncode == 0


def run_on_small_disk(
    cmd: list[str],
    disk: pathlib.Path,
    size: int,
    *,
    setup: str = "",
    cwd: os.PathLike | str | None = None,
    env: dict | None = None,
    timeout: float = 300,
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """``cmd`` with a ``size``-byte tmpfs at ``disk`` (after the shell commands ``setup``, which
    may fill it, e.g. ``cp -a OLD "$disk"/x``); returns the finished process and the paths left
    on the disk after it (relative, sorted). Skips the test where namespaces are not allowed."""
    if not available():
        pytest.skip("needs unshare -rm (user and mount namespaces) for a small tmpfs")
    disk.mkdir(parents=True, exist_ok=True)
    listing = disk.parent / f"{disk.name}.listing"
    script = _SCRIPT.format(setup=setup)
    proc = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", str(size), str(disk), str(listing), *cmd],
        cwd=cwd,
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    assert proc.returncode != 99, f"could not mount the tmpfs: {proc.stderr}"
    return proc, listing.read_text().split()


def popen_interruptible(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``subprocess.Popen`` whose child handles SIGINT as in a terminal, even when this process
    ignores it (pytest started in the background, CI): an ignored signal is inherited, so the
    child resets it to the default before exec (a handler set in the parent around Popen was
    measured not to reach the child on Python 3.13)."""
    return subprocess.Popen(
        cmd, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (a coordinator's)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_tree(root: int) -> dict[tuple[int, int], str]:
    """The live descendants of ``root``: (pid, start time) -> command line, from /proc."""
    parents, tree = {}, {}
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := proc_stat(int(entry.name))) is not None:
            parents.setdefault(stat[0], []).append((int(entry.name), stat[2]))
    todo = [root]
    while todo:
        for pid, start in parents.get(todo.pop(), []):
            try:
                cmdline = (pathlib.Path("/proc") / str(pid) / "cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            tree[(pid, start)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
            todo.append(pid)
    return tree


def proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time in clock ticks) of ``pid``; None once it is gone."""
    try:
        text = (pathlib.Path("/proc") / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after the command name, which may hold ")"
    return int(fields[1]), fields[0], int(fields[19])


def running(pid: int, start: int) -> bool:
    """Whether the process ``pid`` started at ``start`` still runs (a zombie has exited: it
    holds no memory, only its exit status, until its new parent reaps it)."""
    stat = proc_stat(pid)
    return stat is not None and stat[1] != "Z" and stat[2] == start
