"""The training loop: ``train_and_evaluate``, what train.py runs (``_train``, on one screen, with
``_Run`` holding what it uses), and ``eval_only``.

Runs resume exactly: a checkpoint holds the step, parameters, BatchNorm statistics, optimizer
state, RNG and (``ema_decay`` > 0) the EMA of the weights, and the input pipeline is
deterministic given (seed, step), so the step number is the data position.

With an EMA, each evaluation covers the raw weights and the EMA (both logged, TensorBoard
eval/top1 and eval/top1_ema), and both are exported, each with its own top-1: the raw weights
to pretrained/ and best/ as without an EMA, the EMA to pretrained_ema/ and best_ema/.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
from flax import nnx

from eca_flax import data, errors
from eca_flax.errors import ConfigError, Interrupted, TrainingError
from eca_flax.training import checkpoints, lock, reporting, start
from eca_flax.training.config import (
    Plan,
    make_plan,
    resolve_config,
)
from eca_flax.training.evaluation import EvalResult, Evaluation, evaluate_all
from eca_flax.training.mesh import (
    check_processes_agree,
    make_mesh,
    prefetch_to_mesh,
    put_replicated,
)
from eca_flax.training.reporting import logger
from eca_flax.training.steps import (
    check_memory,
    init_state,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    out_of_memory,
    split_weights,
)
from eca_flax.weights import description, pretrained


@dataclasses.dataclass
class RunResult:
    """How a run ended: its last step, the last evaluation, and whether SIGTERM stopped it."""

    step: int
    eval: EvalResult | None
    preempted: bool = False
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)  # Log lines.
    eval_ema: EvalResult | None = None  # The EMA's evaluation (ema_decay > 0).


def eval_interpolation(config: ml_collections.ConfigDict) -> dict:
    """model.json's "preprocessing" for a bicubic eval (timm's models); bilinear needs none."""
    if config.eval_interpolation == "bilinear":
        return {}
    return {"preprocessing": {"interpolation": config.eval_interpolation}}


class StopRequests(Protocol):
    """What asks a run to stop after a step (``cli.preemption.Preemption``: SIGTERM, Ctrl-C):
    a context for the loop, ``requested(step)`` after each step, then ``signal``, its name
    ("SIGTERM": the run returns, preempted; "Ctrl-C": it raises Interrupted, both after saving)."""

    signal: str | None

    def __enter__(self) -> StopRequests: ...

    def __exit__(self, *exc: object) -> None: ...

    def requested(self, step: int) -> bool: ...


class _Never:
    """No stop requests: a library caller's run stops at the end, or by an exception."""

    signal = None

    def __enter__(self) -> _Never:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def requested(self, step: int) -> bool:
        return False


PRETRAINED, BEST = "pretrained", "best"  # the workdir's exports of the raw weights
EMA_SUFFIX = "_ema"  # and of their EMA: pretrained_ema/, best_ema/


def export_dir(workdir: str, name: str, weights: str) -> str:
    """workdir/pretrained (``name``) for the raw weights, workdir/pretrained_ema for the EMA."""
    return os.path.join(workdir, name + (EMA_SUFFIX if weights == "ema" else ""))


def export_pretrained(
    model: nnx.Module,
    state: dict,
    config: ml_collections.ConfigDict,
    plan: Plan,
    path: str,
    evals: Evaluation,
    weights: str = "raw",
) -> None:
    """The raw weights of ``state`` (``weights="ema"``: its EMA) as a pretrained directory
    (model.json + state/), for load_pretrained and predict: workdir/pretrained at the end,
    workdir/best at each new best (pretrained_ema, best_ema). model.json records "weights",
    their top-1 and top-5 and, with an EMA, the other weights' top-1 ("raw_top1" / "ema_top1")
    and the EMA's decay.

    Single-process runs only: save_pretrained writes from one process, which Orbax does not
    allow in a multi-process job (there, ``init_from`` takes the workdir itself).
    """
    if jax.process_count() > 1:
        return
    host = lambda tree: jax.tree.map(np.asarray, tree)
    result = evals.by_weights()[weights]
    chosen = state["ema"] if weights == "ema" else state
    nnx.update(model, host(chosen["params"]), host(chosen["batch_stats"]))
    step = int(host(state["step"]))
    about: dict[str, Any] = {"weights": weights}
    if evals.ema is not None:
        about["ema_decay"], about["ema_warmup"] = config.ema_decay, config.ema_warmup
        other = "ema" if weights == "raw" else "raw"
        about[f"{other}_top1"] = 100 * evals.by_weights()[other].top1
    pretrained.save_pretrained(
        model,
        path,
        arch=description.describe(model)["arch"],
        attention=model.attention,
        image_size=config.eval_image_size,
        resize_size=config.eval_resize_size if config.eval_resize_size > 0 else None,
        extra={
            **eval_interpolation(config),
            "epoch": step // plan.steps_per_epoch,
            "step": step,
            "top1": 100 * result.top1,
            "top5": 100 * result.top5,
            **about,
        },
        overwrite=True,
    )


def _best_top1(path: str, weights: str) -> float:
    """The top-1 (in %) of the best model of these ``weights`` exported so far, or -1."""
    try:
        meta = pretrained.read_model_json(path)
    except errors.PretrainedError:
        return -1.0
    # best/ of earlier eca_flax held the EMA of a run with one: not the raw weights' best
    return float(meta.get("top1", -1)) if meta.get("weights", "raw") == weights else -1.0


def _exported_line(workdir: str, evals: Evaluation) -> str | None:
    """The last line of a run: where its weights are and how to use them (with an EMA, which
    weights evaluate better); None where nothing was exported (several processes)."""
    raw_dir, ema_dir = (export_dir(workdir, PRETRAINED, w) for w in ("raw", "ema"))
    use = "python -m eca_flax.predict --weights DIR IMAGE, or eca_flax.load_pretrained(DIR)"
    exported = jax.process_count() == 1
    if evals.ema is None:
        return f"final: the trained weights are in {raw_dir} ({use})" if exported else None
    raw, ema = 100 * evals.raw.top1, 100 * evals.ema.top1
    better = "the raw weights evaluate better" if raw > ema else "the EMA evaluates better"
    if raw == ema:
        better = "both evaluate the same"
    where = f"; the raw weights are in {raw_dir}, the EMA in {ema_dir} ({use})" if exported else ""
    return f"final: {better} (top-1 {raw:.2f}% raw, {ema:.2f}% EMA){where}"


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
        randaugment=config.randaugment,
        skip_damaged=config.skip_damaged_images,
        allow_large_images=config.allow_large_images,
        threads=config.data_threads or None,
        workers=config.data_workers,
    )
    return prefetch_to_mesh(batches, mesh, plan.batch_size)


def _evaluate_only(config, workdir: str, plan: Plan, mesh, with_logits: bool) -> RunResult:
    """eval_only: init_from's weights (or the workdir's latest checkpoint) on the val split."""
    if not config.init_from:
        if not os.path.isdir(os.path.join(workdir, checkpoints.CHECKPOINT_DIR)):
            raise ConfigError(
                f"eval_only needs --config.init_from=DIR (a converter output, a training "
                f"workdir or checkpoint) or a training checkpoint in --workdir {workdir}"
            )
        with config.unlocked():  # our own resolved copy
            config.init_from = workdir
    model, ema, source = start.build_models(config, plan.num_classes, ema=True)
    host = {}
    host["params"], host["batch_stats"] = split_weights(model)
    if ema is not None:  # a training checkpoint's EMA too
        host["ema"] = dict(zip(("params", "batch_stats"), split_weights(ema)))
    logger.info(
        f"evaluating {config.model} from {source}{' and its EMA' if ema else ''} on "
        f"{config.dataset} ({plan.num_eval} images, {mesh.devices.size} devices)"
    )
    eval_step = make_eval_step(model, mesh)
    evals = evaluate_all(eval_step, put_replicated(host, mesh), config, plan, mesh, with_logits)
    evals.log("eval")
    return RunResult(0, evals.raw, eval_ema=evals.ema)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mesh: jax.sharding.Mesh | None = None,
    stop: StopRequests | None = None,
) -> RunResult:
    """Trains (resuming from the workdir's newest good checkpoint) or evaluates (``eval_only``).

    ``mesh`` defaults to every device. ``stop``: what may ask the run to save and stop after a
    step (train.py passes ``cli.preemption.Preemption``, its SIGTERM and Ctrl-C handlers); by
    default nothing does, and Ctrl-C raises Interrupted naming the last good checkpoint.
    """
    reporting.setup_logging()
    config = resolve_config(config)
    check_processes_agree(config)
    mesh = make_mesh() if mesh is None else mesh
    plan = make_plan(config, mesh)
    if config.eval_only:
        return _evaluate_only(config, os.path.abspath(workdir), plan, mesh, with_logits=False)
    new = not os.path.lexists(os.path.abspath(os.path.expanduser(workdir)))
    workdir = lock.prepare_workdir(workdir)
    try:
        with lock.WorkdirLock(workdir):
            return _train(config, workdir, plan, mesh, stop or _Never())
    except BaseException:
        if new:  # a run that stopped before writing anything leaves no workdir behind
            with contextlib.suppress(OSError):
                os.rmdir(workdir)
        raise


def evaluate_logits(
    config: ml_collections.ConfigDict, workdir: str, *, mesh: jax.sharding.Mesh | None = None
) -> RunResult:
    """``eval_only``'s evaluation (of ``init_from``, else the workdir's latest checkpoint) with
    the logits and labels of every validation image, in dataset order (``RunResult.eval``'s
    ``logits`` and ``labels``): for confusion matrices, calibration, ensembles. Writes nothing."""
    reporting.setup_logging()
    config = resolve_config(config)
    check_processes_agree(config)
    with config.unlocked():  # our own resolved copy
        config.eval_only = True
    mesh = make_mesh() if mesh is None else mesh
    plan = make_plan(config, mesh)
    return _evaluate_only(config, os.path.abspath(workdir), plan, mesh, with_logits=True)


def _train(config, workdir: str, plan: Plan, mesh, stop: StopRequests) -> RunResult:
    """The training loop, in a locked workdir: step, log, save, evaluate; then export."""
    model, source = start.build_model(config, plan.num_classes)  # before anything is written
    ckpt = checkpoints.Checkpoints(workdir, config.keep_checkpoints)
    run, step, evals, batches = None, 0, None, None
    try:
        run, step, state = _Run.resume(config, workdir, plan, mesh, ckpt, model, source)
        batches = _train_batches(config, plan, step, mesh)
        memory_about = dict(step="train", batch_size=plan.batch_size, image_size=config.image_size)
        memory = out_of_memory(**memory_about, devices=mesh.devices.size)
        with stop as preemption, memory:  # OutOfMemory at step 1: the workdir still as found
            first = [next(batches)] if step < plan.total_steps else []
            for batch in first:  # compiled now: a step larger than the devices is one line
                check_memory(run.train_step, (state, batch), mesh=mesh, **memory_about)
            while step < plan.total_steps:
                run.profiler.before_step(step + 1)
                state, step_metrics = run.train_step(state, first.pop() if first else next(batches))
                step += 1
                run.after_step(step, step_metrics)
                epoch, into_epoch = divmod(step, plan.steps_per_epoch)
                last = step == plan.total_steps
                do_eval = last or (into_epoch == 0 and epoch % config.eval_every_epochs == 0)
                do_save = last or into_epoch == 0 or step % config.checkpoint_every_steps == 0
                # The step is done before asking: a signal that came during it is acted on
                # at this step (Python runs a handler only once the main thread is back from
                # JAX's wait; asked before, the step dispatched next was the one stopped at).
                jax.block_until_ready(step_metrics)
                stop = preemption.requested(step)
                run.log(step, force=do_eval or do_save or stop, epoch_end=into_epoch == 0)
                if do_save or stop:  # first: a failing evaluation cannot cost the epoch
                    ckpt.save(state, run.meta)
                if stop:
                    return run.stop(step, preemption.signal)
                evals = run.evaluate(step, state) if do_eval else None
        return run.finish(step, state, evals)
    except errors.Error as e:
        with contextlib.suppress(TrainingError):
            ckpt.wait()  # the saves started before the bad step are good
        raise e.stopped(ckpt.last_good()) from None
    except Interrupted:
        raise
    except KeyboardInterrupt:  # the second Ctrl-C: at once, a save in flight left unfinished
        last_good = ckpt.abandon()
        raise Interrupted(
            f"stopped at step {step}; the last good checkpoint is {last_good}",
            step=step,
            last_good=last_good,
        ) from None
    finally:
        if batches is not None:  # grain's workers end now, not at the interpreter's exit
            batches.close()
        run.close() if run is not None else ckpt.close()


@dataclasses.dataclass
class _Run:
    """Everything the loop uses besides the state: the model, its jitted steps, the workdir's
    checkpoints and their metadata, the log, TensorBoard, progress bar and profiler, and the
    best top-1 so far. Built complete by ``resume``."""

    config: ml_collections.ConfigDict
    workdir: str
    plan: Plan
    model: nnx.Module
    train_step: Any
    evaluate_all: Any  # state -> Evaluation
    ckpt: checkpoints.Checkpoints
    meta: dict
    board: reporting.TensorBoard
    profiler: reporting.Profiler
    bar: Any
    metrics: reporting.StepMetrics
    best_top1: dict[str, float]  # in %, of best/ ("raw") and best_ema/ ("ema")
    source: str  # where the weights came from (config.json's "init")
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    damaged: int = 0  # damaged training images skipped this epoch
    started: bool = False  # this run's first step ran (and config.json records it)

    @classmethod
    def resume(
        cls, config, workdir: str, plan: Plan, mesh, ckpt: checkpoints.Checkpoints, model, source
    ) -> tuple[_Run, int, dict]:
        """(run, step, state): the run's parts around ``model`` (``start.build_model``'s, from
        ``source``), and the workdir's newest good checkpoint or a fresh state at step 0."""
        c = config
        eval_step = make_eval_step(model, mesh)
        schedule = make_schedule(c, plan)
        tx = make_optimizer(c, schedule)
        train_step = make_train_step(model, tx, schedule, mesh, c, num_classes=plan.num_classes)
        fresh = init_state(model, tx, c.seed, mesh, ema=c.ema_decay > 0)
        meta = checkpoints.model_meta(model, c, plan.num_classes, fresh["opt_state"], plan)
        step, state = ckpt.restore_latest(fresh, meta)
        logger.info(
            f"resuming from {ckpt.root}/{step} (step {step})" if step else f"starting from {source}"
        )
        logger.info(
            f"training {c.model} on {c.dataset} with {mesh.devices.size} devices "
            f"({jax.process_count()} processes): {plan.total_steps} steps of {plan.batch_size} "
            f"images ({plan.steps_per_epoch} per epoch), peak lr {plan.learning_rate:g}"
            + _capped(c, plan)
        )
        evaluate = lambda s: evaluate_all(eval_step, s, c, plan, mesh)
        board, profiler = reporting.TensorBoard(workdir), reporting.Profiler(c, workdir)
        bar = reporting.progress(
            plan.total_steps * plan.batch_size, "train", step * plan.batch_size
        )
        metrics = reporting.StepMetrics(plan.batch_size)
        parts = (model, train_step, evaluate, ckpt, meta, board, profiler, bar, metrics)
        best = {w: _best_top1(export_dir(workdir, BEST, w), w) for w in ("raw", "ema")}
        return cls(c, workdir, plan, *parts, best, source), step, state

    def after_step(self, step: int, step_metrics: dict) -> None:
        """After each step; after the first (its data read, compiled and run), the run has
        started and config.json records it: a start that fails leaves the workdir as it was."""
        if not self.started:
            jax.block_until_ready(step_metrics)
            reporting.save_config(self.workdir, self.config, self.plan, self.meta, self.source)
            self.started = True
        self.profiler.after_step(step, step_metrics)
        self.metrics.add(step, step_metrics)
        self.bar.update(self.plan.batch_size)

    def log(self, step: int, *, force: bool, epoch_end: bool) -> None:
        """The train log line every ``log_every_steps`` (and when ``force``); at an epoch's end,
        how many damaged images it skipped."""
        if force or step % self.config.log_every_steps == 0:
            self.history.append(_log_train(step, self.plan, self.metrics.flush(), self.board))
            self.damaged += self.history[-1]["damaged"]
        if epoch_end and self.damaged:
            epoch = step // self.plan.steps_per_epoch
            logger.warning(f"epoch {epoch}: {self.damaged} damaged training images skipped")
            self.damaged = 0

    def stop(self, step: int, signal_name: str) -> RunResult:
        """After SIGTERM or Ctrl-C: waits for the checkpoint of ``step``; Ctrl-C raises."""
        self.ckpt.wait()
        saved = f"saved checkpoint {self.ckpt.root}/{step}; run the same command to resume"
        if signal_name == "Ctrl-C":
            raise Interrupted(saved, step=step, last_good=f"{self.ckpt.root}/{step}")
        logger.info(f"{signal_name}: {saved}")
        return RunResult(step, None, preempted=True, history=self.history)

    def evaluate(self, step: int, state: dict) -> Evaluation:
        """Evaluates ``state`` (and its EMA), logs it, and exports each of them that is better
        than it was before to best/ (best_ema/)."""
        evals = self.evaluate_all(state)
        evals.log(f"eval step={step}")
        self.board.scalars(step, evals.scalars())
        for weights, result in evals.by_weights().items():
            if 100 * result.top1 > self.best_top1[weights]:
                self.best_top1[weights] = 100 * result.top1
                self.ckpt.wait()  # a failed save is reported before anything else
                path = export_dir(self.workdir, BEST, weights)
                export_pretrained(self.model, state, self.config, self.plan, path, evals, weights)
        return evals

    def finish(self, step: int, state: dict, evals: Evaluation | None) -> RunResult:
        """The end of the run: the last save finished, the final weights in pretrained/ (and
        the EMA in pretrained_ema/, then a line saying which evaluates better)."""
        self.ckpt.wait()
        if evals is None:  # Resumed a finished run: evaluate the final state again.
            evals = self.evaluate_all(state)
        for weights in evals.by_weights():
            path = export_dir(self.workdir, PRETRAINED, weights)
            export_pretrained(self.model, state, self.config, self.plan, path, evals, weights)
        evals.log(f"final step={step}")
        if line := _exported_line(self.workdir, evals):
            logger.info(line)
        return RunResult(step, evals.raw, history=self.history, eval_ema=evals.ema)

    def close(self) -> None:
        self.bar.close()
        self.profiler.stop()
        self.ckpt.close()
        self.board.close()


def _capped(config: ml_collections.ConfigDict, plan: Plan) -> str:
    """What the training line adds when num_train_steps stops the run before num_epochs."""
    length = config.num_epochs * plan.steps_per_epoch
    if plan.total_steps >= length:
        return ""
    return (
        f"; num_train_steps stops it at step {plan.total_steps} of the schedule's {length} "
        f"({config.num_epochs} epochs)"
    )


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
