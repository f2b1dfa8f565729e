"""The weights a run starts from: a fresh initialisation, a converter output (``init_from``: a
pretrained directory) or a training workdir / checkpoint of this trainer, and its EMA."""

from __future__ import annotations

import os

import jax
import ml_collections
from flax import nnx

from eca_flax.errors import ConfigError
from eca_flax.models import registry
from eca_flax.training.checkpoints import find_checkpoint, read_meta
from eca_flax.training.reporting import logger
from eca_flax.weights import description, orbax_io, pretrained


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> tuple[nnx.Module, str]:
    """The model to train or evaluate, and where its weights come from (for the log).

    Fresh initialisation (the original's) unless ``config.init_from`` names a converter output
    (model.json + state/) or a training workdir / checkpoint of this trainer; a different
    ``num_classes`` than the source's gives a freshly initialised head (fine-tuning).
    """
    dtype = registry.DTYPES[config.dtype]
    if not config.init_from:
        model = registry.create_model(
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
    if os.path.isfile(os.path.join(path, description.MODEL_JSON)):
        meta = pretrained.read_model_json(path)
        weights, expected = os.path.join(path, description.STATE_DIR), meta.get("checksum")
    else:
        step_dir = find_checkpoint(path)
        meta = read_meta(step_dir)
        weights, expected = os.path.join(step_dir, "model"), meta.get("checksums", {}).get("model")
    _check_source(config, meta, path, num_classes)
    model = pretrained.restore_model(
        meta,
        lambda target: orbax_io.read_weights(weights, target, expected=expected),
        num_classes=num_classes,
        dtype=dtype,
        seed=config.seed,
        where=path,
    )
    head = "" if meta["num_classes"] == num_classes else f", new {num_classes}-class head"
    if not meta["num_classes"]:  # a converted detector's backbone (stage_features only)
        logger.info(
            f"note: init_from {path} is a backbone without a classifier (converted from a "
            f"detection checkpoint); training it with a new {num_classes}-class head"
        )
    return model, f"{path} ({meta['arch']}, k_size {tuple(meta['k_size'])}{head})"


def _check_source(config: ml_collections.ConfigDict, meta: dict, path: str, num_classes: int):
    """The init_from checkpoint must be the configured architecture (and classes, to evaluate)."""
    want = {
        "arch": config.model,
        "k_size": config.k_size,
        "attention": config.attention,
        "num_classes": num_classes,
    }
    keys = ["arch", "attention"] + (["k_size"] if config.k_size else [])
    keys += ["num_classes"] if config.eval_only else []
    for key, have, wanted in description.differences(meta, want, keys):
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
        if not have:
            raise ConfigError(
                f"eval_only: init_from {path} is a backbone without a classifier (converted from "
                "a detection checkpoint); train a head on it first"
            )
        raise ConfigError(
            f"eval_only: the checkpoint has {have} classes but {config.dataset} has {wanted}; "
            "evaluate it on the dataset it was trained for"
        )


def read_ema(path: str, model: nnx.Module) -> nnx.Module | None:
    """A copy of ``model`` holding the EMA weights of the training checkpoint ``path`` (a workdir:
    its latest; a step dir), or None for a converter output or a run without EMA."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, description.MODEL_JSON)):
        return None
    step_dir = find_checkpoint(path)
    expected = read_meta(step_dir).get("checksums", {}).get("ema")
    if expected is None:
        return None
    ema = nnx.clone(model)
    variables = registry.weight_paths(ema)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = description.abstract({p: v.get_value() for p, v in variables.items()}, device)
    weights = orbax_io.read_weights(
        os.path.join(step_dir, "ema"), target, what=f"{step_dir}/meta", expected=expected
    )
    for p, var in variables.items():
        var.set_value(weights[p])
    return ema
