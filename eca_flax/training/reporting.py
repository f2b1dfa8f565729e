"""What a run tells its user: log lines, a progress bar, TensorBoard scalars, a profiler trace.

Process 0 reports; the other processes stay quiet. Lines go through ``logging`` (logger
"eca_flax", on stdout, ``HH:MM:SS message``), the progress bar is tqdm's (terminals only),
TensorBoard event files are written with the ``tensorboard`` package's record format (no
TensorFlow), and ``--config.profile_steps=START,END`` traces those steps with
``jax.profiler`` into the same TensorBoard directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm

from eca_flax.errors import TrainingError
from eca_flax.training.config import Plan, profile_range
from eca_flax.version import __version__

logger = logging.getLogger("eca_flax")
TENSORBOARD_DIR = "tensorboard"


def main_process() -> bool:
    return jax.process_index() == 0


class _TqdmStream:
    """A stream that prints lines above a running tqdm bar (and plainly without one)."""

    def write(self, text: str) -> None:
        if text.strip():
            tqdm.tqdm.write(text.rstrip("\n"), file=sys.stdout)

    def flush(self) -> None:
        sys.stdout.flush()


def setup_logging(*, all_processes: bool = False) -> None:
    """Log lines of the "eca_flax" logger on stdout; idempotent. Only process 0's info lines
    unless ``all_processes`` (before jax.distributed starts, when that is not known yet)."""
    if not logger.handlers:
        handler = logging.StreamHandler(_TqdmStream())
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False  # absl's root handler would print every line again
    logger.setLevel(logging.INFO if all_processes or main_process() else logging.WARNING)


def progress(total: int, desc: str, initial: int = 0) -> tqdm.tqdm:
    """A progress bar in images on stderr; shown on a terminal, on process 0 only."""
    return tqdm.tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="img",
        unit_scale=True,
        dynamic_ncols=True,
        leave=False,
        disable=not (main_process() and sys.stderr.isatty()),
    )


class StepMetrics:
    """Per-step metrics stay on device until a log step fetches them in one transfer.

    ``flush`` raises TrainingError on a non-finite loss, naming its step, so nothing is saved
    after a bad step.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.pending: list[tuple[int, dict]] = []
        self.since = time.perf_counter()

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> dict[str, float]:
        """Means over the pending steps, the last learning rate and images/s."""
        values = jax.device_get([m for _, m in self.pending])
        for (step, _), m in zip(self.pending, values):
            if not np.isfinite(m["loss"]):
                raise TrainingError(f"non-finite loss ({float(m['loss'])}) at step {step}")
        now = time.perf_counter()
        out = {k: float(np.mean([m[k] for m in values])) for k in ("loss", "top1")}
        out["lr"] = float(values[-1]["lr"])
        out["images_per_sec"] = len(values) * self.batch_size / max(now - self.since, 1e-9)
        out["damaged"] = int(sum(int(m["damaged"]) for m in values))
        self.pending, self.since = [], now
        return out


class TensorBoard:
    """Scalars as a TensorBoard event file in workdir/tensorboard (process 0), created with the
    first scalars: a run that stops before it has any (a failed start) leaves no tensorboard/.

    Written with the ``tensorboard`` package's own record framing and protos, which need no
    TensorFlow (its EventFileWriter would import TensorFlow wherever it is installed).
    """

    def __init__(self, workdir: str) -> None:
        self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
        self.file = None

    def _open(self) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        os.makedirs(self.logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.file = RecordWriter(open(os.path.join(self.logdir, name), "wb"))  # noqa: SIM115
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event: Any) -> None:
        self.file.write(event.SerializeToString())
        self.file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not main_process():
            return
        if self.file is None:
            self._open()
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
            ]
        )
        self._write(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class Profiler:
    """``jax.profiler`` trace of the steps ``config.profile_steps`` names, into tensorboard/."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str) -> None:
        self.range = profile_range(config)
        self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
        self.running = False

    def before_step(self, step: int) -> None:
        """Call before running ``step`` (1-based)."""
        if self.range and step == self.range[0]:
            jax.profiler.start_trace(self.logdir)
            self.running = True

    def after_step(self, step: int, outputs: Any) -> None:
        if self.running and step == self.range[1]:
            jax.block_until_ready(outputs)
            self.stop()
            logger.info(f"profile of steps {self.range[0]}-{self.range[1]} in {self.logdir}")

    def stop(self) -> None:
        if self.running:
            jax.profiler.stop_trace()
            self.running = False


def eta(seconds: float) -> str:
    """A duration as tqdm shows it (1:02:03, 05:07)."""
    return tqdm.tqdm.format_interval(max(seconds, 0))


def save_config(
    workdir: str, config: ml_collections.ConfigDict, plan: Plan, meta: dict, source: str
) -> None:
    """The resolved config, model and derived sizes as workdir/config.json, for the record."""
    if not main_process():
        return
    os.makedirs(workdir, exist_ok=True)
    record = {
        "config": config.to_dict(),
        "model": meta,
        "plan": dataclasses.asdict(plan),
        "init": source,
        "devices": jax.device_count(),
        "processes": jax.process_count(),
        "backend": jax.default_backend(),
        "eca_flax": __version__,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # what this process started jax with
    }
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(record, f, indent=2, default=str)
