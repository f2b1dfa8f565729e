"""The weights a run starts from: a fresh initialisation, a converter output (``init_from``: a
pretrained directory or .safetensors file) or a training workdir (its newest good checkpoint) /
checkpoint of this trainer, and its EMA."""

from __future__ import annotations

import os

import jax
import ml_collections
from flax import nnx

from eca_flax.errors import ConfigError, DamagedCheckpoint, PretrainedError
from eca_flax.models import registry
from eca_flax.training import checkpoints
from eca_flax.training.checkpoints import find_checkpoint, read_meta
from eca_flax.training.reporting import logger
from eca_flax.weights import description, orbax_io, pretrained


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> tuple[nnx.Module, str]:
    """The model to train or evaluate, and where its weights come from (for the log).

    Fresh initialisation (the original's) unless ``config.init_from`` names a converter output
    (a directory with model.json + state/, or a .safetensors file) or a training workdir (its
    newest good checkpoint) / checkpoint of this trainer; a different ``num_classes`` than the
    source's gives a freshly initialised head (fine-tuning).
    """
    model, _, source = build_models(config, num_classes, ema=False)
    return model, source


def build_models(
    config: ml_collections.ConfigDict, num_classes: int, *, ema: bool
) -> tuple[nnx.Module, nnx.Module | None, str]:
    """``build_model``'s model, with ``ema`` also the EMA of a training checkpoint (None for a
    converter output or a run without EMA), and where they come from.

    From a workdir: its newest good checkpoint. A damaged one is reported in one line and left
    in place (it is not this run's to set aside) and the one before is read instead.
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
        return model, None, "random initialisation"
    path = os.path.abspath(os.path.expanduser(config.init_from))
    if description.is_safetensors(path) or os.path.isfile(
        os.path.join(path, description.MODEL_JSON)
    ):
        meta = pretrained.read_model_json(path)  # a converter output, directory or file
        _check_source(config, meta, path, num_classes)
        model = pretrained.load_pretrained(
            path, dtype=dtype, num_classes=num_classes, seed=config.seed
        )
        return model, None, _describe(path, meta, num_classes)
    if not os.path.isdir(path):
        raise ConfigError(f"init_from {path}: no such directory or .safetensors file")
    read = lambda step, step_dir: _read_checkpoint(config, path, step_dir, num_classes, ema)
    if checkpoints.is_step_dir(path):
        model, ema_model, meta = read(0, path)
        return model, ema_model, _describe(path, meta, num_classes)
    checkpoints.find_checkpoint(path)  # a workdir with finished checkpoints, or ConfigError
    damaged: list[tuple[str, str]] = []  # (step dir, problem), newest first
    root = os.path.join(path, checkpoints.CHECKPOINT_DIR)
    found = checkpoints.restore_newest(root, read, lambda d, why: damaged.append((d, why)))
    good = os.path.join(root, str(found[0])) if found else None
    instead = f"reading {good} instead, the newest good one" if good else "no good one is left"
    for step_dir, problem in damaged:
        logger.warning(f"checkpoint {step_dir} is damaged ({problem}): left in place; {instead}")
    if found is None:
        raise ConfigError(f"{path}: all {len(damaged)} checkpoints are damaged (see above)")
    model, ema_model, meta = found[1]
    return model, ema_model, _describe(good, meta, num_classes)


def _read_checkpoint(
    config: ml_collections.ConfigDict, path: str, step_dir: str, num_classes: int, ema: bool
) -> tuple[nnx.Module, nnx.Module | None, dict]:
    """(model, its EMA or None, meta) from a training checkpoint; arrays that do not read
    (or match their checksum) raise DamagedCheckpoint, another model ConfigError."""
    meta = read_meta(step_dir)
    _check_source(config, meta, path, num_classes)
    sums = meta.get("checksums", {})
    try:
        model = pretrained.restore_model(
            meta,
            lambda target: orbax_io.read_weights(
                os.path.join(step_dir, "model"), target, expected=sums.get("model")
            ),
            num_classes=num_classes,
            dtype=registry.DTYPES[config.dtype],
            seed=config.seed,
            where=path,
        )
        ema_model = _read_ema(step_dir, model, sums["ema"]) if ema and "ema" in sums else None
    except PretrainedError as e:
        raise DamagedCheckpoint(step_dir, str(e)) from None
    return model, ema_model, meta


def _describe(path: str, meta: dict, num_classes: int) -> str:
    """Where the weights come from, for the log: the path, arch and kernel sizes, a new head."""
    head = "" if meta["num_classes"] == num_classes else f", new {num_classes}-class head"
    if not meta["num_classes"]:  # a converted detector's backbone (stage_features only)
        logger.info(
            f"note: init_from {path} is a backbone without a classifier (converted from a "
            f"detection checkpoint); training it with a new {num_classes}-class head"
        )
    return f"{path} ({meta['arch']}, k_size {tuple(meta['k_size'])}{head})"


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
    if description.is_safetensors(path) or os.path.isfile(
        os.path.join(path, description.MODEL_JSON)
    ):
        return None
    step_dir = find_checkpoint(path)
    expected = read_meta(step_dir).get("checksums", {}).get("ema")
    return None if expected is None else _read_ema(step_dir, model, expected)


def _read_ema(step_dir: str, model: nnx.Module, expected: str) -> nnx.Module:
    """A copy of ``model`` with the EMA weights of the checkpoint ``step_dir``."""
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
