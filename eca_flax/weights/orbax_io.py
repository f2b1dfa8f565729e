"""Pretrained directories' weights through Orbax: ``state/``, one pure dict of the parameters
and BatchNorm statistics, read back with its shapes and checksum checked (the counterpart of
``safetensors_io`` for single files). Imported only where a directory is read or written.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import traverse_util

from eca_flax.errors import PretrainedError
from eca_flax.files import one_line
from eca_flax.weights.description import (
    MODEL_JSON,
    STATE_DIR,
    Flat,
    Path_,
    check_checksum,
    check_stored,
    flatten,
)


def make_checkpointer() -> ocp.StandardCheckpointer:
    """An Orbax checkpointer for this process alone: in a multi-process job, pretrained
    directories are written by one process and read by each process independently."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def read_weights(
    state_dir: Path_, target: Flat, *, what: str = MODEL_JSON, expected: str | None = None
) -> Flat:
    """Read the Orbax checkpoint ``state_dir`` into arrays shaped like ``target``; one-line errors.

    The stored shapes are checked against ``target`` first, from the checkpoint's metadata: a
    description (``what``) that does not match the stored arrays gets a message naming the array.
    With ``expected`` (what ``checksum`` gave when they were written), the arrays must match it.
    """
    state_dir = Path(state_dir).absolute()
    checkpointer = make_checkpointer()
    try:
        try:
            metadata = checkpointer.metadata(state_dir)
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged checkpoints
            raise PretrainedError(
                f"{state_dir}: not a readable checkpoint ({one_line(e)})"
            ) from None
        tree = getattr(metadata, "item_metadata", metadata)
        if not hasattr(tree, "items"):
            raise PretrainedError(f"{state_dir}: not a readable checkpoint (no array metadata)")
        check_stored(state_dir, flatten(tree), target, what)
        try:
            restored = checkpointer.restore(state_dir, traverse_util.unflatten_dict(target))
        except Exception as e:  # noqa: BLE001
            raise PretrainedError(
                f"{state_dir}: cannot restore the checkpoint ({one_line(e)})"
            ) from None
    finally:
        with contextlib.suppress(Exception):
            checkpointer.close()
    check_checksum(state_dir, restored, expected)
    return flatten(restored)


def write_state(tmp: Path, state: dict, text: str) -> None:
    """A pretrained directory's contents: Orbax ``state/``, then model.json."""
    checkpointer = make_checkpointer()
    try:
        checkpointer.save(tmp / STATE_DIR, state)
        checkpointer.wait_until_finished()
    finally:
        checkpointer.close()
    (tmp / MODEL_JSON).write_text(text)
