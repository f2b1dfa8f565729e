"""Helpers for fault tests: a real full disk (``run_on_small_disk``: a command runs with a tmpfs
of a chosen size mounted over a directory, in its own user and mount namespace, ``unshare
-rm``: no root needed, nothing left mounted; skipped where the kernel does not allow it), and
commands that take Ctrl-C as in a terminal (``popen_interruptible``)."""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import signal
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
