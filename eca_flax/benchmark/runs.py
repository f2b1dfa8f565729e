"""The two sides of a benchmark: eca_flax's jitted inference and train.py's train step, and the
PyTorch reference with the same batch."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from eca_flax.benchmark.timing import Timer, cost_flops, interleave
from eca_flax.data.transforms import normalize
from eca_flax.errors import BenchmarkError
from eca_flax.training.memory import buffer_bytes

LEARNING_RATE = 0.01  # Small enough that random labels never diverge during a benchmark.


def synthetic_batch(
    batch_size: int, image_size: int, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random uint8 NHWC images and labels (numpy), shared by both frameworks: what the input
    pipeline gives train.py's step (``normalize`` turns them into what the models take)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch_size, image_size, image_size, 3), np.uint8)
    labels = rng.integers(0, num_classes, batch_size).astype(np.int32)
    return images, labels


def inference_fn(model: Any) -> tuple[Callable, tuple]:
    """``forward(params, batch_stats, images) -> logits``, jitted, and its state arguments.

    The model is split once; each call passes arrays only (no module graph traversal).
    """
    import jax
    from flax import nnx

    model.eval()
    graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)

    @jax.jit
    def forward(params, batch_stats, images):
        return nnx.merge(graphdef, params, batch_stats, rest)(images)

    return forward, (params, batch_stats)


def train_step_fn(model: Any, num_classes: int) -> tuple[Callable, dict, Any]:
    """train.py's jitted step on one device, its initial state and the mesh it runs on."""
    import jax
    import optax

    from eca_flax.training import config, mesh, steps

    on_one = mesh.make_mesh(jax.local_devices()[:1])
    defaults = config.default_config()  # SGD momentum 0.9, weight decay 1e-4 on everything
    schedule = optax.constant_schedule(LEARNING_RATE)
    tx = steps.make_optimizer(defaults, schedule)
    step = steps.make_train_step(model, tx, schedule, on_one, defaults, num_classes=num_classes)
    return step, steps.init_state(model, tx, 0, on_one), on_one


@dataclasses.dataclass
class Result:
    """One row of the table: a model in one framework / variant."""

    model: str
    variant: str
    params: int | None = None
    flops: float = math.nan  # forward, per image
    compile_infer_s: float = math.nan
    compile_train_s: float = math.nan
    infer: Timer | None = None
    train: Timer | None = None
    batch_size: int = 0
    image_size: int = 0
    memory_bytes: float = math.nan  # train step (or forward) buffers
    train_flops: float = math.nan  # per step

    def images_per_s(self, which: str) -> float:
        timer = getattr(self, which)
        return self.batch_size / timer.median if timer and timer.samples else math.nan


def build_jax(
    name: str,
    attention: str | None,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    dtype: str = "float32",
    mode: str = "both",
) -> tuple[Result, list[Timer]]:
    """Compile the eca_flax inference function and/or train step (``mode``); their timers."""
    import jax
    from flax import nnx

    import eca_flax
    from eca_flax.models.registry import DTYPES

    batch_size = len(images)
    make = lambda: eca_flax.create_model(
        name, attention=attention, dtype=DTYPES[dtype], rngs=nnx.Rngs(0)
    )
    model = make()
    variant = "eca_flax" if attention == "eca" else f"eca_flax, attention={attention}"
    result = Result(
        name,
        variant,
        eca_flax.count_params(model),
        batch_size=batch_size,
        image_size=images.shape[1],
    )
    timers = []
    infer = mode in ("infer", "both")
    if infer or attention == "eca":  # The ECA model's forward also gives the FLOPs.
        forward, weights = inference_fn(model)
        x = jax.device_put(normalize(images))
        start = time.perf_counter()
        compiled = forward.lower(*weights, x).compile()
        result.compile_infer_s = time.perf_counter() - start
        result.flops = cost_flops(compiled) / batch_size
        result.memory_bytes = buffer_bytes(compiled)
        if infer:
            # Timed through the jitted function users call; it reuses the executable above.
            result.infer = Timer(
                f"{variant} infer", lambda: forward(*weights, x).block_until_ready()
            )
            timers.append(result.infer)
    if mode in ("train", "both"):
        step, state, mesh = train_step_fn(make(), num_classes=1000)
        from eca_flax.training.mesh import batch_sharded

        batch = {
            "image": jax.device_put(images, batch_sharded(mesh)),
            "label": jax.device_put(labels, batch_sharded(mesh)),
        }
        start = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        result.compile_train_s = time.perf_counter() - start
        result.train_flops = cost_flops(compiled)
        result.memory_bytes = buffer_bytes(compiled)
        holder = {"state": state}

        def train_once() -> None:
            holder["state"], metrics = step(holder["state"], batch)
            jax.block_until_ready(metrics["loss"])

        result.train = Timer(f"{variant} train", train_once)
        timers.append(result.train)
    return result, timers


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise BenchmarkError("--torch needs PyTorch: pip install torch") from None
    return torch


def build_torch(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    device: str,
    *,
    dtype: str = "float32",
    mode: str = "both",
    channels_last: bool = False,
) -> tuple[Result, list[Timer]]:
    """The PyTorch reference with the same batch: eval inference and an SGD train step."""
    torch = import_torch()
    from eca_flax.models import torch_reference

    torch.manual_seed(0)
    model = torch_reference.build(name).to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.from_numpy(np.ascontiguousarray(normalize(images).transpose(0, 3, 1, 2)))
    x = x.to(device)
    x = x.contiguous(memory_format=fmt)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    bf16 = dtype == "bfloat16"
    variant = "PyTorch" + (", channels_last" if channels_last else "")
    variant += ", autocast bf16" if bf16 else ""
    params = sum(p.numel() for p in model.parameters())
    result = Result(name, variant, params, batch_size=len(images), image_size=images.shape[1])
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LEARNING_RATE, momentum=0.9, weight_decay=1e-4
    )

    def infer_once() -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            model(x)
        sync()

    def train_once() -> None:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        sync()

    timers = []
    if mode in ("infer", "both"):
        result.infer = Timer(f"{variant} infer", infer_once)
        timers.append(result.infer)
    if mode in ("train", "both"):
        result.train = Timer(f"{variant} train", train_once)
        timers.append(result.train)
    return result, timers


def dispatch_overhead(
    name: str,
    *,
    image_size: int = 224,
    repeats: int = 5,
    warmup: int = 2,
    min_sample_s: float = 0.0,
) -> list[tuple[str, float]]:
    """Per-call wall times (s) at batch 1: the compiled call against a do-nothing call taking
    the same arguments (what dispatch and synchronisation cost), and ``nnx.jit`` on the module
    (which walks the module graph on every call) for comparison."""
    import jax
    from flax import nnx

    import eca_flax

    images, labels = synthetic_batch(1, image_size, 1000)
    model = eca_flax.create_model(name)
    forward, state = inference_fn(model)
    x = jax.device_put(normalize(images))
    trivial = jax.jit(lambda params, batch_stats, images: images[0, 0, 0, 0])
    module_jit = nnx.jit(lambda m, images: m(images))
    model.eval()
    step, train_state, mesh = train_step_fn(eca_flax.create_model(name), num_classes=1000)
    batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
    trivial_step = jax.jit(lambda state, batch: state["step"] + batch["label"][0])
    holder = {"state": train_state}

    def train_once() -> None:
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    ready = jax.block_until_ready
    timers = [
        Timer("inference: jitted forward over arrays", lambda: ready(forward(*state, x))),
        Timer("inference: do-nothing call, same arguments", lambda: ready(trivial(*state, x))),
        Timer("inference: nnx.jit on the module", lambda: ready(module_jit(model, x))),
        Timer("train step (train.py's)", train_once),
        Timer(
            "train step: do-nothing call, same arguments",
            lambda: ready(trivial_step(holder["state"], batch)),
        ),
    ]
    interleave(timers, repeats, warmup, min_sample_s)
    return [(t.name, t.median) for t in timers]
