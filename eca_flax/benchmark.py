"""Speed of eca_flax models, measured against the PyTorch original in the same process.

    python -m eca_flax.benchmark --models eca_resnet50 --batch-size 16 --mode both --torch

Per model it prints a table: learnable parameters; FLOPs from XLA's cost analysis of the
compiled forward, as GMACs and in the original README's unit (MACs / 1024^3, next to the
README's own figure); compile time; inference and training-step images/s; the buffers XLA
allocates for the compiled program (and the device's peak where the backend reports one). The
training step is ``eca_flax.training.make_train_step``, the jitted step train.py runs (SGD with
momentum 0.9 and weight decay 1e-4, BatchNorm statistics, donated state).

With ``--torch`` the PyTorch reference (``eca_flax.torch_reference``) runs the same batch with
as many threads as XLA uses (all cores): inference under ``torch.inference_mode`` in eval
mode, and a train step of forward, cross-entropy, backward and SGD(momentum 0.9, weight decay
1e-4). Runs alternate between the frameworks and the table gives medians after warm-up, so
load from other processes hits both alike; the ratio is eca_flax / PyTorch throughput (> 1:
eca_flax is faster). Every model is also run with ``attention=None`` (the plain network) for
the time ECA adds. ``--dispatch`` shows the per-call cost outside the compiled program at
batch 1. XLA flags go in ``--xla-flags`` (or the XLA_FLAGS environment variable); by default
the benchmark adds ``eca_flax.xla_flags.recommended()``, the XLA:CPU flags train.py also sets
(docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from eca_flax import xla_flags

# The original README's "Param." (params / 2^20) and "FLOPs" (thop MACs / 2^30) at 224x224.
README_FIGURES = {
    "eca_resnet18": ("11.15M", "1.70G"),
    "eca_resnet34": ("20.79M", "3.43G"),
    "eca_resnet50": ("24.37M", "3.86G"),
    "eca_resnet101": ("42.49M", "7.35G"),
    "eca_resnet152": ("57.41M", "10.83G"),
    "eca_mobilenet_v2": ("3.34M", "319.9M"),
}
# Dense bfloat16 peak FLOP/s of accelerators, for MFU ("device_kind" prefix -> FLOP/s).
PEAK_BF16_FLOPS = {"NVIDIA H100": 989.4e12, "NVIDIA H200": 989.4e12, "NVIDIA A100": 312e12}
LEARNING_RATE = 0.01  # Small enough that random labels never diverge during a benchmark.


class BenchmarkError(RuntimeError):
    """A benchmark that cannot run (missing torch, bad arguments); reported as one line."""


# --------------------------------------------------------------------------------------------
# Measurements.


def cost_flops(compiled: Any) -> float:
    """FLOPs of a compiled XLA program from its cost analysis (a dict, or a list of dicts in
    older jax versions); NaN where the backend gives none."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return float((analysis or {}).get("flops", math.nan))


def buffer_bytes(compiled: Any) -> float:
    """Bytes of the buffers a compiled program uses: arguments, outputs and temporaries, less
    outputs aliased to (donated) arguments. NaN where the backend has no memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # Not implemented by every backend / jax version.
        return math.nan
    if m is None:
        return math.nan
    return float(
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


@dataclasses.dataclass
class Timer:
    """Wall time of ``fn()`` (which must wait for its result), several calls per sample."""

    name: str
    fn: Callable[[], Any]
    calls: int = 1
    samples: list[float] = dataclasses.field(default_factory=list)

    def warm_up(self, count: int, min_sample_s: float) -> None:
        """``count`` untimed calls, then enough calls per sample to last ``min_sample_s``."""
        for _ in range(count):
            self.fn()
        start = time.perf_counter()
        self.fn()
        once = time.perf_counter() - start
        self.calls = max(1, math.ceil(min_sample_s / max(once, 1e-9)))

    def sample(self) -> None:
        start = time.perf_counter()
        for _ in range(self.calls):
            self.fn()
        self.samples.append((time.perf_counter() - start) / self.calls)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan


def interleave(timers: Sequence[Timer], repeats: int, warmup: int, min_sample_s: float) -> None:
    """Warm every timer up, then take ``repeats`` samples of each, alternating between them."""
    for t in timers:
        t.warm_up(warmup, min_sample_s)
    for _ in range(repeats):
        for t in timers:
            t.sample()


# --------------------------------------------------------------------------------------------
# The eca_flax side: one jitted function over pure arrays for inference, train.py's train step.


def synthetic_batch(
    batch_size: int, image_size: int, num_classes: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Random ImageNet-normalized NHWC images and labels (numpy), shared by both frameworks."""
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, image_size, image_size, 3), np.float32)
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

    from eca_flax import training

    mesh = training.make_mesh(jax.local_devices()[:1])
    config = training.default_config()  # SGD momentum 0.9, weight decay 1e-4 on everything
    schedule = optax.constant_schedule(LEARNING_RATE)
    tx = training.make_optimizer(config, schedule)
    step = training.make_train_step(
        model, tx, schedule, mesh, num_classes=num_classes, label_smoothing=0.0
    )
    state = training.init_state(model, tx, 0, mesh)
    return step, state, mesh


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
    memory_bytes: float = math.nan  # train step (or forward) buffers
    train_flops: float = math.nan  # per step

    def images_per_s(self, which: str) -> float:
        timer = getattr(self, which)
        return self.batch_size / timer.median if timer and timer.samples else math.nan


def build_jax(
    name: str,
    args: argparse.Namespace,
    attention: str | None,
    images: np.ndarray,
    labels: np.ndarray,
) -> tuple[Result, list[Timer]]:
    """Compile the eca_flax inference function and train step; return their timers."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import eca_flax

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    make = lambda: eca_flax.create_model(name, attention=attention, dtype=dtype, rngs=nnx.Rngs(0))
    model = make()
    variant = "eca_flax" if attention else "eca_flax, attention=None"
    result = Result(name, variant, eca_flax.count_params(model), batch_size=args.batch_size)
    timers = []
    infer = args.mode in ("infer", "both")
    if infer or attention is not None:  # The ECA model's forward also gives the FLOPs.
        forward, weights = inference_fn(model)
        x = jax.device_put(images)
        start = time.perf_counter()
        compiled = forward.lower(*weights, x).compile()
        result.compile_infer_s = time.perf_counter() - start
        result.flops = cost_flops(compiled) / args.batch_size
        result.memory_bytes = buffer_bytes(compiled)
        if infer:
            # Timed through the jitted function users call; it reuses the executable above.
            result.infer = Timer(
                f"{variant} infer", lambda: forward(*weights, x).block_until_ready()
            )
            timers.append(result.infer)
    if args.mode in ("train", "both"):
        step, state, mesh = train_step_fn(make(), num_classes=1000)
        from eca_flax import training

        batch = {
            "image": jax.device_put(images, training.batch_sharded(mesh)),
            "label": jax.device_put(labels, training.batch_sharded(mesh)),
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


# --------------------------------------------------------------------------------------------
# The PyTorch side.


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise BenchmarkError("--torch needs PyTorch: pip install torch") from None
    return torch


def build_torch(
    name: str, args: argparse.Namespace, images: np.ndarray, labels: np.ndarray, device: str
) -> tuple[Result, list[Timer]]:
    """The PyTorch reference with the same batch: eval inference and an SGD train step."""
    torch = import_torch()
    from eca_flax import torch_reference

    torch.manual_seed(0)
    model = torch_reference.build(name).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(device)
    x = x.contiguous(memory_format=fmt)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    bf16 = args.dtype == "bfloat16"
    variant = "PyTorch" + (", channels_last" if args.channels_last else "")
    variant += ", autocast bf16" if bf16 else ""
    params = sum(p.numel() for p in model.parameters())
    result = Result(name, variant, params, batch_size=args.batch_size)
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
    if args.mode in ("infer", "both"):
        result.infer = Timer(f"{variant} infer", infer_once)
        timers.append(result.infer)
    if args.mode in ("train", "both"):
        result.train = Timer(f"{variant} train", train_once)
        timers.append(result.train)
    return result, timers


# --------------------------------------------------------------------------------------------
# Dispatch overhead at batch 1.


def dispatch_overhead(name: str, args: argparse.Namespace) -> list[tuple[str, float]]:
    """Per-call wall times (s) at batch 1: the compiled call against a do-nothing call taking
    the same arguments (what dispatch and synchronisation cost), and ``nnx.jit`` on the module
    (which walks the module graph on every call) for comparison."""
    import jax
    from flax import nnx

    import eca_flax

    images, labels = synthetic_batch(1, args.image_size, 1000)
    model = eca_flax.create_model(name)
    forward, state = inference_fn(model)
    x = jax.device_put(images)
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
    interleave(timers, args.repeats, args.warmup, args.min_sample_s)
    return [(t.name, t.median) for t in timers]


# --------------------------------------------------------------------------------------------
# Output.


def machine_description() -> str:
    """CPU model, cores, accelerator and library versions: the context every figure needs."""
    import jax
    import jaxlib

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    parts = [
        f"CPU {cpu}, {len(os.sched_getaffinity(0))} cores",
        f"jax device {device.device_kind} ({jax.default_backend()})",
        f"python {platform.python_version()}",
        f"jax {jax.__version__}, jaxlib {jaxlib.__version__}",
    ]
    try:
        import flax

        parts.append(f"flax {flax.__version__}")
    except ImportError:
        pass
    if "torch" in sys.modules:
        parts.append(f"torch {sys.modules['torch'].__version__}")
    if os.environ.get("XLA_FLAGS"):
        parts.append(f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}")
    return "; ".join(parts)


def _fmt(value: float | None, spec: str = ".2f") -> str:
    """A number, or '-' where there is none (NaN)."""
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _ratio(a: float, b: float) -> str:
    return "-" if not b or math.isnan(a / b) else f"{a / b:.2f}x"


def peak_flops(args: argparse.Namespace) -> float:
    """Peak FLOP/s for MFU: --peak-tflops, else a known accelerator in bfloat16, else NaN."""
    import jax

    if args.peak_tflops:
        return args.peak_tflops * 1e12
    kind = jax.devices()[0].device_kind
    if args.dtype == "bfloat16":
        for prefix, flops in PEAK_BF16_FLOPS.items():
            if kind.startswith(prefix):
                return flops
    return math.nan


def device_peak_bytes() -> float:
    """The default device's peak allocation so far, where the backend reports it."""
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return float(stats.get("peak_bytes_in_use", math.nan))


def format_table(results: Sequence[Result], args: argparse.Namespace) -> str:
    """The results as a Markdown table, then the ratios."""
    peak = peak_flops(args)
    head = [
        "model", "variant", "params", "GMACs", "MACs/2^30 (README)", "compile s (infer/train)",
        "infer img/s", "train img/s", "XLA buffers MiB",
    ]  # fmt: skip
    if not math.isnan(peak):
        head.append("train MFU")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        macs = r.flops / 2
        readme = README_FIGURES.get(r.model, ("", ""))[1] if args.image_size == 224 else ""
        units = "-"
        if not math.isnan(macs):
            scaled = macs / 2**30
            units = f"{scaled:.2f}G" if scaled >= 1 else f"{scaled * 1024:.1f}M"
            units += f" ({readme})" if readme and r.variant == "eca_flax" else ""
        compile_s = "-"
        if not (math.isnan(r.compile_infer_s) and math.isnan(r.compile_train_s)):
            compile_s = f"{_fmt(r.compile_infer_s, '.1f')} / {_fmt(r.compile_train_s, '.1f')}"
        row = [
            r.model,
            r.variant,
            f"{r.params:,}" if r.params else "-",
            _fmt(macs / 1e9, ".3f"),
            units,
            compile_s,
            _fmt(r.images_per_s("infer"), ".2f"),
            _fmt(r.images_per_s("train"), ".2f"),
            _fmt(r.memory_bytes / 2**20, ".0f"),
        ]
        if not math.isnan(peak):
            step_s = r.train.median if r.train and r.train.samples else math.nan
            row.append(_fmt(100 * r.train_flops / step_s / peak, ".1f") + "%")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| model | comparison | infer | train |", "|---|---|---|---|"]
    by_model: dict[str, dict[str, Result]] = {}
    for r in results:
        by_model.setdefault(r.model, {})[r.variant] = r
    for model, rows in by_model.items():
        ours = rows.get("eca_flax")
        plain = rows.get("eca_flax, attention=None")
        theirs = next((r for v, r in rows.items() if v.startswith("PyTorch")), None)
        if ours and theirs:
            lines.append(
                f"| {model} | eca_flax / PyTorch throughput (>1: faster) | "
                f"{_ratio(ours.images_per_s('infer'), theirs.images_per_s('infer'))} | "
                f"{_ratio(ours.images_per_s('train'), theirs.images_per_s('train'))} |"
            )
        if ours and plain:
            lines.append(
                f"| {model} | ECA overhead: time with ECA / without | "
                f"{_ratio(plain.images_per_s('infer'), ours.images_per_s('infer'))} | "
                f"{_ratio(plain.images_per_s('train'), ours.images_per_s('train'))} |"
            )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Command line.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m eca_flax.benchmark",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m eca_flax.benchmark --models eca_resnet50 --batch-size 16 "
        "--mode both --torch",
    )
    parser.add_argument("--models", nargs="+", default=["eca_resnet50"], metavar="NAME")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--mode", choices=("infer", "train", "both"), default="both")
    parser.add_argument("--torch", action="store_true", help="also run the PyTorch reference")
    parser.add_argument(
        "--channels-last", action="store_true", help="PyTorch in channels_last memory format"
    )
    parser.add_argument(
        "--no-plain", action="store_true", help="skip the attention=None run (ECA overhead)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed samples per figure")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls after compiling")
    parser.add_argument(
        "--min-sample-s", type=float, default=0.0, help="repeat calls within a sample to last this"
    )
    parser.add_argument(
        "--dispatch", action="store_true", help="per-call overhead at batch 1 (first model)"
    )
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="peak for MFU")
    parser.add_argument(
        "--xla-flags",
        default=" ".join(xla_flags.recommended()),
        help="appended to XLA_FLAGS before jax starts, unless XLA_FLAGS already sets them "
        "(default: eca_flax.xla_flags.recommended(), the flags train.py sets; '' for none)",
    )
    args = parser.parse_args(argv)
    from eca_flax.registry import list_models

    unknown = [m for m in args.models if m not in list_models()]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choices: {', '.join(list_models())}")
    for name in ("batch_size", "image_size", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    return args


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> list[Result]:
    """Everything the command line asked for; prints the table and returns the rows."""
    xla_flags.add(args.xla_flags)
    import jax

    if args.torch:
        torch = import_torch()
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    device = "cuda" if args.torch and jax.default_backend() == "gpu" else "cpu"
    if device == "cpu" and args.torch and jax.default_backend() != "cpu":
        raise BenchmarkError(f"--torch supports cpu and gpu backends, not {jax.default_backend()}")
    log(f"machine: {machine_description()}")
    log(
        f"batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.dtype}, mode "
        f"{args.mode}, {args.repeats} samples after {args.warmup} warm-up calls, load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )
    results: list[Result] = []
    for name in args.models:
        images, labels = synthetic_batch(args.batch_size, args.image_size, 1000)
        timers: list[Timer] = []
        rows = []
        variants: list[str | None] = ["eca"] + ([] if args.no_plain else [None])
        for attention in variants:
            log(f"{name}: compiling eca_flax (attention={attention}) ...")
            result, t = build_jax(name, args, attention, images, labels)
            rows.append(result)
            timers += t
        if args.torch:
            result, t = build_torch(name, args, images, labels, device)
            rows.append(result)
            timers += t
        log(f"{name}: timing {len(timers)} functions, interleaved ...")
        interleave(timers, args.repeats, args.warmup, args.min_sample_s)
        results += rows
    log(f"load average at end: {os.getloadavg()[0]:.2f}")
    if device == "cuda":
        torch = sys.modules["torch"]
        log(f"peak device memory: jax {_fmt(device_peak_bytes() / 2**30, '.2f')} GiB, "
            f"torch {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")  # fmt: skip
    log("")
    log(format_table(results, args))
    if args.dispatch:
        log("")
        log(f"dispatch overhead, {args.models[0]}, batch 1 (median wall time per call):")
        for label, seconds in dispatch_overhead(args.models[0], args):
            log(f"  {label:45s} {seconds * 1e3:9.3f} ms")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except BenchmarkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
