"""Checkpoints (workdir/checkpoints/<step>/{model, train, meta}) and the weights a run starts from.

``model`` holds the weights in the pretrained directories' layout (one pure dict of parameters
and BatchNorm statistics), ``train`` the rest of the train state, ``meta`` the model
description (``pretrained.MODEL_KEYS``) and the run's data position. So ``init_from`` reads a
converter output, a training workdir or one of its step directories through the same
``pretrained.restore_model``.
"""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

import eca_flax
from eca_flax import pretrained, registry
from eca_flax.training.config import ConfigError

CHECKPOINT_DIR = "checkpoints"
FORMAT = "eca_flax.training_checkpoint/2"
STATE_KEYS = ("step", "opt_state", "rng")  # the train item; params and BN stats are the model


def _no_metrics_warning(record: logging.LogRecord) -> bool:
    """Mid-epoch checkpoints have no eval metrics by design: drop Orbax's warning about it."""
    return "did not provide metrics" not in record.getMessage()


logging.getLogger("absl").addFilter(_no_metrics_warning)


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Async Orbax manager keeping the latest ``keep`` checkpoints plus the best by top-1."""
    policy = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        best_fn=lambda metrics: metrics["top1"],  # Also makes Orbax store the metrics.
        preservation_policy=policy.AnyPreservationPolicy(
            [
                policy.LatestN(keep),
                policy.BestN(
                    get_metric_fn=lambda metrics: metrics["top1"],
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        ),
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR), options=options
    )


def model_meta(model: nnx.Module, config: ml_collections.ConfigDict, num_classes: int) -> dict:
    """What a checkpoint records besides the arrays: the model and the run's data layout."""
    return {
        "format": FORMAT,
        "arch": config.model,
        "k_size": list(model.k_size),
        "attention": model.attention,
        "num_classes": num_classes,
        "dataset": config.dataset,
        "image_size": config.image_size,
    }


def _weights(state: dict) -> dict:
    """The params and BN statistics of a train state as one pure dict (the pretrained layout)."""
    flat = {**traverse_util.flatten_dict(state["params"]),
            **traverse_util.flatten_dict(state["batch_stats"])}  # fmt: skip
    return traverse_util.unflatten_dict(flat)


def save(
    manager: ocp.CheckpointManager, state: dict, meta: dict, metrics: dict | None = None
) -> int:
    """Starts an async save of ``state`` at its step (device->host copy happens now)."""
    step = int(jax.device_get(state["step"]))
    manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(_weights(state)),
            train=ocp.args.StandardSave({k: state[k] for k in STATE_KEYS}),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        ),
        metrics=metrics,
    )
    return step


def restore(manager: ocp.CheckpointManager, step: int, like: dict) -> dict:
    """The full train state at ``step``, placed like ``like`` (the freshly built state)."""
    target = pretrained.abstract(like)
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(_weights(target)),
            train=ocp.args.StandardRestore({k: target[k] for k in STATE_KEYS}),
        ),
    )
    flat = traverse_util.flatten_dict(out["model"])
    split = lambda part: traverse_util.unflatten_dict(
        {p: flat[p] for p in traverse_util.flatten_dict(like[part])}
    )
    return {"params": split("params"), "batch_stats": split("batch_stats"), **out["train"]}


def check_resume(step_dir: str, meta: dict) -> None:
    """A workdir's checkpoints must be of the model being trained."""
    saved = read_meta(step_dir)
    keys = ("arch", "k_size", "attention", "num_classes")
    if pretrained.differences(saved, meta, keys):
        have = {k: saved.get(k) for k in keys}
        want = {k: meta[k] for k in keys}
        raise ConfigError(
            f"{step_dir} holds {have} but the config trains {want}; use another --workdir"
        )


def find_checkpoint(path: str) -> str:
    """A checkpoint step dir from a workdir (its latest) or a step dir itself."""
    if os.path.isdir(os.path.join(path, "meta")) and os.path.isdir(os.path.join(path, "model")):
        return path
    root = os.path.join(path, CHECKPOINT_DIR)
    steps = ocp.utils.checkpoint_steps(root) if os.path.isdir(root) else []
    if not steps:
        raise ConfigError(
            f"init_from {path}: not a converter output (no model.json), a training workdir "
            f"(no {CHECKPOINT_DIR}/ with finished checkpoints) or a checkpoint step dir"
        )
    return os.path.join(root, str(max(steps)))


def read_meta(step_dir: str) -> dict:
    """The model description saved with a training checkpoint."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        meta = ckptr.restore(os.path.join(step_dir, "meta"))
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{step_dir}: not an eca_flax training checkpoint ({FORMAT})")
    pretrained.check_description(meta, step_dir)
    return meta


# --------------------------------------------------------------------------------------------
# The model a run starts from.


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> tuple[nnx.Module, str]:
    """The model to train or evaluate, and where its weights come from (for the log).

    Fresh initialisation (the original's) unless ``config.init_from`` names a converter output
    (model.json + state/) or a training workdir / checkpoint of this trainer; a different
    ``num_classes`` than the source's gives a freshly initialised head (fine-tuning).
    """
    dtype = registry.DTYPES[config.dtype]
    if not config.init_from:
        model = eca_flax.create_model(
            config.model,
            k_size=config.k_size or None,
            num_classes=num_classes,
            attention=config.attention,
            dtype=dtype,
            rngs=nnx.Rngs(config.seed),
        )
        return model, "random initialisation"
    path = os.path.abspath(os.path.expanduser(config.init_from))
    if not os.path.isdir(path):
        raise ConfigError(f"init_from {path}: no such directory")
    if os.path.isfile(os.path.join(path, pretrained.MODEL_JSON)):
        meta = pretrained.read_model_json(path)
        weights = os.path.join(path, pretrained.STATE_DIR)
    else:
        step_dir = find_checkpoint(path)
        meta = read_meta(step_dir)
        weights = os.path.join(step_dir, "model")
    _check_source(config, meta, path, num_classes)
    model = pretrained.restore_model(
        meta,
        lambda target: pretrained.read_weights(weights, target, what="its metadata"),
        num_classes=num_classes,
        dtype=dtype,
        seed=config.seed,
        where=path,
    )
    head = "" if meta["num_classes"] == num_classes else f", new {num_classes}-class head"
    return model, f"{path} ({meta['arch']}, k_size {tuple(meta['k_size'])}{head})"


def _check_source(config: ml_collections.ConfigDict, meta: dict, path: str, num_classes: int):
    """The init_from checkpoint must be the configured architecture (and classes, to evaluate)."""
    want = {"arch": config.model, "k_size": config.k_size, "attention": config.attention,
            "num_classes": num_classes}  # fmt: skip
    keys = ["arch", "attention"] + (["k_size"] if config.k_size else [])
    keys += ["num_classes"] if config.eval_only else []
    for key, have, wanted in pretrained.differences(meta, want, keys):
        if key == "arch":
            raise ConfigError(
                f"init_from {path} holds {have!r} but the config's model is {wanted!r}; "
                f"set --config.model={have} or use another checkpoint"
            )
        if key == "k_size":
            raise ConfigError(
                f"init_from {path} has k_size {tuple(have)} but the config asks for "
                f"{tuple(wanted)}; set --config.k_size= (empty) to take the checkpoint's"
            )
        if key == "attention":
            raise ConfigError(
                f"init_from {path} has attention {have or 'none'!r} but the config asks for "
                f"{wanted or 'none'!r}"
            )
        raise ConfigError(
            f"eval_only: the checkpoint has {have} classes but {config.dataset} has {wanted}; "
            "evaluate it on the dataset it was trained for"
        )
