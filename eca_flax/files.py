"""Writing output files safely: atomically, with the umask's mode, through Ctrl-C and full disks.

Every writer of weights goes through ``write_file`` (.safetensors and .pth files) or
``write_directory`` (pretrained directories): a failure is one line naming the path, and leaves
nothing behind (or the previous output, untouched). Standard library only: cheap to import.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def one_line(error: BaseException) -> str:
    """'Type: first line of the message' (at most 300 characters, without the spec dump
    TensorStore appends), for one-line errors."""
    first = (str(error).strip().splitlines() or [""])[0]
    first = re.split(r"\.? *(?:See full TensorStore details|\[tensorstore_spec)", first)[0][:300]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def check_apart(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], error: type[Exception]
) -> None:
    """``error`` unless ``dst`` and ``src`` are apart: replacing a ``dst`` that is ``src``, lies
    inside it (a directory) or holds it would destroy the source being read (real paths: links
    followed)."""
    a, b = os.path.realpath(os.path.expanduser(src)), os.path.realpath(os.path.expanduser(dst))
    if a == b:
        where = "is the source"
    elif b.startswith(a.rstrip(os.sep) + os.sep):
        where = "is inside the source"
    elif a.startswith(b.rstrip(os.sep) + os.sep):
        where = "holds the source"
    else:
        return
    raise error(f"{dst}: the destination {where} {src}; write it elsewhere (nothing written)")


def remove_unfinished(path: str | os.PathLike[str], settle: float = 0.5) -> None:
    """Removes what a failed Orbax save left: TensorStore writes still in flight may land after
    a first removal, so it is removed again until the directory stays gone for ``settle`` s."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle)
        if not os.path.lexists(path):
            return


def disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is a full disk, however Orbax / TensorStore wrap it."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Ctrl-C inside the block waits for its end, so writes are never cut half-way: the block
    gets a function saying whether one came (to undo its work), and it is raised after it."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)
    if hits:
        raise KeyboardInterrupt


def private_to_umask(path: str | os.PathLike[str]) -> None:
    """A directory or file made private by mkdtemp / mkstemp gets the umask's usual mode."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def _write_safely(
    path: Path, write: Callable[[Callable[[], bool]], None], error: type[Exception]
) -> None:
    """Run ``write(interrupted)``, which writes ``path`` atomically, with Ctrl-C deferred.

    ``write`` undoes its work and raises when ``interrupted()`` says Ctrl-C came. Any other
    failure (OSError, a full disk, a library wrapping one) becomes ``error`` with one line
    saying nothing was written; ``error`` itself passes through as it is.
    """
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with deferred_interrupt() as interrupted:
            write(interrupted)
    except (KeyboardInterrupt, error):
        raise
    except Exception as e:  # noqa: BLE001 - OSError, or a library wrapping one
        reason = "no space left on the device" if disk_full(e) else one_line(e)
        kept = f"; the previous {path} is untouched" if existed else ""
        raise error(f"{path}: could not write it ({reason}); nothing written{kept}") from None


def write_file(out: Path, write: Callable[[str], None], error: type[Exception]) -> None:
    """``write(name)`` into a temporary file beside ``out``, then renamed over it: there is
    never a partial ``out``, and an existing one stays until the new one is complete. The file
    gets the umask's mode; failures are one-line ``error`` (``_write_safely``)."""

    def attempt(interrupted: Callable[[], bool]) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        try:
            write(tmp)
            private_to_umask(tmp)
            if interrupted():  # Ctrl-C came while writing: undo, then let it through
                raise KeyboardInterrupt
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    _write_safely(out, attempt, error)


def write_directory(path: Path, fill: Callable[[Path], None], error: type[Exception]) -> None:
    """``fill(tmp)`` a temporary directory beside ``path``, then renamed to ``path``: there is
    never a partial ``path``; an existing one is set aside, and removed only once the new one is
    in place (put back on failure). Modes follow the umask; failures are one-line ``error``."""

    def attempt(interrupted: Callable[[], bool]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        old = None
        try:
            private_to_umask(tmp)  # others may read what they could read of any file here
            fill(tmp)
            if interrupted():  # Ctrl-C came while writing: undo, then let it through
                raise KeyboardInterrupt
            if path.exists():
                old = tmp.with_suffix(".old")
                os.rename(path, old)
            os.rename(tmp, path)
        except BaseException:
            if old is not None and not path.exists():
                os.rename(old, path)
                old = None
            remove_unfinished(tmp)
            raise
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    _write_safely(path, attempt, error)
