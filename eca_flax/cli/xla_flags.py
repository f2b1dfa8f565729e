"""The XLA:CPU flags that make eca_flax fast on CPU, and the one place that sets them.

XLA reads ``XLA_FLAGS`` once, when jax starts its first backend. The command-line tools
(``train.py``, ``python -m eca_flax.predict``, ``python -m eca_flax.benchmark``,
``convert_torch_weights.py``) call :func:`use_recommended` before their first computation; in
your own program, call it before anything runs on a device:

    import eca_flax.cli.xla_flags
    eca_flax.cli.xla_flags.use_recommended()

Flags already named in ``XLA_FLAGS`` keep the value given there, so a user can override any of
them. Unknown flag names make XLA abort at start-up, so the flags are only added for jaxlib
versions they were measured on; other versions run with XLA's defaults. Measurements are in
docs/benchmarks.md (ECA-ResNets and MobileNetV2, 2 cores, batch 16).
"""

from __future__ import annotations

import os
from importlib import metadata

CPU_FLAGS = (
    # The default scheduler runs independent ops at the same time; on few cores their threads
    # fight and the buffers double (train step +25%, 3255 -> 1496 MiB).
    "--xla_cpu_enable_concurrency_optimized_scheduler=false",
    # Convolutions on XLA's Eigen kernels, dots (and the CPU path's matrix products) still on
    # YNNPACK: ResNet's 3x3 and 7x7 convolutions run 1.1-1.5x faster (inference 0.94x -> 1.04x
    # PyTorch, train step 0.89x -> 0.96x).
    "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",
)
# jaxlib (major, minor) versions on which every flag above exists and was measured to help:
# 0.10 on Intel Xeon and AMD EPYC, 0.11 and 0.12 on AMD EPYC (docs/benchmarks.md, "XLA flags").
MEASURED_ON = ((0, 10), (0, 11), (0, 12))


def recommended(jaxlib_version: str | None = None) -> tuple[str, ...]:
    """The flags to add for a jaxlib version (default: the installed one): ``CPU_FLAGS`` where
    they were measured, else none."""
    try:
        version = jaxlib_version or metadata.version("jaxlib")
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return ()
    return CPU_FLAGS if major_minor in MEASURED_ON else ()


def add(flags: str | tuple[str, ...] | list[str]) -> str:
    """Append ``flags`` to XLA_FLAGS, except those XLA_FLAGS already names; returns XLA_FLAGS.

    Effective only before jax starts its backend.
    """
    if isinstance(flags, str):
        flags = flags.split()
    current = os.environ.get("XLA_FLAGS", "")
    names = {f.split("=", 1)[0] for f in current.split()}
    extra = [f for f in flags if f.split("=", 1)[0] not in names]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
    return os.environ.get("XLA_FLAGS", "")


def use_recommended() -> str:
    """Add :func:`recommended` to XLA_FLAGS (keeping the user's own settings); returns it."""
    return add(recommended())
