"""Test-wide settings, set before jax starts: 8 simulated CPU devices, train.py's XLA flags."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from eca_flax.cli import xla_flags  # noqa: E402

xla_flags.use_recommended()  # Tests run with the XLA:CPU flags train.py sets.

sys.path.insert(0, os.path.dirname(__file__))  # tests import torch_reference and fixtures


def pytest_collection_modifyitems(items: list) -> None:
    """The slow tests (whole trainings, subprocesses: a minute or two each) first, in their
    files' order, then the rest: pytest-xdist hands tests out in this order, so the long ones
    start while the short ones can still fill the other workers (no lone long test at the end)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
