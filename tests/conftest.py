"""Test-wide settings, set before jax starts: 8 simulated CPU devices, train.py's XLA flags."""

import contextlib
import os
import shutil
import sys
import tempfile

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run: every pytest-xdist worker (their parent is
# the controller) and every train.py they start. Most of the suite's time is XLA compiling, and
# many tests compile the same programs (the quick-start model's steps); removed at the end.
RUN = os.getppid() if "PYTEST_XDIST_WORKER" in os.environ else os.getpid()
JAX_CACHE = os.path.join(tempfile.gettempdir(), f"eca_flax-tests-{RUN}", "jax_cache")
os.environ["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
# Every program, the small eager ones too (at XLA's defaults one random initialiser compiles in
# 0.2-0.9 s): each is compiled once per run instead of once per worker.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from eca_flax.cli import xla_flags  # noqa: E402

xla_flags.use_recommended()  # Tests run with the XLA:CPU flags train.py sets.

sys.path.insert(0, os.path.dirname(__file__))  # tests import torch_reference and fixtures


# The longest tests, longest first (--durations on 2 cores; each over 25 s of one worker).
# pytest-xdist hands tests out one at a time (--maxschedchunk=1, pyproject.toml) in the order
# sorted below, so these start at once and the short ones fill the other worker around them:
# no long test starts last and runs alone.
LONGEST = (
    "test_train.py::test_two_processes_train_like_one_and_resume_after_losing_one",
    "test_gpu_check.py::test_gpu_check_dry_run",
    "test_train.py::test_sigterm_sigkill_resume_equals_uninterrupted",
    "test_train.py::test_quickstart_reaches_97_percent",
    "test_faults.py::test_out_of_memory_is_one_line_and_leaves_the_workdir_as_it_was",
    "test_timm.py::test_rsb_a3_config_trains_a_step",
    "test_timm.py::test_hub_folder_converts_and_matches_reference[ecaresnet269d]",
    "test_train.py::test_eight_devices_train_like_one",
    "test_train.py::test_rsb_a3_resume_equals_uninterrupted",
    "test_detection_v1.py::test_predict_and_evaluate_commands",
    "test_detection_v1.py::test_r50_detectors_equal_v1_reference[mask_rcnn-k_size1]",
    "test_detection_v1.py::test_r101_detector_equals_v1_reference",
)


def pytest_collection_modifyitems(items: list) -> None:
    """LONGEST first, then the other slow tests (whole trainings, subprocesses) in their files'
    order, then the rest."""

    def rank(item) -> tuple[int, int]:
        place = next((i for i, n in enumerate(LONGEST) if item.nodeid.endswith(n)), len(LONGEST))
        return place, item.get_closest_marker("slow") is None

    items.sort(key=rank)


@contextlib.contextmanager
def _compiling_fast():
    """XLA compiles for compile speed in this process (faults.FAST_COMPILE's options, through
    jax_disable_most_optimizations); after, the in-memory compiled programs are dropped so that
    no later test runs one of them (the persistent cache keys them apart)."""
    import jax

    if _FAST:  # the module's already
        yield
        return
    jax.config.update("jax_disable_most_optimizations", True)
    _FAST.append(True)
    try:
        yield
    finally:
        _FAST.clear()
        jax.config.update("jax_disable_most_optimizations", False)
        jax.clear_caches()


_FAST: list[bool] = []  # set while _compiling_fast() is in effect


def _compiling_fast_if_marked(node):
    """``_compiling_fast()`` where ``node`` (a module or a test) has the fast_compile marker."""
    marked = node.get_closest_marker("fast_compile") is not None
    return _compiling_fast() if marked else contextlib.nullcontext()


@pytest.fixture(autouse=True, scope="module")
def _fast_compile_module(request):
    """``pytestmark = pytest.mark.fast_compile``: the module's fixtures and tests compile so."""
    with _compiling_fast_if_marked(request.node):
        yield


@pytest.fixture(autouse=True)
def _fast_compile_test(request):
    """``@pytest.mark.fast_compile`` on a test: the trainer's behaviour is its subject, not the
    numbers of the network (the numeric parity tests keep XLA's defaults, as users run them)."""
    with _compiling_fast_if_marked(request.node):
        yield


def pytest_runtest_setup(item) -> None:
    """PyTorch on one thread in each test (the benchmark sets its own: all cores): pytest-xdist
    already runs a test per core, and PyTorch's OpenMP threads that find the other core busy
    spin at their barriers (a forward of ecaresnet101d beside a busy core: 5.3 CPU-s on 2
    threads, 1.0 on one). Not OMP_NUM_THREADS: that also changes numpy's BLAS, whose float32
    rounding the detectors' reference (random heads) is sensitive to."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def pytest_sessionfinish(session, exitstatus) -> None:
    """The controller (or a run without workers) removes the run's compilation cache."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(os.path.dirname(JAX_CACHE), ignore_errors=True)
