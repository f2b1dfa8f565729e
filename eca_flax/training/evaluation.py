"""Evaluation: one pass over the validation split, every image counted exactly once (padded
batches, masked), for the raw weights and, with ``ema_decay`` > 0, their EMA."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from eca_flax import data, errors
from eca_flax.training import reporting
from eca_flax.training.config import Plan
from eca_flax.training.mesh import prefetch_to_mesh
from eca_flax.training.reporting import logger
from eca_flax.training.steps import out_of_memory


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
class Evaluation:
    """One evaluation of a run: the raw weights and, with ``ema_decay`` > 0, the EMA's."""

    raw: EvalResult
    ema: EvalResult | None = None

    def by_weights(self) -> dict[str, EvalResult]:
        """{"raw": the raw weights' result, "ema": the EMA's (when there is one)}."""
        return {"raw": self.raw} | ({} if self.ema is None else {"ema": self.ema})

    def log(self, prefix: str) -> None:
        logger.info(f"{prefix} {self.raw.summary()}")
        if self.ema is not None:
            logger.info(f"{prefix} ema {self.ema.summary()}")

    def scalars(self) -> dict[str, float]:
        """TensorBoard scalars: eval/top1, eval/top5 (and eval/top1_ema, eval/top5_ema)."""
        out = {"eval/top1": self.raw.top1, "eval/top5": self.raw.top5}
        if self.ema is not None:
            out.update({"eval/top1_ema": self.ema.top1, "eval/top5_ema": self.ema.top5})
        return out


def evaluate(
    eval_step: Callable,
    state: dict,
    config: ml_collections.ConfigDict,
    plan: Plan,
    mesh: jax.sharding.Mesh,
    *,
    with_logits: bool = False,
) -> EvalResult:
    """One pass over the validation split, every image counted exactly once; ``with_logits``:
    with the logits and labels of every image, in dataset order."""
    batches = data.eval_iterator(
        config.dataset,
        config.data_dir or None,
        global_batch_size=plan.eval_batch_size,
        image_size=config.eval_image_size,
        resize_size=config.eval_resize_size if config.eval_resize_size > 0 else None,
        interpolation=config.eval_interpolation,
        skip_damaged=config.skip_damaged_images,
        allow_large_images=config.allow_large_images,
        threads=config.data_threads or None,
    )
    totals, kept = None, []
    memory = out_of_memory("eval", plan.eval_batch_size, config.eval_image_size, mesh.devices.size)
    with memory, reporting.progress(plan.num_eval, "eval") as bar:
        for batch in prefetch_to_mesh(batches, mesh, plan.eval_batch_size):
            out = eval_step(state["params"], state["batch_stats"], batch)
            if with_logits:
                host = jax.device_get({k: out[k] for k in ("logits", "labels", "mask")})
                kept.append((host["logits"][host["mask"] > 0], host["labels"][host["mask"] > 0]))
            sums = {k: out[k] for k in ("top1", "top5", "count", "damaged")}
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
            bar.update(min(plan.eval_batch_size, plan.num_eval - bar.n))
        if totals is None:
            raise errors.DataError(f"{config.dataset}: the validation split yielded no batches")
        totals = jax.device_get(totals)  # where a failed step is reported
    images = int(round(float(totals["count"])))
    if not images:
        raise errors.DataError(f"{config.dataset}: no readable validation image")
    result = EvalResult(
        float(totals["top1"]) / images,
        float(totals["top5"]) / images,
        images,
        skipped=int(totals["damaged"]),
    )
    if with_logits:
        result.logits = np.concatenate([k[0] for k in kept])
        result.labels = np.concatenate([k[1] for k in kept])
    return result


def evaluate_all(eval_step, state: dict, config, plan: Plan, mesh, with_logits: bool = False):
    """The raw weights of ``state`` and, when it has one, its EMA, on the validation split."""
    run = lambda weights: evaluate(eval_step, weights, config, plan, mesh, with_logits=with_logits)
    return Evaluation(run(state), run(state["ema"]) if "ema" in state else None)
