"""Helpers for fault tests: a real full disk (``run_on_small_disk``: a command runs with a tmpfs
of a chosen size mounted over a directory, in its own user and mount namespace, ``unshare
-rm``: no root needed, nothing left mounted; skipped where the kernel does not allow it),
commands that take Ctrl-C as in a terminal (``popen_interruptible``), the processes a command
started (``process_tree``, ``running``: from /proc) and a free port for a coordinator."""

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
