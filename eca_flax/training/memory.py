"""What a compiled XLA program needs and what a device has, in bytes (no JAX import: the
benchmark's package reads it too)."""

from __future__ import annotations

import math
from typing import Any


def buffer_bytes(compiled: Any) -> float:
    """Bytes of the buffers a compiled program uses on one device: arguments, outputs and
    temporaries, less outputs aliased to (donated) arguments. NaN where the backend has no
    memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # Not implemented by every backend / jax version.
        return math.nan
    if m is None:
        return math.nan
    return float(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


def device_memory(device: Any) -> int | None:
    """The most memory ``device`` can give one program: its allocator's limit (GPU, TPU); for
    a CPU device, the host's memory and swap (a container's limit where lower), which all CPU
    devices of the process share. None where it cannot be read."""
    if device.platform != "cpu":
        try:
            return int((device.memory_stats() or {})["bytes_limit"])
        except (KeyError, TypeError, ValueError, RuntimeError):  # RuntimeError: jax's
            return None
    try:
        with open("/proc/meminfo") as f:
            kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)}
    except (OSError, ValueError, IndexError):
        return None
    swap = 1024 * kib.get("SwapTotal", 0)
    host = 1024 * kib["MemTotal"] + swap if "MemTotal" in kib else None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:  # cgroup v2: "max" or bytes
            limit = int(f.read()) + swap
    except (OSError, ValueError):
        return host
    return limit if host is None else min(host, limit)
