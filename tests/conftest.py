"""Test-wide settings, set before jax starts: 8 simulated CPU devices, train.py's XLA flags."""

import os
import shutil
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run: every pytest-xdist worker (their parent is
# the controller) and every train.py they start. Most of the suite's time is XLA compiling, and
# many tests compile the same programs (the quick-start model's steps); removed at the end.
RUN = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"eca_flax-tests-{RUN}", "jax_cache")
os.environ["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE

from eca_flax.cli import xla_flags  # noqa: E402

xla_flags.use_recommended()  # Tests run with the XLA:CPU flags train.py sets.

sys.path.insert(0, os.path.dirname(__file__))  # tests import torch_reference and fixtures


def pytest_collection_modifyitems(items: list) -> None:
    """The slow tests (whole trainings, subprocesses: a minute or two each) first, in their
    files' order, then the rest: pytest-xdist hands tests out in this order, so the long ones
    start while the short ones can still fill the other workers (no lone long test at the end)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session, exitstatus) -> None:
    """The controller (or a run without workers) removes the run's compilation cache."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(os.path.dirname(JAX_CACHE), ignore_errors=True)
