"""Every exception eca_flax raises on purpose, in one place, below everything else.

``Error`` is the base of the errors a user can fix (bad input, a missing file, a full disk): its
message is one line naming the problem, and the command lines print it as ``error: ...``.
Callers decide on the type and the fields, never on the message. ``Interrupted`` is apart: it is
Ctrl-C, so it derives from KeyboardInterrupt and passes through ``except Exception``.
"""

from __future__ import annotations


class Error(Exception):
    """Base of eca_flax's errors. ``last_good``: the last good checkpoint of the training run
    this error stopped (None outside training, or before the loop has named it)."""

    def __init__(self, message: str, *, last_good: str | None = None) -> None:
        super().__init__(message)
        self.last_good = last_good

    def stopped(self, last_good: str) -> Error:
        """Marks the error as the one that stopped a run whose last good checkpoint is
        ``last_good``, and says so in the message (once: a field set by the raiser stays)."""
        if self.last_good is None:
            self.last_good = last_good
            self.args = (f"{self}; stopped, the last good checkpoint is {last_good}",)
        return self


class ConfigError(Error, ValueError):
    """A configuration that cannot run; the message names the field and the choices."""


class DamagedCheckpoint(ConfigError):
    """A training checkpoint whose metadata cannot be read (``path``: its step directory)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem


class TrainingError(Error, RuntimeError):
    """Training had to stop (e.g. a non-finite loss); the message says why and what is kept."""


class OutOfMemory(Error, MemoryError):
    """A train or eval step that asks for more memory than a device has (its compiled buffers
    against the device's memory before the first train step, or XLA's RESOURCE_EXHAUSTED,
    compiling or running it): ``step`` ("train" or "eval"), ``batch_size``
    (global, split over ``devices``), ``image_size``, ``asked`` (the bytes XLA asked for, on one
    device; None when it does not say). The message names the config fields to lower."""

    FIELDS = {"train": ("batch_size", "image_size"), "eval": ("eval_batch_size", "eval_image_size")}

    def __init__(
        self, step: str, *, batch_size: int, image_size: int, asked: int | None, devices: int = 1
    ) -> None:
        self.step, self.batch_size, self.image_size = step, batch_size, image_size
        self.asked, self.devices = asked, devices
        split = f" ({batch_size // devices} per device, {devices} devices)" if devices > 1 else ""
        ask = "more memory than the device has"
        if asked is not None:
            ask = f"{asked / 2**30:.1f} GiB ({asked} bytes){' per device' if split else ''}"
        lower = " or ".join(f"--config.{field}" for field in self.FIELDS[step])
        super().__init__(
            f"out of memory in the {step} step: batch {batch_size}{split} of "
            f"{image_size}x{image_size} images asks for {ask}; lower {lower}"
        )


class DataError(Error):
    """The requested data is missing or malformed; the message says how to fix it."""


class PretrainedError(Error):
    """A pretrained-model directory that cannot be read or written; the message says why."""


class DownloadError(PretrainedError):
    """Pretrained weights that cannot be fetched or found in the cache: ``source`` (the name
    asked for), ``offline`` (True when no network was tried or reachable: the message then says
    how to get the weights where there is network)."""

    def __init__(self, message: str, *, source: str, offline: bool = False) -> None:
        super().__init__(message)
        self.source, self.offline = source, offline


class ConversionError(Error, ValueError):
    """A state_dict that does not fit the model: the message names keys and shapes."""


class BenchmarkError(Error, RuntimeError):
    """A benchmark that cannot run as asked (a missing backend, a bad option)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a training run; the message says what is kept. ``last_good``: the last good
    checkpoint (the one just saved, after a first Ctrl-C; the newest finished one after a
    second), ``step``: the step the run stopped at."""

    def __init__(self, message: str, *, step: int, last_good: str) -> None:
        super().__init__(message)
        self.step, self.last_good = step, last_good
