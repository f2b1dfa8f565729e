"""Run eca_flax's commands in a fresh Python where TensorFlow (or other packages) cannot be
imported.

The hook makes ``tensorflow`` look uninstalled (its finders answer None), which is what a
machine without TensorFlow looks like to TFDS and etils; raising ImportError from the finder
instead breaks their ``importlib.util.find_spec`` probes. ``hook(*names)`` does the same for
other top-level packages (orbax, torch, ...).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

_HOOK = """
import sys

class _Uninstalled:
    def __init__(self, inner):
        self._inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return None
        find = getattr(self._inner, "find_spec", None)
        return find(name, path, target) if find else None

    def invalidate_caches(self):
        getattr(self._inner, "invalidate_caches", lambda: None)()

    def find_distributions(self, *args, **kwargs):  # importlib.metadata: versions stay readable
        find = getattr(self._inner, "find_distributions", None)
        return find(*args, **kwargs) if find else iter(())

sys.meta_path[:] = [_Uninstalled(f) for f in sys.meta_path]
"""


def hook(*names: str) -> str:
    """Python code that makes the top-level packages ``names`` look uninstalled from then on."""
    return _HOOK.replace("BLOCKED", repr(frozenset(names)))


HOOK = hook("tensorflow")

RUN = """
import atexit, runpy, sys
atexit.register(lambda: print("tensorflow imported:", "tensorflow" in sys.modules, file=sys.stderr))
target, sys.argv = sys.argv[1], sys.argv[1:]
if target.endswith(".py"):
    runpy.run_path(target, run_name="__main__")
else:
    runpy.run_module(target, run_name="__main__", alter_sys=True)
"""


def run(target: str, *args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``python -m target args`` (or ``python target.py args``) without TensorFlow, from the
    repository root. stderr ends with 'tensorflow imported: False' when nothing imported it."""
    return subprocess.run(
        [sys.executable, "-c", HOOK + RUN, target, *args],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
