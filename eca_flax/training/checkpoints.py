"""The workdir's checkpoints (checkpoints/<step>/{model, train, meta, [ema]}) through Orbax: saves
with checksums, restores that check them, damaged ones set aside, the resume checks.

``model`` holds the weights in the pretrained directories' layout (one pure dict of parameters
and BatchNorm statistics), ``ema`` (runs with ``ema_decay`` > 0) their moving average in the same
layout, ``train`` the rest of the train state, ``meta`` the model description
(``description.MODEL_KEYS``), the run's data layout, what its learning-rate schedule is a
function of (``steps.SCHEDULE_KEYS``) and a CRC-32 of each item's arrays. So
``init_from`` reads a converter output, a training workdir or one of its step directories
(their raw weights, not the EMA) through the same ``pretrained.restore_model``.

Checkpoints cannot cost a run: a latest checkpoint that does not restore, or whose arrays do
not match their checksum (Orbax itself checks no bytes), is reported in one line, moved to
``checkpoints.damaged/`` (never deleted) and the run resumes from the newest good one
(``restore_newest``; eval_only and ``init_from`` a workdir read the newest good one the same
way, but leave the damaged ones in place: they do not hold that workdir's lock). A save that
fails (a full disk) stops the run with one line naming the last good checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from eca_flax import files
from eca_flax.errors import ConfigError, DamagedCheckpoint, TrainingError
from eca_flax.training.config import Plan
from eca_flax.training.reporting import logger
from eca_flax.training.steps import SCHEDULE_KEYS, copy_weights, schedule_settings
from eca_flax.weights import description

T = TypeVar("T")
CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "checkpoints.damaged"
FORMAT = "eca_flax.training_checkpoint/2"
STATE_KEYS = ("step", "opt_state", "rng")  # the train item; params and BN stats are the model
# Changing these changes what a step number means (the data position), the model itself or
# the learning rate of the steps to come. optimizer_state: the layout of the optimizer's state
# (optimizer, weight decay, its mask); SCHEDULE_KEYS: what the schedule is a function of
# (num_train_steps is not: it only stops a run early on its schedule, and may change).
RESUME_KEYS = (
    "arch",
    "k_size",
    "attention",
    "num_classes",
    "batch_size",
    "image_size",
    "optimizer",
    "optimizer_state",
    *SCHEDULE_KEYS,
)


def model_meta(
    model: nnx.Module,
    config: ml_collections.ConfigDict,
    num_classes: int,
    opt_state: Any = None,
    plan: Plan | None = None,
) -> dict:
    """What a checkpoint records besides the arrays: the model, the run's data layout, (with
    ``opt_state``) a fingerprint of its optimizer state's layout and (with ``plan``) what its
    learning-rate schedule is a function of (``steps.schedule_settings``)."""
    layout = None
    if opt_state is not None:
        shapes = [(tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(opt_state)]
        text = f"{jax.tree.structure(opt_state)}{shapes}"
        layout = f"crc32:{zlib.crc32(text.encode()):08x}"
    return {
        "optimizer": config.optimizer,
        "optimizer_state": layout,
        "format": FORMAT,
        "arch": config.model,
        "k_size": list(model.k_size),
        "attention": model.attention,
        "num_classes": num_classes,
        "dataset": config.dataset,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "seed": config.seed,
        **(schedule_settings(config, plan) if plan is not None else {}),
    }


def _weights(state: Mapping) -> dict:
    """The params and BN statistics of a train state as one pure dict (the pretrained layout)."""
    flat = {
        **traverse_util.flatten_dict(state["params"]),
        **traverse_util.flatten_dict(state["batch_stats"]),
    }
    return traverse_util.unflatten_dict(flat)


def _split(weights: dict, like: Mapping) -> dict:
    """The inverse of ``_weights``: {params, batch_stats} with the paths of ``like``'s."""
    flat = traverse_util.flatten_dict(weights)
    part = lambda name: traverse_util.unflatten_dict(
        {p: flat[p] for p in traverse_util.flatten_dict(like[name])}
    )
    return {"params": part("params"), "batch_stats": part("batch_stats")}


def _items(state: Mapping) -> dict:
    """The array items of a checkpoint of ``state``: model, train and (EMA on) ema."""
    items = {"model": _weights(state), "train": {k: state[k] for k in STATE_KEYS}}
    if "ema" in state:
        items["ema"] = _weights(state["ema"])
    return items


class Checkpoints:
    """The workdir's Orbax checkpoints: async saves with checksums, restores that check them."""

    def __init__(self, workdir: str, keep: int) -> None:
        self.workdir = workdir
        self.root = os.path.join(workdir, CHECKPOINT_DIR)
        self.created = not os.path.isdir(self.root)  # Orbax creates it: removed by close if empty
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,  # what an interrupted save left
        )
        self.manager = ocp.CheckpointManager(self.root, options=options)
        self.pending: int | None = None  # the step of the save in flight
        self.abandoned = False  # abandon(): close() leaves a save in flight as it is

    def last_good(self) -> str:
        return last_good(self.root)

    def save(self, state: dict, meta: dict) -> int:
        """Starts an async save of ``state`` at its step. Its arrays are copied to the host now
        (this process's copy of the replicated state, as the checksums need it) and Orbax
        writes those: given device arrays, Orbax on CPU would split each among its replicas
        with an eager slice per device (8 devices: ~800 programs and 1.2 CPU-s per save of
        test_eca_resnet) to copy what is already in host memory. Copies, not the views
        ``np.asarray`` gives on CPU: a view held while Orbax writes would stop the next step
        from donating (reusing) the state's buffers."""
        step = int(jax.device_get(state["step"]))
        items = jax.tree.map(lambda x: np.array(description.host_array(x)), _items(state))
        sums = {k: description.checksum(v) for k, v in items.items()}
        args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
        self.wait()  # a failed previous save is reported as such, before this one starts
        self.pending = step
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    **args, meta=ocp.args.JsonSave({**meta, "step": step, "checksums": sums})
                ),
            )
        except Exception as e:  # noqa: BLE001 - OSError, or Orbax / TensorStore wrapping one
            self._failed(e, step)
        return step

    def wait(self) -> None:
        """Waits for the pending save; a failed one becomes a TrainingError naming the last good."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            self._failed(e, self.pending)
        self.pending = None

    def _failed(self, error: Exception, step: int | None) -> None:
        for tmp in os.listdir(self.root) if os.path.isdir(self.root) else []:
            if ".orbax-checkpoint-tmp" in tmp:  # the unfinished save: never a good checkpoint
                files.remove_unfinished(os.path.join(self.root, tmp))
        full = files.disk_full(error)
        what = "no space left on the disk of" if full else "could not write to"
        reason = "" if full else f" ({files.one_line(error)})"
        saving = f" while saving checkpoint {step}" if step is not None else " while saving"
        last_good = self.last_good()
        raise TrainingError(
            f"{what} {self.workdir}{saving}{reason}; the last good checkpoint is "
            f"{last_good}: {'free space' if full else 'fix that'} and run the same "
            "command to resume",
            last_good=last_good,
        ) from None

    def restore_latest(self, like: dict, meta: dict) -> tuple[int, dict]:
        """(step, state) of the newest checkpoint that restores and matches its checksums, or
        (0, like). Damaged ones are moved aside with a line each; one of another configuration
        (RESUME_KEYS) stops the run instead (ConfigError)."""

        def restore(step: int, step_dir: str) -> dict:
            saved = read_meta(step_dir)
            check_resume(step_dir, step, saved, meta)
            try:
                return self._restore(step, like, saved.get("checksums", {}))
            except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types
                raise DamagedCheckpoint(step_dir, files.one_line(e)) from None

        return restore_newest(self.root, restore, self._set_aside) or (0, like)

    def _restore(self, step: int, like: dict, sums: dict) -> dict:
        """The state at ``step``. Its EMA is restored when ``like`` has one: a checkpoint of a
        run without EMA starts it at the restored weights; one with an EMA restores into a run
        without (the EMA is dropped). Checkpoints of eca_flax < 0.2 have no checksums."""
        items = _items(description.abstract(like))
        if "ema" in items and "ema" not in sums:
            del items["ema"]
            logger.warning(
                f"checkpoint {step} has no EMA (saved with ema_decay=0): the EMA "
                "starts at its weights"
            )
        args = {k: ocp.args.StandardRestore(v) for k, v in items.items()}
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        for item in items:
            if item in sums and description.checksum(out[item]) != sums[item]:
                raise ValueError(f"its {item} arrays do not match the checksum saved with them")
        state = {**_split(out["model"], like), **out["train"]}
        if "ema" in like:
            state["ema"] = _split(out["ema"], like) if "ema" in items else copy_weights(state)
        return state

    def _set_aside(self, step_dir: str, problem: str) -> None:
        """Moves a damaged checkpoint to checkpoints.damaged/ (process 0) and says so."""
        dest = os.path.join(
            self.workdir,
            DAMAGED_DIR,
            f"{os.path.basename(step_dir)}-{time.strftime('%Y%m%d-%H%M%S')}",
        )
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.move(step_dir, dest)
        logger.warning(
            f"checkpoint {step_dir} is damaged ({problem}): moved to {dest}; "
            "resuming from the one before"
        )
        self.manager.reload()

    def abandon(self) -> str:
        """A second Ctrl-C: the save in flight, if any, is not waited for (its temporary
        directory is never a good checkpoint; the next start removes what is left of it);
        returns the last good checkpoint, as the line names it."""
        self.abandoned = True
        return self.last_good()

    def close(self) -> None:
        """Waits for a pending save and closes the manager; errors were reported by ``wait``. A
        checkpoints/ this run created and saved nothing into (a failed start) is removed.
        After ``abandon``: nothing waited for (Orbax's threads end with the process)."""
        if self.abandoned:
            return
        with contextlib.suppress(Exception):
            self.manager.wait_until_finished()
        with contextlib.suppress(Exception):
            self.manager.close()
        if self.created and jax.process_index() == 0:
            with contextlib.suppress(OSError):  # not empty: it holds checkpoints, and stays
                os.rmdir(self.root)


def check_resume(step_dir: str, step: int, saved: dict, meta: dict) -> None:
    """A workdir's checkpoints must be of this model, data layout and learning-rate schedule
    (RESUME_KEYS): ConfigError naming each value that differs, the checkpoint's and the
    config's. The ``seed`` may change only at an epoch boundary: mid-epoch, another seed's
    permutation would train some of the epoch's images twice and skip others."""
    # Older checkpoints lack some keys; None: a field this run's schedule kind ignores.
    keys = [k for k in RESUME_KEYS if saved.get(k) is not None and meta.get(k) is not None]
    if diff := description.differences(saved, meta, keys):
        what = ", ".join(f"{k} {have} (checkpoint) vs {want} (config)" for k, have, want in diff)
        raise ConfigError(
            f"{step_dir} was trained with another configuration: {what}; the step number is the "
            "data position of that run, its learning-rate schedule is fixed by its recipe and "
            "num_epochs (num_train_steps may change: it only stops the run early) and its "
            "optimizer state fits only its optimizer settings. Use another --workdir, or the "
            "checkpoint's values"
        )
    per_epoch, seed = saved.get("steps_per_epoch"), saved.get("seed")
    if None not in (per_epoch, seed) and seed != meta.get("seed") and step % per_epoch:
        raise ConfigError(
            f"{step_dir} was trained with seed {seed} (checkpoint) vs {meta.get('seed')} "
            f"(config), and step {step} is inside epoch {step // per_epoch + 1} ({per_epoch} "
            "steps each): another seed orders the epoch's images otherwise, so some would be "
            f"trained twice and others skipped. Resume with --config.seed={seed} (another seed "
            "may take over at an epoch boundary), or use another --workdir"
        )


def finished_steps(root: str) -> list[int]:
    """The steps of the checkpoints under ``root`` whose save finished, oldest first."""
    return sorted(ocp.utils.checkpoint_steps(root)) if os.path.isdir(root) else []


def last_good(root: str) -> str:
    """The newest finished checkpoint under ``root``, as a line names it."""
    steps = finished_steps(root)
    return f"{root}/{steps[-1]}" if steps else "none (no checkpoint was saved)"


def restore_newest(
    root: str, restore: Callable[[int, str], T], damaged: Callable[[str, str], None]
) -> tuple[int, T] | None:
    """(step, ``restore(step, step_dir)``) of the newest finished checkpoint under ``root`` that
    restores, or None. Newest first: one whose ``restore`` raises DamagedCheckpoint goes to
    ``damaged(step_dir, problem)`` (resume sets it aside, eval_only leaves it) and the one
    before is tried; any other error stops the search."""
    for step in reversed(finished_steps(root)):
        step_dir = os.path.join(root, str(step))
        try:
            return step, restore(step, step_dir)
        except DamagedCheckpoint as e:
            damaged(step_dir, e.problem)
    return None


def is_step_dir(path: str) -> bool:
    """Whether ``path`` is one checkpoint (checkpoints/<step>), not a workdir."""
    return os.path.isdir(os.path.join(path, "meta")) and os.path.isdir(os.path.join(path, "model"))


def find_checkpoint(path: str) -> str:
    """A checkpoint step dir from a workdir (its latest) or a step dir itself."""
    if is_step_dir(path):
        return path
    root = os.path.join(path, CHECKPOINT_DIR)
    steps = finished_steps(root)
    if not steps:
        raise ConfigError(
            f"init_from {path}: not a converter output (no model.json), a training workdir "
            f"(no {CHECKPOINT_DIR}/ with finished checkpoints) or a checkpoint step dir"
        )
    return os.path.join(root, str(steps[-1]))


def read_meta(step_dir: str) -> dict:
    """The model description saved with a training checkpoint; ConfigError when unreadable."""
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
            meta = ckptr.restore(os.path.join(step_dir, "meta"))
    except Exception as e:  # noqa: BLE001 - Orbax raises many types for a damaged item
        raise DamagedCheckpoint(step_dir, f"unreadable metadata ({files.one_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DamagedCheckpoint(step_dir, f"not an eca_flax training checkpoint ({FORMAT})")
    description.check_description(meta, step_dir)
    return meta
