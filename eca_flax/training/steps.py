"""The optimizer, the learning-rate schedule and the jitted train and eval steps.

State is a dict of arrays: step, params, batch_stats, opt_state, rng, and with an EMA of the
weights (``ema_decay`` > 0) ema = {params, batch_stats}. params and batch_stats are pure nested
dicts (``nnx.to_pure_dict``: checkpoint keys like params/layer1/0/conv1/kernel,
independent of Flax's Variable classes). The steps are pure functions over arrays (``nnx.split``
once, ``nnx.merge`` inside the traced function), compiled once with ``jax.jit`` over the mesh.
Batches arrive as uint8 and are normalized here, on the device. This module needs no input
pipeline (and no TensorFlow): the benchmark uses it as is.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from eca_flax import errors
from eca_flax.data.transforms import normalize
from eca_flax.training.config import Plan
from eca_flax.training.memory import buffer_bytes, device_memory
from eca_flax.training.mesh import batch_sharded, put_replicated, replicated
from eca_flax.training.mixing import Mixing, mix_batch

MIXING_STREAM = 1  # fold_in tag of the mixing key (dropout takes the step key itself)


# What the learning rate of every step depends on: schedule_settings' keys, in this order.
SCHEDULE_KEYS = (
    "recipe",
    "schedule",
    "num_epochs",
    "steps_per_epoch",
    "learning_rate",
    "base_batch_size",
    "warmup_epochs",
    "lr_decay_epochs",
    "lr_decay_factor",
)


def make_schedule(config: ml_collections.ConfigDict, plan: Plan) -> optax.Schedule:
    """Learning rate per step (optimizer update count), from optax.

    "step" is the original's lr * factor ** (epoch // decay_epochs): ResNets 0.1 * 0.1 **
    (epoch // 30), MobileNetV2 0.045 * 0.98 ** epoch. "cosine" decays to 0 over the
    ``num_epochs`` after ``warmup_epochs`` of linear warmup. Never over ``num_train_steps``: a
    capped run follows the whole run's schedule and stops early on it, so resuming with another
    cap continues on the same learning rates.
    """
    spe = max(plan.steps_per_epoch, 1)
    if config.schedule == "step":
        return optax.exponential_decay(
            plan.learning_rate,
            transition_steps=config.lr_decay_epochs * spe,
            decay_rate=config.lr_decay_factor,
            staircase=True,
        )
    length = config.num_epochs * spe  # num_epochs >= 1 (resolve_config)
    warmup = min(config.warmup_epochs * spe, length - 1)
    return optax.warmup_cosine_decay_schedule(0.0, plan.learning_rate, warmup, length, 0.0)


def schedule_settings(config: ml_collections.ConfigDict, plan: Plan) -> dict[str, Any]:
    """make_schedule's inputs (SCHEDULE_KEYS), None where the schedule kind ignores a field,
    with the recipe that set them: checkpoints record them and a resume with other values is
    refused (checkpoints.check_resume). ``num_train_steps`` is not one of them."""
    step = config.schedule == "step"
    return {
        "recipe": config.recipe,
        "schedule": config.schedule,
        "num_epochs": config.num_epochs,
        "steps_per_epoch": plan.steps_per_epoch,
        "learning_rate": config.learning_rate,
        "base_batch_size": config.base_batch_size,
        "warmup_epochs": None if step else config.warmup_epochs,
        "lr_decay_epochs": config.lr_decay_epochs if step else None,
        "lr_decay_factor": config.lr_decay_factor if step else None,
    }


def _decayed(params: Any) -> Any:
    """The parameters weight decay applies to without decay_bn_bias: the >= 2-D ones (conv and
    fc kernels), not BatchNorm scales/biases and biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


_HEADS = ("head", "fc", "classifier")  # the classifier's top-level names (no AGC there)


def _clipped(params: Any) -> Any:
    """The parameters adaptive gradient clipping applies to: all but the classifier, which
    NFNets leave unclipped (Brock et al. 2021, section 4.1; timm's exclude_head)."""
    out = {}
    for name, subtree in params.items():
        keep = name not in _HEADS
        out[name] = jax.tree.map(lambda _, keep=keep: keep, subtree)
    return out


def make_optimizer(
    config: ml_collections.ConfigDict, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """``optimizer="sgd"``: PyTorch's SGD(momentum, weight_decay), the decay added to the
    gradient before momentum. ``"lamb"``: ``lamb`` below. ``agc_clip`` > 0 first clips each
    gradient unit-wise to agc_clip times its weight's norm (``optax.adaptive_grad_clip``, as
    NFNets are trained), the classifier excepted; 0 adds nothing (the optimizer state stays
    the same as without the option)."""
    mask = None if config.decay_bn_bias else _decayed
    if config.optimizer == "lamb":
        opt = lamb(schedule, config.weight_decay, mask)
    else:
        opt = optax.chain(
            optax.add_decayed_weights(config.weight_decay, mask=mask),
            optax.sgd(schedule, momentum=config.momentum, nesterov=config.nesterov),
        )
    if config.get("agc_clip", 0.0) > 0:
        opt = optax.chain(optax.masked(optax.adaptive_grad_clip(config.agc_clip), _clipped), opt)
    return opt


LAMB_BETAS = (0.9, 0.999)
LAMB_EPS = 1e-6
LAMB_MAX_GRAD_NORM = 1.0


def lamb(
    learning_rate: optax.ScalarOrSchedule, weight_decay: float, mask: Any = None
) -> optax.GradientTransformation:
    """LAMB (You et al. 2020) as timm's ``Lamb`` (NVIDIA's FusedLAMB), which "ResNet strikes
    back" trains with. Per step, for gradients g of the parameters p:

        g <- g / max(1, ||g||_global / 1.0)                  (global norm clipped to 1)
        m, v: Adam moments (0.9, 0.999); u = m_hat / (sqrt(v_hat) + 1e-6)
        decayed p:   u <- u + wd p;  u <- u * ||p|| / ||u||  (trust ratio per tensor; 1 if a
                                                              norm is 0)
        p <- p - lr u

    Parameters outside ``mask`` (BatchNorm and biases when ``decay_bn_bias=False``) take the
    plain Adam step, without decay or trust ratio, as in timm; with ``weight_decay=0`` every
    parameter does. Built from optax's pieces (``optax.lamb`` applies the trust ratio to every
    parameter and does not clip).
    """
    parts = [
        optax.clip_by_global_norm(LAMB_MAX_GRAD_NORM),
        optax.scale_by_adam(*LAMB_BETAS, eps=LAMB_EPS),
    ]
    if weight_decay:
        decayed = (lambda params: jax.tree.map(lambda _: True, params)) if mask is None else mask
        parts += [
            optax.add_decayed_weights(weight_decay, mask=decayed),
            optax.masked(optax.scale_by_trust_ratio(), decayed),
        ]
    return optax.chain(*parts, optax.scale_by_learning_rate(learning_rate))


def classification_loss(
    logits: jax.Array, targets: jax.Array, loss: str = "softmax_ce", bce_target_thresh: float = -1.0
) -> jax.Array:
    """Mean loss of a batch against (B, K) targets (one-hot, smoothed or mixed).

    "softmax_ce": cross-entropy of the softmax. "bce": binary cross-entropy of each class's
    sigmoid, averaged over the B x K entries (timm's BinaryCrossEntropy); with
    ``bce_target_thresh >= 0`` targets above it become 1 and the others 0 (RSB: 0.2, so both
    classes of a mixed image count as present).
    """
    if loss == "bce":
        if bce_target_thresh >= 0:
            targets = (targets > bce_target_thresh).astype(logits.dtype)
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean()
    return optax.softmax_cross_entropy(logits, targets).mean()


def split_weights(model: nnx.Module) -> tuple[dict, dict]:
    """(params, batch_stats) of a model as pure nested dicts of arrays."""
    _, params, batch_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)


def _rng_streams(model: nnx.Module) -> tuple[str, ...]:
    """Tags of the RNG streams a model draws from in training (MobileNetV2's dropout)."""
    return tuple(sorted({n.tag for _, n in nnx.iter_graph(model) if isinstance(n, nnx.RngStream)}))


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The EMA decay of update ``step`` (0-based): ``decay``, or with ``warmup``
    min(decay, (1 + step) / (10 + step)) (TensorFlow's ExponentialMovingAverage with
    num_updates), so that the average soon forgets the random initialisation."""
    d = jnp.float32(decay)
    if warmup:
        t = jnp.asarray(step, jnp.float32)
        d = jnp.minimum(d, (1 + t) / (10 + t))
    return d


def update_ema(state: dict, new: dict, decay: float, warmup: bool) -> dict:
    """The EMA after the update from ``state`` to ``new``: d * ema + (1 - d) * new weights, leaf
    by leaf (params and batch_stats), d = ``ema_decay_at(state's step)``."""
    d = ema_decay_at(state["step"], decay, warmup)
    weights = {k: new[k] for k in state["ema"]}
    return jax.tree.map(lambda e, w: (d * e + (1 - d) * w).astype(e.dtype), state["ema"], weights)


def copy_weights(state: dict) -> dict:
    """{params, batch_stats} of ``state`` in new buffers placed like them: the EMA's start (the
    train step donates the state, so the EMA cannot share the weights' buffers)."""
    weights = {"params": state["params"], "batch_stats": state["batch_stats"]}
    shardings = jax.tree.map(lambda x: x.sharding, weights)
    return jax.jit(lambda w: jax.tree.map(jnp.copy, w), out_shardings=shardings)(weights)


def make_inputs(
    config: ml_collections.ConfigDict, num_classes: int
) -> Callable[[dict, jax.Array], tuple[jax.Array, jax.Array]]:
    """``inputs(batch, key) -> (images, targets)`` for the train step: normalized images and
    one-hot targets, label-smoothed and Mixup / CutMix-ed (with ``key``) as the config asks."""
    mixing = Mixing.from_config(config)

    def inputs(batch: dict, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        images = normalize(batch["image"])
        targets = jax.nn.one_hot(batch["label"], num_classes)
        if config.label_smoothing:
            targets = optax.smooth_labels(targets, config.label_smoothing)
        if mixing is not None:
            images, targets, _ = mix_batch(key, images, targets, mixing)
        return images, targets

    return inputs


def make_train_step(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    config: ml_collections.ConfigDict,
    *,
    num_classes: int,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """One optimizer step over a global batch: ``state, metrics = train_step(state, batch)``.

    ``batch``: uint8 'image' (B, S, S, 3), int32 'label' (and 'damaged' counts, optional).
    From ``config``: the targets (``label_smoothing``; Mixup / CutMix of the normalized batch,
    training/mixing.py), the loss (``loss``, ``bce_target_thresh``: ``classification_loss``),
    the EMA of the weights (``ema_decay`` > 0: ``ema_decay_at``).
    Compiled once with ``jax.jit`` over the mesh; the state is donated. Metrics (loss, batch
    top-1 against the unmixed labels, learning rate, damaged files replaced) are replicated.
    """
    c = config
    model.train()
    graphdef, _, _, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    streams = _rng_streams(model)
    inputs = make_inputs(c, num_classes)

    def step_fn(state: dict, batch: dict) -> tuple[dict, dict]:
        step = state["step"]
        # Dropout and mixing keys depend on (seed, step) only: resumes are exact.
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
        images, targets = inputs(batch, jax.random.fold_in(key, MIXING_STREAM))

        def loss_fn(params: Any) -> tuple[jax.Array, tuple[jax.Array, Any]]:
            m = nnx.merge(graphdef, params, state["batch_stats"], rest, copy=True)
            if streams:
                nnx.reseed(m, **{s: key for s in streams})
            logits = m(images)
            value = classification_loss(logits, targets, c.loss, c.bce_target_thresh)
            return value, (logits, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat)))

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (value, (logits, batch_stats)), grads = grad_fn(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = dict(state, step=step + 1, batch_stats=batch_stats, opt_state=opt_state)
        new_state["params"] = optax.apply_updates(state["params"], updates)
        if c.ema_decay:
            new_state["ema"] = update_ema(state, new_state, c.ema_decay, c.ema_warmup)
        top1 = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        damaged = jnp.sum(batch["damaged"]) if "damaged" in batch else jnp.int32(0)
        return new_state, {"loss": value, "top1": top1, "lr": schedule(step), "damaged": damaged}

    repl = replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(repl, batch_sharded(mesh)),
        out_shardings=(repl, repl),
        donate_argnums=(0,),
    )


def make_eval_step(model: nnx.Module, mesh: jax.sharding.Mesh) -> Callable[[Any, Any, dict], dict]:
    """Masked top-1/top-5 counts of a global batch: ``eval_step(params, batch_stats, batch)``.

    ``batch``: uint8 'image', 'label', 'mask' (and 'damaged'). Returns sums {'top1', 'top5',
    'count', 'damaged'}, so padded examples (mask 0) count for nothing and every image counts
    exactly once, and the batch's 'logits', 'labels' and 'mask' (read only when asked for).
    """
    model.eval()
    graphdef, _, _, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

    def eval_fn(params: Any, batch_stats: Any, batch: dict) -> dict:
        logits = nnx.merge(graphdef, params, batch_stats, rest)(normalize(batch["image"]))
        labels, mask = batch["label"], batch["mask"]
        k = min(5, logits.shape[-1])
        top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
        out = {
            "top1": jnp.sum(mask * (jnp.argmax(logits, -1) == labels)),
            "top5": jnp.sum(mask * top5),
            "count": jnp.sum(mask),
            "damaged": jnp.sum(batch["damaged"]) if "damaged" in batch else jnp.int32(0),
        }
        return {**out, "logits": logits, "labels": labels, "mask": mask}

    repl = replicated(mesh)
    return jax.jit(eval_fn, in_shardings=(repl, repl, batch_sharded(mesh)), out_shardings=repl)


def check_memory(
    step_fn: Any, args: tuple, *, step: str, batch_size: int, image_size: int, mesh: Any
) -> None:
    """Compiles the jitted ``step_fn`` for ``args`` (the call that follows reuses it) and raises
    ``errors.OutOfMemory`` when its buffers exceed what a device has (``device_memory``; the
    CPU devices of a process share the host's). Otherwise the first call asks for them: XLA
    refuses where the kernel refuses such a malloc, and where it grants any (overcommit_memory
    1) the process is killed mid-step. A step that fits but leaves too little for the rest of
    the process can still fail as it runs."""
    needed = buffer_bytes(step_fn.lower(*args).compile())
    device = mesh.devices.flat[0]
    limit = device_memory(device)
    sharing = len(mesh.local_devices) if device.platform == "cpu" else 1
    if limit is not None and needed * sharing > limit:  # NaN (not known) never is
        raise errors.OutOfMemory(
            step,
            batch_size=batch_size,
            image_size=image_size,
            asked=int(needed),
            devices=mesh.devices.size,
        )


def asked_bytes(error: jax.errors.JaxRuntimeError) -> int | None:
    """The bytes an XLA out-of-memory error asked for ("... allocating 98815805776 bytes"),
    None when its message does not say: the only place the number is."""
    found = re.search(r"(\d+) bytes", error.error_message)
    return int(found.group(1)) if found else None


@contextlib.contextmanager
def out_of_memory(step: str, batch_size: int, image_size: int, devices: int) -> Iterator[None]:
    """Around compiling, running and reading a ``step`` ("train" or "eval") of ``batch_size``
    (global) ``image_size`` images on ``devices`` devices: XLA's RESOURCE_EXHAUSTED (raised when
    a result is awaited) becomes ``errors.OutOfMemory``, a one-line error saying what to lower."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if e.error_code_string != "RESOURCE_EXHAUSTED":
            raise
        asked = asked_bytes(e)
        raise errors.OutOfMemory(
            step, batch_size=batch_size, image_size=image_size, asked=asked, devices=devices
        ) from e


def init_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    seed: int,
    mesh: jax.sharding.Mesh,
    *,
    ema: bool = False,
) -> dict:
    """The train state at step 0, replicated on the mesh; with ``ema``, an EMA of the weights
    starting at them."""
    params, batch_stats = split_weights(model)
    host = {
        "step": np.int32(0),
        "params": jax.device_get(params),
        "batch_stats": jax.device_get(batch_stats),
        "rng": jax.device_get(jax.random.key_data(jax.random.key(seed))),
    }
    state = put_replicated(host, mesh)
    state["opt_state"] = jax.jit(tx.init, out_shardings=replicated(mesh))(state["params"])
    if ema:
        state["ema"] = copy_weights(state)
    return state
