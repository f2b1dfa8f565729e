"""Timing and what XLA says of a compiled program: the measurements every benchmark shares."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

# Dense bfloat16 peak FLOP/s of accelerators, for MFU ("device_kind" prefix -> FLOP/s).
PEAK_BF16_FLOPS = {"NVIDIA H100": 989.4e12, "NVIDIA H200": 989.4e12, "NVIDIA A100": 312e12}


def cost_flops(compiled: Any) -> float:
    """FLOPs of a compiled XLA program from its cost analysis (a dict, or a list of dicts in
    older jax versions); NaN where the backend gives none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", math.nan))


@dataclasses.dataclass
class Timer:
    """Wall time of ``fn()`` (which must wait for its result), several calls per sample."""

    name: str
    fn: Callable[[], Any]
    calls: int = 1
    samples: list[float] = dataclasses.field(default_factory=list)

    def warm_up(self, count: int, min_sample_s: float) -> None:
        """``count`` untimed calls, then enough calls per sample to last ``min_sample_s``."""
        for _ in range(count):
            self.fn()
        start = time.perf_counter()
        self.fn()
        once = time.perf_counter() - start
        self.calls = max(1, math.ceil(min_sample_s / max(once, 1e-9)))

    def sample(self) -> None:
        start = time.perf_counter()
        for _ in range(self.calls):
            self.fn()
        self.samples.append((time.perf_counter() - start) / self.calls)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan


def interleave(timers: Sequence[Timer], repeats: int, warmup: int, min_sample_s: float) -> None:
    """Warm every timer up, then take ``repeats`` samples of each, alternating between them."""
    for t in timers:
        t.warm_up(warmup, min_sample_s)
    for _ in range(repeats):
        for t in timers:
            t.sample()


def machine_description() -> str:
    """CPU model, cores, accelerator and library versions: the context every figure needs."""
    import jax
    import jaxlib

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    parts = [
        f"CPU {cpu}, {len(os.sched_getaffinity(0))} cores",
        f"jax device {device.device_kind} ({jax.default_backend()})",
        f"python {platform.python_version()}",
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}",
    ]
    try:
        import flax

        parts.append(f"flax {flax.__version__}")
    except ImportError:
        pass
    if "torch" in sys.modules:
        parts.append(f"torch {sys.modules['torch'].__version__}")
    if os.environ.get("XLA_FLAGS"):
        parts.append(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    return "; ".join(parts)


def peak_flops(dtype: str, peak_tflops: float = 0.0) -> float:
    """Peak FLOP/s for MFU: ``peak_tflops``, else a known accelerator in bfloat16, else NaN."""
    import jax

    if peak_tflops:
        return peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    if dtype == "bfloat16":
        for prefix, flops in PEAK_BF16_FLOPS.items():
            if kind.startswith(prefix):
                return flops
    return math.nan


def device_peak_bytes() -> float:
    """The default device's peak allocation so far, where the backend reports it."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("peak_bytes_in_use", math.nan))
