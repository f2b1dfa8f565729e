"""Hosts, devices and shardings: plain data parallelism over every device of every process.

One ``jax.make_mesh`` axis, ``data``; parameters are replicated and batches sharded on it, so
one ``jax.jit`` step over the mesh computes BatchNorm statistics over the global batch.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from eca_flax.errors import ConfigError
from eca_flax.training.reporting import logger

DATA_AXIS = "data"
# Fields that may differ between the processes of one run: where this host finds the data and
# how many threads decode it (the batches are the same), and how long it waits at start-up.
HOST_FIELDS = ("data_dir", "data_threads", "distributed_timeout_s")


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize()`` for multi-host runs (config.distributed).

    The coordinator, process count and index come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID when set, else from the cluster (SLURM, Open MPI,
    Kubernetes, Cloud TPU) as JAX detects it. CPU processes exchange data over gloo. It says at
    once what it waits for; when the others do not answer within ``distributed_timeout_s``, the
    process ends with one ``error:`` line naming the coordinator (JAX would abort later, with a
    C++ stack trace).
    """
    if not config.distributed:
        return
    # CPU processes need a collectives backend (no-op for GPUs; the option may be absent).
    with contextlib.suppress(AttributeError, ValueError):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    for name, key in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
        if value := os.environ.get(name):
            if not value.strip().isdigit():
                raise ConfigError(f"{name}={value!r} is not a whole number")
            kwargs[key] = int(value)
    address = os.environ.get("JAX_COORDINATOR_ADDRESS", "the cluster's coordinator")
    who = f"process {kwargs.get('process_id', '?')} of {kwargs.get('num_processes', '?')}"
    timeout = int(config.distributed_timeout_s)
    logger.info(f"{who}: waiting up to {timeout} s for all processes at {address}")
    watchdog = threading.Timer(timeout, _no_coordinator, (address, who, timeout))
    watchdog.daemon = True
    watchdog.start()
    try:  # jax's own timeout later than ours: ours ends the wait with a line
        jax.distributed.initialize(
            initialization_timeout=timeout + 60,
            heartbeat_timeout_seconds=int(config.distributed_heartbeat_s),
            **kwargs,
        )
        jax.devices()  # the collectives start here (gloo needs this host's name to resolve)
    except (ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:300]
        raise ConfigError(
            f"jax.distributed could not start ({reason}); set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM / Open MPI; on CPU, "
            f"{socket.gethostname()!r} must resolve (e.g. '127.0.0.1 {socket.gethostname()}' "
            "in /etc/hosts)"
        ) from None
    finally:
        watchdog.cancel()


def _no_coordinator(address: str, who: str, timeout: int) -> None:
    """The watchdog's end: one line, exit code 1 (nothing has been written yet)."""
    print(
        f"error: {who}: no answer from {address} within {timeout} s (distributed_timeout_s); "
        "are all processes started, with the same JAX_COORDINATOR_ADDRESS and "
        "JAX_NUM_PROCESSES?",
        file=sys.stderr,
        flush=True,
    )
    os._exit(1)


def field_digests(config: ml_collections.ConfigDict) -> tuple[list[str], np.ndarray]:
    """The config's fields (less HOST_FIELDS) and a 31-bit digest of each one's value."""
    values = config.to_dict()
    names = sorted(k for k in values if k not in HOST_FIELDS)

    def digest(text: str) -> int:
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") >> 1

    return names, np.array(
        [digest(json.dumps(values[k], sort_keys=True, default=repr)) for k in names], np.int32
    )


def check_processes_agree(config: ml_collections.ConfigDict) -> None:
    """ConfigError, on every process, when the processes of a multi-process run resolved
    different configs (e.g. another ``--config.seed`` on one host): they would train together
    on different data orders or models and say nothing. The digests of the fields' values go
    through jax.distributed; the line names the fields that differ and this process's values."""
    if jax.process_count() == 1:
        return
    names, mine = field_digests(config)
    gathered = np.asarray(multihost_utils.process_allgather(mine))  # (processes, fields)
    differ = [n for n, column in zip(names, gathered.T) if (column != column[0]).any()]
    if differ:
        here = ", ".join(f"{n}={config[n]!r}" for n in differ)
        raise ConfigError(
            f"process {jax.process_index()} of {jax.process_count()}: the processes were "
            f"started with different configs: {', '.join(differ)} differ (here {here}); start "
            "every process with the same config file and --config flags"
        )


def make_mesh(devices: list[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D ``data`` mesh over ``devices`` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    kwargs: dict[str, Any] = {"devices": devices}
    if hasattr(jax.sharding, "AxisType"):  # Newer JAX defaults to Explicit axes: ask for Auto.
        kwargs["axis_types"] = (jax.sharding.AxisType.Auto,)
    return jax.make_mesh((len(devices),), (DATA_AXIS,), **kwargs)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def to_global(batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh, global_batch: int) -> dict:
    """This process's part of a batch -> global arrays sharded over the ``data`` axis."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_batch, *v.shape[1:]))
        for k, v in batch.items()
    }


def put_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Host values (identical on every process) -> arrays replicated on every device."""
    sharding = replicated(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def prefetch_to_mesh(
    batches: Iterator[dict[str, np.ndarray]],
    mesh: jax.sharding.Mesh,
    global_batch: int,
    size: int = 2,
) -> Iterator[dict]:
    """This process's batches as global arrays, with ``size`` host-to-device transfers in flight:
    the next batch is already on its way while the current step runs. Order is unchanged."""
    queue: collections.deque = collections.deque()

    def enqueue() -> None:
        batch = next(batches, None)
        if batch is not None:
            queue.append(to_global(batch, mesh, global_batch))

    try:
        for _ in range(size):
            enqueue()
        while queue:
            yield queue.popleft()
            enqueue()  # batch s + size, before step s + 1 is dispatched
    finally:  # closed, or failed: the source's threads and worker processes end now
        close = getattr(batches, "close", None)
        if close is not None:
            close()
