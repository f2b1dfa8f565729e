"""Training and evaluation of ECA-Nets on one or many devices and hosts (what train.py runs).

Read top to bottom: the config schema (``default_config``) and its checks, the device mesh and
shardings, model / optimizer / schedule construction, the jitted train and eval steps, Orbax
checkpoints, evaluation, and finally ``train_and_evaluate`` -- the loop.

Parallelism is plain data parallelism with XLA SPMD: one ``jax.jit`` over a ``jax.make_mesh``
mesh of every device of every process, parameters replicated, the batch sharded on ``data``.
BatchNorm statistics are therefore computed over the global batch. The train step is a pure
function over arrays (``nnx.split`` once, ``nnx.merge`` inside the traced function).

Runs resume exactly: a checkpoint holds the step, parameters, BatchNorm statistics, optimizer
state and RNG, and the data pipeline is deterministic given (seed, step), so the step number
is the data position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import eca_flax
from eca_flax import data, pretrained
from eca_flax.convert import ConversionError

DATA_AXIS = "data"
CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_FORMAT = "eca_flax.training_checkpoint"
ATTENTION_CHOICES = ("eca", "eca_ns", "none")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
SCHEDULES = ("step", "cosine")
RECIPES = ("original", "modern")
POSITIVE_FIELDS = ("batch_size", "image_size", "num_epochs", "base_batch_size", "log_every_steps",
                   "checkpoint_every_steps", "keep_checkpoints", "eval_every_epochs")  # fmt: skip
# recipe="modern" overrides these fields: warmup + cosine, label smoothing, Nesterov momentum,
# and no weight decay on BatchNorm parameters and biases.
MODERN_RECIPE = {
    "schedule": "cosine",
    "warmup_epochs": 5,
    "label_smoothing": 0.1,
    "nesterov": True,
    "decay_bn_bias": False,
}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and the choices."""


class TrainingError(RuntimeError):
    """Training had to stop (e.g. a non-finite loss); the message says why and what is kept."""


# Errors that train.py reports as one line and a non-zero exit code.
USER_ERRORS = (
    ConfigError,
    TrainingError,
    data.DataError,
    pretrained.PretrainedError,
    ConversionError,
)


# --------------------------------------------------------------------------------------------
# Configuration.


def default_config() -> ml_collections.ConfigDict:
    """Every config field with its default: the original ResNet recipe on ImageNet.

    The files in configs/ start from this and set what differs; ``--config.FIELD=VALUE``
    overrides any field on the command line.
    """
    c = ml_collections.ConfigDict()
    # Model.
    c.model = "eca_resnet50"  # One of eca_flax.list_models().
    c.k_size = ""  # "": released sizes (or init_from's); "adaptive"; "3557"; "3,5,5,7".
    c.attention = "eca"  # "eca", "eca_ns" (non-shared ablation) or "none" (plain baseline).
    c.num_classes = -1  # -1: the dataset's number of classes.
    c.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (params stay float32).
    c.init_from = ""  # A converter output dir, a training workdir or one of its checkpoints.
    # Data.
    c.dataset = "imagenet2012"  # "imagenet2012" (TFDS) or "folder:PATH" (train/ and val/).
    c.data_dir = ""  # TFDS data dir ("": TFDS's default).
    c.batch_size = 256  # Global: over all devices of all hosts.
    c.eval_batch_size = -1  # -1: batch_size.
    c.image_size = 224
    c.eval_resize_size = -1  # Eval: resize the shorter side to this, center crop image_size;
    # -1: round(image_size * 256 / 224), the original's Resize(256) + CenterCrop(224).
    c.augment = "inception_crop"  # Or "pad_crop:N" (shifts of up to N px, for small images).
    c.min_crop_area = 0.08  # Random resized crop area range [min_crop_area, 1].
    c.hflip = True  # Random horizontal flips.
    c.seed = 0  # Initialisation, data order, augmentation and dropout.
    # Evaluation.
    c.eval_only = False  # Evaluate init_from (or the workdir's latest checkpoint) and stop.
    c.eval_every_epochs = 1
    # Optimisation: the original recipe (SGD, step decay); see MODERN_RECIPE for "modern".
    c.recipe = "original"
    c.num_epochs = 100
    c.num_train_steps = -1  # Optional cap on the number of steps; -1: none.
    c.learning_rate = 0.1  # At base_batch_size images; scaled linearly with batch_size.
    c.base_batch_size = 256
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.decay_bn_bias = True  # The original decays every parameter, BatchNorm and biases too.
    c.schedule = "step"  # "step": x lr_decay_factor every lr_decay_epochs; "cosine".
    c.lr_decay_epochs = 30
    c.lr_decay_factor = 0.1
    c.warmup_epochs = 0  # Linear warmup (cosine schedule).
    c.label_smoothing = 0.0
    # Checkpoints, logging, hosts.
    c.checkpoint_every_steps = 1000  # Also at every epoch end and at the end.
    c.keep_checkpoints = 3  # The latest few; the best by top-1 is kept as well.
    c.log_every_steps = 100
    c.distributed = False  # jax.distributed.initialize() (multi-host; see README).
    c.debug_nan_step = -1  # Testing aid: make the loss of this step NaN.
    return c


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes derived from the config and the dataset."""

    num_classes: int
    steps_per_epoch: int
    total_steps: int
    num_eval: int
    batch_size: int
    eval_batch_size: int
    learning_rate: float  # Peak learning rate at this batch size.


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks field values and applies the recipe preset; returns a new, locked config."""
    c = ml_collections.ConfigDict(config.to_dict())
    unknown = sorted(set(c.keys()) - set(default_config().keys()))
    if unknown:
        raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
    if c.model not in eca_flax.list_models():
        raise ConfigError(
            f"unknown model {c.model!r}; choices: {', '.join(eca_flax.list_models())}"
        )
    _choice("attention", c.attention, ATTENTION_CHOICES)
    _choice("dtype", c.dtype, tuple(DTYPES))
    _choice("recipe", c.recipe, RECIPES)
    if c.recipe == "modern":
        c.update(MODERN_RECIPE)
    _choice("schedule", c.schedule, SCHEDULES)
    for name in POSITIVE_FIELDS:
        if c[name] <= 0:
            raise ConfigError(f"{name} must be positive, got {c[name]}")
    if c.k_size:
        try:
            eca_flax.resolve_k_size(c.model, c.k_size)
        except ValueError as e:
            raise ConfigError(f"k_size: {e}") from None
    if c.eval_batch_size <= 0:
        c.eval_batch_size = c.batch_size
    c.lock()
    return c


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choices: {', '.join(map(str, choices))}")


def make_plan(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Plan:
    """Checks batch sizes against the device count and reads the dataset's sizes."""
    n = mesh.devices.size
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % n:
            raise ConfigError(
                f"{name}={config[name]} is not divisible by the {n} devices; use a multiple of {n}"
            )
    data_dir = config.data_dir or None
    info = data.dataset_info(config.dataset, data_dir)
    num_classes = config.num_classes if config.num_classes > 0 else info.num_classes
    if num_classes < info.num_classes:
        raise ConfigError(
            f"num_classes={num_classes} but {config.dataset} has {info.num_classes} classes"
        )
    if config.eval_only:
        spe = total = 0
    else:
        spe = data.steps_per_epoch(config.dataset, data_dir, config.batch_size)
        total = config.num_epochs * spe
        if config.num_train_steps > 0:
            total = min(total, config.num_train_steps)
    lr = config.learning_rate * config.batch_size / config.base_batch_size
    return Plan(
        num_classes, spe, total, info.num_eval, config.batch_size, config.eval_batch_size, lr
    )


# --------------------------------------------------------------------------------------------
# Hosts, devices and shardings.


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """``jax.distributed.initialize()`` for multi-host runs (config.distributed).

    The coordinator, process count and index come from JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID when set, else from the cluster (SLURM, Open MPI,
    Kubernetes, Cloud TPU) as JAX detects it. CPU processes exchange data over gloo.
    """
    if not config.distributed:
        return
    # CPU processes need a collectives backend (no-op for GPUs; the option may be absent).
    with contextlib.suppress(AttributeError, ValueError):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    if os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(os.environ["JAX_NUM_PROCESSES"])
    if os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(
            f"jax.distributed.initialize() failed ({e}); set JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID, or run under SLURM / Open MPI"
        ) from None


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


# --------------------------------------------------------------------------------------------
# Model, optimizer and learning-rate schedule.


def _attention(config: ml_collections.ConfigDict) -> str | None:
    return None if config.attention == "none" else config.attention


def _model_meta(model: nnx.Module, config: ml_collections.ConfigDict, num_classes: int) -> dict:
    """What a checkpoint needs to rebuild its model (written next to the weights)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": config.model,
        "k_size": list(model.k_size),
        "attention": config.attention,
        "num_classes": num_classes,
        "dataset": config.dataset,
        "image_size": config.image_size,
    }


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> tuple[nnx.Module, str]:
    """The model to train or evaluate, and where its weights come from (for the log).

    Fresh initialisation (the original's) unless ``config.init_from`` names a converter output
    (model.json + state/) or a training workdir / checkpoint of this trainer; a different
    ``num_classes`` than the source's gives a freshly initialised head (fine-tuning).
    """
    dtype = DTYPES[config.dtype]
    if not config.init_from:
        model = eca_flax.create_model(
            config.model,
            k_size=config.k_size or None,
            num_classes=num_classes,
            attention=_attention(config),
            dtype=dtype,
            rngs=nnx.Rngs(config.seed),
        )
        return model, "random initialisation"
    path = os.path.abspath(os.path.expanduser(config.init_from))
    if not os.path.isdir(path):
        raise ConfigError(f"init_from {path}: no such directory")
    if os.path.isfile(os.path.join(path, pretrained.MODEL_JSON)):
        meta = pretrained.read_model_json(path)
        _check_source(config, meta, path, num_classes)
        model = pretrained.load_pretrained(path, dtype=dtype, num_classes=num_classes)
    else:
        step_dir = find_checkpoint(path)
        meta = read_checkpoint_meta(step_dir)
        _check_source(config, meta, path, num_classes)
        model = _load_training_checkpoint(step_dir, meta, config, num_classes)
    head = "" if meta["num_classes"] == num_classes else f", new {num_classes}-class head"
    return model, f"{path} ({meta['arch']}, k_size {tuple(meta['k_size'])}{head})"


def _check_source(
    config: ml_collections.ConfigDict, meta: dict, path: str, num_classes: int
) -> None:
    """The init_from checkpoint must be the configured architecture (and classes, to evaluate)."""
    if meta.get("arch") != config.model:
        raise ConfigError(
            f"init_from {path} holds {meta.get('arch')!r} but the config's model is "
            f"{config.model!r}; set --config.model={meta.get('arch')} or use another checkpoint"
        )
    if config.k_size:
        have = eca_flax.resolve_k_size(config.model, meta["k_size"])
        want = eca_flax.resolve_k_size(config.model, config.k_size)
        if have != want:
            raise ConfigError(
                f"init_from {path} has k_size {have} but the config asks for {want}; "
                "set --config.k_size= (empty) to take the checkpoint's"
            )
    have = meta.get("attention") or "none"
    if have != config.attention:
        raise ConfigError(
            f"init_from {path} has attention {have!r} but the config asks for {config.attention!r}"
        )
    if config.eval_only and int(meta["num_classes"]) != num_classes:
        raise ConfigError(
            f"eval_only: the checkpoint has {meta['num_classes']} classes but {config.dataset} "
            f"has {num_classes}; evaluate it on the dataset it was trained for"
        )


def make_schedule(config: ml_collections.ConfigDict, plan: Plan) -> optax.Schedule:
    """Learning rate per step (optimizer update count), from optax.

    "step" is the original's lr * factor ** (epoch // decay_epochs): ResNets 0.1 * 0.1 **
    (epoch // 30), MobileNetV2 0.045 * 0.98 ** epoch. "cosine" decays to 0 over the run after
    ``warmup_epochs`` of linear warmup.
    """
    spe = max(plan.steps_per_epoch, 1)
    if config.schedule == "step":
        return optax.exponential_decay(
            plan.learning_rate,
            transition_steps=config.lr_decay_epochs * spe,
            decay_rate=config.lr_decay_factor,
            staircase=True,
        )
    warmup = min(config.warmup_epochs * spe, max(plan.total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        0.0, plan.learning_rate, warmup, max(plan.total_steps, warmup + 1), 0.0
    )


def make_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """PyTorch's SGD(momentum, weight_decay): decay added to the gradient before momentum."""
    mask = None
    if not config.decay_bn_bias:  # No decay on 1-D parameters: BatchNorm scale/bias, biases.
        mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=mask),
        optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
    )


# --------------------------------------------------------------------------------------------
# The jitted steps. State is a dict of arrays: step, params, batch_stats, opt_state, rng;
# params and batch_stats are pure nested dicts (``nnx.to_pure_dict``: checkpoint keys like
# params/layer1/0/conv1/kernel, independent of Flax's Variable classes).


def split_weights(model: nnx.Module) -> tuple[dict, dict]:
    """(params, batch_stats) of a model as pure nested dicts of arrays."""
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def _rng_streams(model: nnx.Module) -> tuple[str, ...]:
    """Tags of the RNG streams a model draws from in training (MobileNetV2's dropout)."""
    return tuple(sorted({n.tag for _, n in nnx.iter_graph(model) if isinstance(n, nnx.RngStream)}))


def make_train_step(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    num_classes: int,
    label_smoothing: float,
    debug_nan_step: int = -1,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """One SGD step over a global batch: ``state, metrics = train_step(state, batch)``.

    Compiled once with ``jax.jit`` over the mesh; the state is donated. Metrics (loss, batch
    top-1, learning rate) are replicated scalars.
    """
    model.train()
    graphdef, _, _, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    streams = _rng_streams(model)

    def step_fn(state: dict, batch: dict) -> tuple[dict, dict]:
        step = state["step"]

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            m = nnx.merge(graphdef, params, state["batch_stats"], rest, copy=True)
            if streams:  # Dropout keys depend on (seed, step) only: resumes are exact.
                key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
                nnx.reseed(m, **{s: key for s in streams})
            logits = m(batch["image"])
            targets = jax.nn.one_hot(batch["label"], num_classes)
            if label_smoothing:
                targets = optax.smooth_labels(targets, label_smoothing)
            loss = optax.softmax_cross_entropy(logits, targets).mean()
            if debug_nan_step >= 0:
                loss = loss * jnp.where(step + 1 == debug_nan_step, jnp.nan, 1.0)
            return loss, (logits, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, batch_stats)), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "step": step + 1,
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": batch_stats,
            "opt_state": opt_state,
            "rng": state["rng"],
        }
        top1 = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return new_state, {"loss": loss, "top1": top1, "lr": schedule(step)}

    repl = replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(repl, batch_sharded(mesh)),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )


def make_eval_step(
    model: nnx.Module, mesh: jax.sharding.Mesh, *, keep_logits: bool = False
) -> Callable[[Any, Any, dict], dict]:
    """Masked top-1/top-5 counts of a global batch: ``eval_step(params, batch_stats, batch)``.

    Returns sums {'top1', 'top5', 'count'} (and the logits with ``keep_logits``), so padded
    examples (mask 0) count for nothing and every image counts exactly once.
    """
    model.eval()
    graphdef, _, _, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

    def eval_fn(params: Any, batch_stats: Any, batch: dict) -> dict:
        logits = nnx.merge(graphdef, params, batch_stats, rest)(batch["image"])
        labels, mask = batch["label"], batch["mask"]
        k = min(5, logits.shape[-1])
        top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
        out = {
            "top1": jnp.sum(mask * (jnp.argmax(logits, -1) == labels)),
            "top5": jnp.sum(mask * top5),
            "count": jnp.sum(mask),
        }
        if keep_logits:
            out.update(logits=logits, labels=labels, mask=mask)
        return out

    repl = replicated(mesh)
    return jax.jit(eval_fn, in_shardings=(repl, repl, batch_sharded(mesh)), out_shardings=repl)


def init_state(
    model: nnx.Module, tx: optax.GradientTransformation, seed: int, mesh: jax.sharding.Mesh
) -> dict:
    """The train state at step 0, replicated on the mesh."""
    params, batch_stats = split_weights(model)
    host = {
        "step": np.int32(0),
        "params": jax.device_get(params),
        "batch_stats": jax.device_get(batch_stats),
        "rng": jax.device_get(jax.random.key_data(jax.random.key(seed))),
    }
    state = put_replicated(host, mesh)
    state["opt_state"] = jax.jit(tx.init, out_shardings=replicated(mesh))(state["params"])
    return state


# --------------------------------------------------------------------------------------------
# Checkpoints: workdir/checkpoints/<step>/{model, train, meta}.


def _no_metrics_warning(record: logging.LogRecord) -> bool:
    """Mid-epoch checkpoints have no eval metrics by design: drop Orbax's warning about it."""
    return "did not provide metrics" not in record.getMessage()


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    """Async Orbax manager keeping the latest ``keep`` checkpoints plus the best by top-1."""
    logging.getLogger("absl").addFilter(_no_metrics_warning)
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


def save_checkpoint(
    manager: ocp.CheckpointManager, state: dict, meta: dict, metrics: dict | None = None
) -> int:
    """Starts an async save of ``state`` at its step (device->host copy happens now)."""
    step = int(jax.device_get(state["step"]))
    weights = {"params": state["params"], "batch_stats": state["batch_stats"]}
    train = {"step": state["step"], "opt_state": state["opt_state"], "rng": state["rng"]}
    manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(weights),
            train=ocp.args.StandardSave(train),
            meta=ocp.args.JsonSave({**meta, "step": step}),
        ),
        metrics=metrics,
    )
    return step


def restore_state(manager: ocp.CheckpointManager, step: int, like: dict) -> dict:
    """The full train state at ``step``, placed like ``like`` (the freshly built state)."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like
    )
    weights = {"params": abstract["params"], "batch_stats": abstract["batch_stats"]}
    train = {k: abstract[k] for k in ("step", "opt_state", "rng")}
    out = manager.restore(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardRestore(weights), train=ocp.args.StandardRestore(train)
        ),
    )
    return {**out["model"], **out["train"]}


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


def read_checkpoint_meta(step_dir: str) -> dict:
    """The model description saved with a training checkpoint."""
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
        meta = ckptr.restore(os.path.join(step_dir, "meta"))
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{step_dir}: not an eca_flax training checkpoint")
    return meta


def _load_training_checkpoint(
    step_dir: str, meta: dict, config: ml_collections.ConfigDict, num_classes: int
) -> nnx.Module:
    """Rebuilds the checkpoint's model and loads its weights (a fresh head if classes differ)."""
    kw = dict(
        k_size=tuple(meta["k_size"]),
        attention=None if meta["attention"] == "none" else meta["attention"],
        dtype=DTYPES[config.dtype],
        seed=config.seed,
    )
    saved = pretrained.empty_model(meta["arch"], num_classes=meta["num_classes"], **kw)
    params, batch_stats = split_weights(saved)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        {"params": params, "batch_stats": batch_stats},
    )
    with ocp.StandardCheckpointer() as ckptr:
        weights = ckptr.restore(os.path.join(step_dir, "model"), abstract)
    nnx.update(saved, weights["params"], weights["batch_stats"])
    if meta["num_classes"] == num_classes:
        return saved
    old = pretrained.weight_paths(saved)
    shapes = pretrained.weight_paths(
        pretrained.empty_model(meta["arch"], num_classes=num_classes, **kw)
    )
    head = {p for p, v in shapes.items() if p not in old or old[p].shape != v.shape}
    model = pretrained.empty_model(meta["arch"], num_classes=num_classes, init=head, **kw)
    for path, var in pretrained.weight_paths(model).items():
        if path not in head:  # Everything but the new head comes from the checkpoint.
            var.set_value(old[path][...])
    return model


# --------------------------------------------------------------------------------------------
# Console output: process 0 prints; a progress bar on a terminal.


def _main_process() -> bool:
    return jax.process_index() == 0


def log(message: str) -> None:
    """A timestamped line on stdout from process 0."""
    if _main_process():
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


class Progress:
    """A one-line progress bar on stderr (terminals only), with rate and ETA."""

    def __init__(self, total: int, desc: str, unit: str = "img", initial: int = 0):
        self.total, self.desc, self.unit, self.initial = total, desc, unit, initial
        self.enabled = _main_process() and sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def update(self, done: int, extra: str = "") -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < 0.5 and done < self.total):
            return
        self.last = now
        frac = min(done / max(self.total, 1), 1.0)
        rate = (done - self.initial) / max(now - self.start, 1e-9)
        eta = (self.total - done) / rate if rate > 0 else 0.0
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        sys.stderr.write(
            f"\r{self.desc} [{bar}] {100 * frac:5.1f}% {rate:8.1f} {self.unit}/s "
            f"ETA {_duration(eta)} {extra}\033[K"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


# --------------------------------------------------------------------------------------------
# Evaluation.


@dataclasses.dataclass
class EvalResult:
    """Validation metrics; ``logits`` and ``labels`` (dataset order) only when asked for."""

    top1: float
    top5: float
    images: int
    logits: np.ndarray | None = None
    labels: np.ndarray | None = None

    def summary(self) -> str:
        return f"top1={self.top1:.4f} top5={self.top5:.4f} images={self.images}"


def evaluate(
    eval_step: Callable,
    state: dict,
    config: ml_collections.ConfigDict,
    plan: Plan,
    mesh: jax.sharding.Mesh,
    *,
    keep_logits: bool = False,
) -> EvalResult:
    """One pass over the validation split, every image counted exactly once."""
    batches = data.eval_iterator(
        config.dataset,
        config.data_dir or None,
        global_batch_size=plan.eval_batch_size,
        image_size=config.image_size,
        resize_size=config.eval_resize_size if config.eval_resize_size > 0 else None,
    )
    progress = Progress(plan.num_eval, "eval ")
    totals, kept = None, []
    for i, batch in enumerate(batches):
        out = eval_step(
            state["params"], state["batch_stats"], to_global(batch, mesh, plan.eval_batch_size)
        )
        if keep_logits:
            host = jax.device_get({k: out[k] for k in ("logits", "labels", "mask")})
            kept.append((host["logits"][host["mask"] > 0], host["labels"][host["mask"] > 0]))
        sums = {k: out[k] for k in ("top1", "top5", "count")}
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        progress.update(min((i + 1) * plan.eval_batch_size, plan.num_eval))
    progress.close()
    if totals is None:
        raise data.DataError(f"{config.dataset}: the validation split yielded no batches")
    totals = jax.device_get(totals)
    images = int(round(float(totals["count"])))
    result = EvalResult(float(totals["top1"]) / images, float(totals["top5"]) / images, images)
    if keep_logits:
        result.logits = np.concatenate([k[0] for k in kept])
        result.labels = np.concatenate([k[1] for k in kept])
    return result


# --------------------------------------------------------------------------------------------
# Training.


class Preemption:
    """SIGTERM handling: the loop finishes its step, saves, waits for the save and exits 0.

    With several processes, JAX's preemption sync point makes all of them stop at the same
    step (jax.distributed catches SIGTERM on any host); alone, a signal handler sets a flag.
    """

    def __init__(self) -> None:
        self.multihost = jax.process_count() > 1
        self.signalled = False
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        if not self.multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def requested(self, step: int) -> bool:
        if not self.multihost:
            return self.signalled
        from jax.experimental import multihost_utils

        try:
            return multihost_utils.reached_preemption_sync_point(step)
        except RuntimeError:  # No preemption service in this JAX setup.
            self.multihost = False
            return False


class TrainMetrics:
    """Per-step metrics stay on device; ``flush`` fetches them in one transfer at log steps.

    It raises TrainingError on a non-finite loss, so nothing is saved after a bad step.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.pending: list[tuple[int, dict]] = []
        self.since = time.perf_counter()

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> dict[str, float] | None:
        """Means over the pending steps plus images/s, or None if nothing is pending."""
        if not self.pending:
            return None
        steps = [s for s, _ in self.pending]
        values = jax.device_get([m for _, m in self.pending])
        for step, m in zip(steps, values):
            if not np.isfinite(m["loss"]):
                raise TrainingError(f"non-finite loss ({float(m['loss'])}) at step {step}")
        now = time.perf_counter()
        out = {k: float(np.mean([m[k] for m in values])) for k in ("loss", "top1")}
        out["lr"] = float(values[-1]["lr"])
        out["images_per_sec"] = len(steps) * self.batch_size / max(now - self.since, 1e-9)
        self.pending, self.since = [], now
        return out


@dataclasses.dataclass
class RunResult:
    """How a run ended: its last step, the last evaluation, and whether SIGTERM stopped it."""

    step: int
    eval: EvalResult | None
    preempted: bool = False
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # Log lines.


def _summary_writer(workdir: str) -> Any:
    """TensorBoard writer in workdir/tensorboard (process 0 only)."""
    if not _main_process():
        return None
    import tensorflow as tf

    return tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))


def _write_scalars(writer: Any, step: int, scalars: dict[str, float]) -> None:
    if writer is None:
        return
    import tensorflow as tf

    with writer.as_default(step=step):
        for name, value in scalars.items():
            tf.summary.scalar(name, value)
    writer.flush()


def _save_config(
    workdir: str, config: ml_collections.ConfigDict, plan: Plan, meta: dict, source: str
) -> None:
    """The resolved config, model and derived sizes as workdir/config.json, for the record."""
    if not _main_process():
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
        "eca_flax": eca_flax.__version__,
        "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # what this process started jax with
    }
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(record, f, indent=2, default=str)


def export_pretrained(
    model: nnx.Module,
    state: dict,
    config: ml_collections.ConfigDict,
    plan: Plan,
    path: str,
    result: EvalResult,
) -> None:
    """The final weights as a pretrained directory (model.json + state/), for load_pretrained.

    Single-process runs only: save_pretrained writes from one process, which Orbax does not
    allow in a multi-process job (there, ``init_from`` takes the workdir itself).
    """
    if jax.process_count() > 1:
        log(f"not exporting {path} from a multi-process run; init_from accepts the workdir")
        return
    host = lambda tree: jax.tree.map(np.asarray, tree)
    nnx.update(model, host(state["params"]), host(state["batch_stats"]))
    step = int(host(state["step"]))
    if _main_process():
        pretrained.save_pretrained(
            model,
            path,
            arch=config.model,
            attention=_attention(config),
            extra={
                "epoch": step // plan.steps_per_epoch,
                "step": step,
                "top1": 100 * result.top1,
                "top5": 100 * result.top5,
            },
            overwrite=True,
        )


def _check_resume(step_dir: str, meta: dict) -> None:
    """A workdir's checkpoints must be of the model being trained."""
    saved = read_checkpoint_meta(step_dir)
    keys = ("arch", "k_size", "attention", "num_classes")
    if any(saved.get(k) != meta[k] for k in keys):
        have = {k: saved.get(k) for k in keys}
        want = {k: meta[k] for k in keys}
        raise ConfigError(
            f"{step_dir} holds {have} but the config trains {want}; use another --workdir"
        )


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    keep_logits: bool = False,
) -> RunResult:
    """Trains (resuming from the workdir's latest checkpoint) or evaluates (``eval_only``).

    ``mesh`` defaults to every device; ``keep_logits`` returns the evaluation's logits.
    """
    config = resolve_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    mesh = make_mesh() if mesh is None else mesh
    plan = make_plan(config, mesh)
    init_from = config.init_from
    if config.eval_only and not init_from:  # Evaluate this workdir's latest checkpoint.
        if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
            raise ConfigError(
                f"eval_only needs --config.init_from=DIR (a converter output, a training "
                f"workdir or checkpoint) or a training checkpoint in --workdir {workdir}"
            )
        init_from = workdir
    with config.unlocked():
        config.init_from = init_from
    model, source = build_model(config, plan.num_classes)
    meta = _model_meta(model, config, plan.num_classes)
    eval_step = make_eval_step(model, mesh, keep_logits=keep_logits)

    if config.eval_only:
        params, batch_stats = split_weights(model)
        state = put_replicated({"params": params, "batch_stats": batch_stats}, mesh)
        log(
            f"evaluating {config.model} from {source} on {config.dataset} "
            f"({plan.num_eval} images, {mesh.devices.size} devices)"
        )
        result = evaluate(eval_step, state, config, plan, mesh, keep_logits=keep_logits)
        log(f"eval {result.summary()}")
        return RunResult(0, result)

    schedule = make_schedule(config, plan)
    tx = make_optimizer(config, schedule)
    train_step = make_train_step(
        model,
        tx,
        schedule,
        mesh,
        num_classes=plan.num_classes,
        label_smoothing=config.label_smoothing,
        debug_nan_step=config.debug_nan_step,
    )
    state = init_state(model, tx, config.seed, mesh)

    manager = checkpoint_manager(workdir, config.keep_checkpoints)
    step = manager.latest_step() or 0
    if step:
        _check_resume(os.path.join(manager.directory, str(step)), meta)
        state = restore_state(manager, step, state)
        log(f"resuming from {manager.directory}/{step} (step {step})")
    else:
        log(f"starting from {source}")
    _save_config(workdir, config, plan, meta, source)
    log(
        f"training {config.model} on {config.dataset} with {mesh.devices.size} devices "
        f"({jax.process_count()} processes): {plan.total_steps} steps of {plan.batch_size} "
        f"images ({plan.steps_per_epoch} per epoch), peak lr {plan.learning_rate:g}"
    )

    writer = _summary_writer(workdir)
    metrics = TrainMetrics(plan.batch_size)
    batches = data.train_iterator(
        config.dataset,
        config.data_dir or None,
        global_batch_size=plan.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=step,
        area_range=(config.min_crop_area, 1.0),
        augment=config.augment,
        hflip=config.hflip,
    )
    images = lambda steps: steps * plan.batch_size
    progress = Progress(images(plan.total_steps), "train", initial=images(step))
    result: EvalResult | None = None
    history: list[dict[str, float]] = []
    saved = step
    try:
        with Preemption() as preemption:
            while step < plan.total_steps:
                state, step_metrics = train_step(
                    state, to_global(next(batches), mesh, plan.batch_size)
                )
                step += 1
                metrics.add(step, step_metrics)
                epoch, epoch_end = divmod(step, plan.steps_per_epoch)
                epoch_end = epoch_end == 0
                last = step == plan.total_steps
                do_eval = last or (epoch_end and epoch % config.eval_every_epochs == 0)
                do_save = last or epoch_end or step % config.checkpoint_every_steps == 0
                stop = preemption.requested(step)
                progress.update(images(step), extra=f"step {step}/{plan.total_steps}")
                if step % config.log_every_steps == 0 or do_eval or do_save or stop:
                    scalars = metrics.flush()  # Raises on a non-finite loss: nothing saved.
                    progress.close()
                    eta = _duration(
                        (plan.total_steps - step) * plan.batch_size / scalars["images_per_sec"]
                    )
                    log(
                        f"step {step}/{plan.total_steps} epoch {step / plan.steps_per_epoch:.2f} "
                        f"loss {scalars['loss']:.4f} top1 {scalars['top1']:.4f} "
                        f"lr {scalars['lr']:.5g} {scalars['images_per_sec']:.1f} img/s "
                        f"ETA {eta}"
                    )
                    _write_scalars(writer, step, {f"train/{k}": v for k, v in scalars.items()})
                    history.append({"step": step, **scalars})
                result = None
                if do_eval:
                    result = evaluate(eval_step, state, config, plan, mesh, keep_logits=keep_logits)
                    log(f"eval step={step} {result.summary()}")
                    _write_scalars(
                        writer, step, {"eval/top1": result.top1, "eval/top5": result.top5}
                    )
                if do_save or stop:
                    ev = None if result is None else {"top1": result.top1, "top5": result.top5}
                    saved = save_checkpoint(manager, state, meta, ev)
                if stop:
                    manager.wait_until_finished()
                    log(
                        f"SIGTERM: saved checkpoint {manager.directory}/{step}; run the same "
                        "command to resume"
                    )
                    return RunResult(step, result, preempted=True, history=history)
        if result is None:  # Resumed a finished run: evaluate the final state again.
            result = evaluate(eval_step, state, config, plan, mesh, keep_logits=keep_logits)
        export_pretrained(model, state, config, plan, os.path.join(workdir, "pretrained"), result)
        log(f"final step={step} {result.summary()}")
        return RunResult(step, result, history=history)
    except TrainingError as e:
        manager.wait_until_finished()
        good = f"{manager.directory}/{saved}" if saved else "none was saved"
        raise TrainingError(f"{e}; stopped, the last good checkpoint is {good}") from None
    finally:
        progress.close()
        manager.wait_until_finished()
        manager.close()
        if writer is not None:
            writer.close()
