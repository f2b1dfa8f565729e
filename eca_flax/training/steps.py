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

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from eca_flax.data.transforms import MEAN_RGB, STD_RGB
from eca_flax.training.config import Plan
from eca_flax.training.mesh import batch_sharded, put_replicated, replicated


def normalize_images(images: jax.Array) -> jax.Array:
    """uint8 RGB batches -> (x / 255 - mean) / std in float32, on the device (inside the steps:
    the host sends a quarter of the bytes and does no float work)."""
    x = images.astype(jnp.float32) / 255.0
    return (x - jnp.asarray(MEAN_RGB, jnp.float32)) / jnp.asarray(STD_RGB, jnp.float32)


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


def make_train_step(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: jax.sharding.Mesh,
    *,
    num_classes: int,
    label_smoothing: float,
    debug_nan_step: int = -1,
    ema_decay: float = 0.0,
    ema_warmup: bool = False,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """One SGD step over a global batch: ``state, metrics = train_step(state, batch)``.

    ``batch``: uint8 'image' (B, S, S, 3), int32 'label' (and 'damaged' counts, optional).
    With ``ema_decay`` > 0 the state's EMA moves towards the new weights (``ema_decay_at``).
    Compiled once with ``jax.jit`` over the mesh; the state is donated. Metrics (loss, batch
    top-1, learning rate, damaged files replaced) are replicated scalars.
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
            logits = m(normalize_images(batch["image"]))
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
        new_state = dict(state, step=step + 1, batch_stats=batch_stats, opt_state=opt_state)
        new_state["params"] = optax.apply_updates(state["params"], updates)
        if ema_decay:
            new_state["ema"] = update_ema(state, new_state, ema_decay, ema_warmup)
        top1 = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        damaged = jnp.sum(batch["damaged"]) if "damaged" in batch else jnp.int32(0)
        return new_state, {"loss": loss, "top1": top1, "lr": schedule(step), "damaged": damaged}

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

    ``batch``: uint8 'image', 'label', 'mask' (and 'damaged'). Returns sums {'top1', 'top5',
    'count', 'damaged'} (and the logits with ``keep_logits``), so padded examples (mask 0)
    count for nothing and every image counts exactly once.
    """
    model.eval()
    graphdef, _, _, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

    def eval_fn(params: Any, batch_stats: Any, batch: dict) -> dict:
        logits = nnx.merge(graphdef, params, batch_stats, rest)(normalize_images(batch["image"]))
        labels, mask = batch["label"], batch["mask"]
        k = min(5, logits.shape[-1])
        top5 = jnp.any(jax.lax.top_k(logits, k)[1] == labels[:, None], axis=-1)
        out = {
            "top1": jnp.sum(mask * (jnp.argmax(logits, -1) == labels)),
            "top5": jnp.sum(mask * top5),
            "count": jnp.sum(mask),
            "damaged": jnp.sum(batch["damaged"]) if "damaged" in batch else jnp.int32(0),
        }
        if keep_logits:
            out.update(logits=logits, labels=labels, mask=mask)
        return out

    repl = replicated(mesh)
    return jax.jit(eval_fn, in_shardings=(repl, repl, batch_sharded(mesh)), out_shardings=repl)


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
