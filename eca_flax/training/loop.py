"""The training loop (``train_and_evaluate``, what train.py runs) and evaluation.

Runs resume exactly: a checkpoint holds the step, parameters, BatchNorm statistics, optimizer
state and RNG, and the input pipeline is deterministic given (seed, step), so the step number
is the data position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eca_flax import data, pretrained
from eca_flax.training import checkpoints, reporting
from eca_flax.training.config import (
    ConfigError,
    Interrupted,
    Plan,
    TrainingError,
    make_plan,
    resolve_config,
)
from eca_flax.training.mesh import make_mesh, prefetch_to_mesh, put_replicated
from eca_flax.training.reporting import logger
from eca_flax.training.steps import (
    init_state,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    split_weights,
)


@dataclasses.dataclass
class EvalResult:
    """Validation metrics; ``logits`` and ``labels`` (dataset order) only when asked for."""

    top1: float
    top5: float
    images: int
    skipped: int = 0  # damaged images left out (skip_damaged_images)
    logits: np.ndarray | None = None
    labels: np.ndarray | None = None

    def summary(self) -> str:
        skipped = f" skipped={self.skipped}" if self.skipped else ""
        return f"top1={self.top1:.4f} top5={self.top5:.4f} images={self.images}{skipped}"


@dataclasses.dataclass
class RunResult:
    """How a run ended: its last step, the last evaluation, and whether SIGTERM stopped it."""

    step: int
    eval: EvalResult | None
    preempted: bool = False
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # Log lines.


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
        skip_damaged=config.skip_damaged_images,
        threads=config.data_threads or None,
    )
    totals, kept = None, []
    with reporting.progress(plan.num_eval, "eval") as bar:
        for batch in prefetch_to_mesh(batches, mesh, plan.eval_batch_size):
            out = eval_step(state["params"], state["batch_stats"], batch)
            if keep_logits:
                host = jax.device_get({k: out[k] for k in ("logits", "labels", "mask")})
                kept.append((host["logits"][host["mask"] > 0], host["labels"][host["mask"] > 0]))
            sums = {k: out[k] for k in ("top1", "top5", "count", "damaged")}
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            bar.update(min(plan.eval_batch_size, plan.num_eval - bar.n))
    if totals is None:
        raise data.DataError(f"{config.dataset}: the validation split yielded no batches")
    totals = jax.device_get(totals)
    images = int(round(float(totals["count"])))
    if not images:
        raise data.DataError(f"{config.dataset}: no readable validation image")
    result = EvalResult(float(totals["top1"]) / images, float(totals["top5"]) / images, images,
                        skipped=int(totals["damaged"]))  # fmt: skip
    if keep_logits:
        result.logits = np.concatenate([k[0] for k in kept])
        result.labels = np.concatenate([k[1] for k in kept])
    return result


class Preemption:
    """SIGTERM and Ctrl-C: the loop finishes its step, saves, waits for the save and stops.

    A second Ctrl-C stops at once (KeyboardInterrupt), without saving. With several processes,
    JAX's preemption sync point makes all of them stop at the same step (jax.distributed catches
    SIGTERM on any host); alone, signal handlers set a flag.
    """

    def __init__(self) -> None:
        self.multihost = jax.process_count() > 1
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            signals = [signal.SIGINT] + ([] if self.multihost else [signal.SIGTERM])
            self._previous = {s: signal.signal(s, self._handle) for s in signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal == "Ctrl-C" and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second one
        self.signal = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        if signum == signal.SIGINT:
            logger.warning("Ctrl-C: finishing this step and saving a checkpoint (Ctrl-C again "
                           "stops at once, without saving)")  # fmt: skip

    def requested(self, step: int) -> bool:
        if self.signal or not self.multihost:
            return self.signal is not None
        from jax.experimental import multihost_utils

        try:
            if multihost_utils.reached_preemption_sync_point(step):
                self.signal = "SIGTERM"
        except RuntimeError:  # No preemption service in this JAX setup.
            self.multihost = False
        return self.signal is not None


def export_pretrained(
    model: nnx.Module,
    state: dict,
    config: ml_collections.ConfigDict,
    plan: Plan,
    path: str,
    result: EvalResult,
) -> None:
    """The weights of ``state`` as a pretrained directory (model.json + state/), for
    load_pretrained and predict: workdir/pretrained at the end, workdir/best at each new best.

    Single-process runs only: save_pretrained writes from one process, which Orbax does not
    allow in a multi-process job (there, ``init_from`` takes the workdir itself).
    """
    if jax.process_count() > 1:
        return
    host = lambda tree: jax.tree.map(np.asarray, tree)
    nnx.update(model, host(state["params"]), host(state["batch_stats"]))
    step = int(host(state["step"]))
    pretrained.save_pretrained(
        model,
        path,
        arch=pretrained.describe(model)["arch"],
        attention=model.attention,
        image_size=config.image_size,
        resize_size=config.eval_resize_size if config.eval_resize_size > 0 else None,
        extra={
            "epoch": step // plan.steps_per_epoch,
            "step": step,
            "top1": 100 * result.top1,
            "top5": 100 * result.top5,
        },
        overwrite=True,
    )


def _best_top1(path: str) -> float:
    """The top-1 (in %) of the best model exported so far, or -1."""
    try:
        return float(pretrained.read_model_json(path).get("top1", -1))
    except pretrained.PretrainedError:
        return -1.0


def _train_batches(
    config: ml_collections.ConfigDict, plan: Plan, start_step: int, mesh
) -> Iterator:
    """The global train batches from ``start_step`` on, transfers to the devices in flight."""
    batches = data.train_iterator(
        config.dataset,
        config.data_dir or None,
        global_batch_size=plan.batch_size,
        image_size=config.image_size,
        seed=config.seed,
        start_step=start_step,
        area_range=(config.min_crop_area, 1.0),
        augment=config.augment,
        hflip=config.hflip,
        skip_damaged=config.skip_damaged_images,
        threads=config.data_threads or None,
        workers=config.data_workers,
    )
    return prefetch_to_mesh(batches, mesh, plan.batch_size)


def _evaluate_only(config, workdir: str, plan: Plan, mesh, keep_logits: bool) -> RunResult:
    """eval_only: init_from's weights (or the workdir's latest checkpoint) on the val split."""
    if not config.init_from:
        if not os.path.isdir(os.path.join(workdir, checkpoints.CHECKPOINT_DIR)):
            raise ConfigError(
                f"eval_only needs --config.init_from=DIR (a converter output, a training "
                f"workdir or checkpoint) or a training checkpoint in --workdir {workdir}"
            )
        with config.unlocked():  # our own resolved copy
            config.init_from = workdir
    model, source = checkpoints.build_model(config, plan.num_classes)
    params, batch_stats = split_weights(model)
    state = put_replicated({"params": params, "batch_stats": batch_stats}, mesh)
    logger.info(
        f"evaluating {config.model} from {source} on {config.dataset} "
        f"({plan.num_eval} images, {mesh.devices.size} devices)"
    )
    eval_step = make_eval_step(model, mesh, keep_logits=keep_logits)
    result = evaluate(eval_step, state, config, plan, mesh, keep_logits=keep_logits)
    logger.info(f"eval {result.summary()}")
    return RunResult(0, result)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    keep_logits: bool = False,
) -> RunResult:
    """Trains (resuming from the workdir's newest good checkpoint) or evaluates (``eval_only``).

    ``mesh`` defaults to every device; ``keep_logits`` returns the evaluation's logits.
    """
    reporting.setup_logging()
    config = resolve_config(config)
    mesh = make_mesh() if mesh is None else mesh
    plan = make_plan(config, mesh)
    if config.eval_only:
        return _evaluate_only(config, os.path.abspath(workdir), plan, mesh, keep_logits)
    new = not os.path.lexists(os.path.abspath(os.path.expanduser(workdir)))
    workdir = checkpoints.prepare_workdir(workdir)
    try:
        with checkpoints.WorkdirLock(workdir):
            return _train(config, workdir, plan, mesh, keep_logits)
    except BaseException:
        if new:  # a run that stopped before writing anything leaves no workdir behind
            with contextlib.suppress(OSError):
                os.rmdir(workdir)
        raise


def _train(config, workdir: str, plan: Plan, mesh, keep_logits: bool) -> RunResult:
    """The training loop, in a locked workdir."""
    model, source = checkpoints.build_model(config, plan.num_classes)
    meta = checkpoints.model_meta(model, config, plan.num_classes)
    eval_step = make_eval_step(model, mesh, keep_logits=keep_logits)
    schedule = make_schedule(config, plan)
    tx = make_optimizer(config, schedule)
    train_step = make_train_step(model, tx, schedule, mesh, num_classes=plan.num_classes,
                                 label_smoothing=config.label_smoothing,
                                 debug_nan_step=config.debug_nan_step)  # fmt: skip
    ckpt = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
    step, state = ckpt.restore_latest(init_state(model, tx, config.seed, mesh), meta)
    logger.info(f"resuming from {ckpt.root}/{step} (step {step})" if step else
                f"starting from {source}")  # fmt: skip
    reporting.save_config(workdir, config, plan, meta, source)
    logger.info(
        f"training {config.model} on {config.dataset} with {mesh.devices.size} devices "
        f"({jax.process_count()} processes): {plan.total_steps} steps of {plan.batch_size} "
        f"images ({plan.steps_per_epoch} per epoch), peak lr {plan.learning_rate:g}"
    )
    board, profiler = reporting.TensorBoard(workdir), reporting.Profiler(config, workdir)
    metrics = reporting.StepMetrics(plan.batch_size)
    batches = _train_batches(config, plan, step, mesh)
    bar = reporting.progress(plan.total_steps * plan.batch_size, "train", step * plan.batch_size)
    best = os.path.join(workdir, "best")
    result, history, damaged, best_top1 = None, [], 0, _best_top1(best)
    evaluate_now = lambda: evaluate(eval_step, state, config, plan, mesh, keep_logits=keep_logits)
    try:
        with Preemption() as preemption:
            while step < plan.total_steps:
                profiler.before_step(step + 1)
                state, step_metrics = train_step(state, next(batches))
                step += 1
                profiler.after_step(step, step_metrics)
                metrics.add(step, step_metrics)
                bar.update(plan.batch_size)
                epoch, into_epoch = divmod(step, plan.steps_per_epoch)
                last = step == plan.total_steps
                do_eval = last or (into_epoch == 0 and epoch % config.eval_every_epochs == 0)
                do_save = last or into_epoch == 0 or step % config.checkpoint_every_steps == 0
                stop = preemption.requested(step)
                if step % config.log_every_steps == 0 or do_eval or do_save or stop:
                    history.append(_log_train(step, plan, metrics.flush(), board))
                    damaged += history[-1]["damaged"]
                if into_epoch == 0 and damaged:
                    logger.warning(f"epoch {epoch}: {damaged} damaged training images skipped")
                    damaged = 0
                if do_save or stop:  # first: a failing evaluation cannot cost the epoch
                    ckpt.save(state, meta)
                if stop:
                    ckpt.wait()
                    saved = f"saved checkpoint {ckpt.root}/{step}; run the same command to resume"
                    if preemption.signal == "Ctrl-C":
                        raise Interrupted(saved)
                    logger.info(f"{preemption.signal}: {saved}")
                    return RunResult(step, None, preempted=True, history=history)
                result = evaluate_now() if do_eval else None
                if result is not None:
                    logger.info(f"eval step={step} {result.summary()}")
                    board.scalars(step, {"eval/top1": result.top1, "eval/top5": result.top5})
                    if 100 * result.top1 > best_top1:
                        best_top1 = 100 * result.top1
                        ckpt.wait()  # a failed save is reported before anything else
                        export_pretrained(model, state, config, plan, best, result)
        ckpt.wait()
        if result is None:  # Resumed a finished run: evaluate the final state again.
            result = evaluate_now()
        export_pretrained(model, state, config, plan, os.path.join(workdir, "pretrained"), result)
        logger.info(f"final step={step} {result.summary()}")
        return RunResult(step, result, history=history)
    except (TrainingError, data.DataError, pretrained.PretrainedError) as e:
        with contextlib.suppress(TrainingError):
            ckpt.wait()  # the saves started before the bad step are good
        if "the last good checkpoint" in str(e):
            raise
        raise type(e)(f"{e}; stopped, the last good checkpoint is {ckpt.last_good()}") from None
    except Interrupted:
        raise
    except KeyboardInterrupt:  # the second Ctrl-C
        ckpt.close()
        raise Interrupted(f"stopped at step {step}; the last good checkpoint is "
                          f"{ckpt.last_good()}") from None  # fmt: skip
    finally:
        bar.close()
        profiler.stop()
        ckpt.close()
        board.close()


def _log_train(step: int, plan: Plan, scalars: dict, board: reporting.TensorBoard) -> dict:
    """The train log line and TensorBoard scalars of ``step``; returns the history entry."""
    remaining = (plan.total_steps - step) * plan.batch_size / scalars["images_per_sec"]
    logger.info(
        f"step {step}/{plan.total_steps} epoch {step / plan.steps_per_epoch:.2f} "
        f"loss {scalars['loss']:.4f} top1 {scalars['top1']:.4f} lr {scalars['lr']:.5g} "
        f"{scalars['images_per_sec']:.1f} img/s ETA {reporting.eta(remaining)}"
    )
    board.scalars(step, {f"train/{k}": v for k, v in scalars.items()})
    return {"step": step, **scalars}
