"""``python -m eca_flax.benchmark``: the command line, the table and the ratios."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable, Sequence

from eca_flax.benchmark.runs import (
    Result,
    build_jax,
    build_torch,
    dispatch_overhead,
    import_torch,
    synthetic_batch,
)
from eca_flax.benchmark.timing import (
    Timer,
    device_peak_bytes,
    interleave,
    machine_description,
    peak_flops,
)
from eca_flax.cli import shell, xla_flags
from eca_flax.errors import BenchmarkError

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


def _fmt(value: float | None, spec: str = ".2f") -> str:
    """A number, or '-' where there is none (NaN)."""
    return "-" if value is None or math.isnan(value) else format(value, spec)


def _ratio(a: float, b: float) -> str:
    return "-" if not b or math.isnan(a / b) else f"{a / b:.2f}x"


def format_table(results: Sequence[Result], *, peak: float) -> str:
    """The results as a Markdown table, then the ratios (``peak`` FLOP/s for MFU, or NaN)."""
    head = [
        "model", "size", "variant", "params", "GMACs", "MACs/2^30 (README)",
        "compile s (infer/train)", "infer img/s", "train img/s", "XLA buffers MiB",
    ]  # fmt: skip
    if not math.isnan(peak):
        head.append("train MFU")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        macs = r.flops / 2
        readme = README_FIGURES.get(r.model, ("", ""))[1] if r.image_size == 224 else ""
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
            str(r.image_size),
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
        for label, variant in (("ECA", "eca_flax"), ("SE", "eca_flax, attention=se")):
            added = rows.get(variant)
            if added and plain:
                lines.append(
                    f"| {model} | {label} overhead (+{added.params - plain.params:,} params): "
                    f"time with {label} / without | "
                    f"{_ratio(plain.images_per_s('infer'), added.images_per_s('infer'))} | "
                    f"{_ratio(plain.images_per_s('train'), added.images_per_s('train'))} |"
                )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m eca_flax.benchmark",
        description=__doc__.split("\n\n")[0],
        epilog="Example: python -m eca_flax.benchmark --models eca_resnet50 --batch-size 16 "
        "--mode both --torch",
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=["eca_resnet50"],
        metavar="NAME",
        help="models by name (a timm tag such as ecaresnet50t.ra2_in1k names its model; the "
        "weights are random: speed does not depend on them)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--image-size",
        type=int,
        help="square input size (default: each model's own, timm's default: 224 for the "
        "ResNets, eca_nfnet_l0 and eca_vovnet39b, 256 for the byob models)",
    )
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--mode", choices=("infer", "train", "both"), default="both")
    parser.add_argument("--torch", action="store_true", help="also run the PyTorch reference")
    parser.add_argument(
        "--channels-last", action="store_true", help="PyTorch in channels_last memory format"
    )
    parser.add_argument(
        "--no-plain", action="store_true", help="skip the attention=None run (ECA overhead)"
    )
    parser.add_argument(
        "--se", action="store_true", help="also run the SE baseline (attention='se', ResNets)"
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
        "--lower-for",
        choices=("cuda", "tpu"),
        help="no timing: export train.py's steps for this platform here (jax.export, abstract "
        "shapes) and print their op counts, flops and any problem (eca_flax.benchmark.lowering)",
    )
    parser.add_argument(
        "--compile-cpu",
        action="store_true",
        help="with --lower-for: also compile each exported module for this CPU, for XLA:CPU's "
        "flop count of the same program (slow)",
    )
    parser.add_argument(
        "--xla-flags",
        default=" ".join(xla_flags.recommended()),
        help="appended to XLA_FLAGS before jax starts, unless XLA_FLAGS already sets them "
        "(default: eca_flax.cli.xla_flags.recommended(), the flags train.py sets; '' for none)",
    )
    args = parser.parse_args(argv)
    from eca_flax.models.registry import list_models, model_info, split_tag

    args.models = [split_tag(m)[0] for m in args.models]  # a timm tag names its model
    unknown = [m for m in args.models if m not in list_models()]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choices: {', '.join(list_models())}")
    for name in ("batch_size", "image_size", "repeats"):
        if (getattr(args, name) or 1) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    from eca_flax.models.registry import check_input_size

    for m in args.models:  # BoT takes 256 only, Halo multiples of 256
        try:
            check_input_size(m, image_size(args, m))
        except ValueError as e:
            parser.error(f"--image-size {args.image_size}: {e}")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.se and (args.no_plain or any(model_info(m).family != "resnet" for m in args.models)):
        parser.error(
            "--se compares SE with the plain network of a ResNet: drop --no-plain and MobileNetV2"
        )
    return args


def image_size(args: argparse.Namespace, model: str) -> int:
    """--image-size, or the model's default input size."""
    from eca_flax.models.registry import model_info

    return args.image_size or model_info(model).default_size


def _sizes(args: argparse.Namespace) -> str:
    sizes = sorted({image_size(args, m) for m in args.models})
    return "/".join(f"{s}x{s}" for s in sizes) + ("" if args.image_size else " (models' own)")


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
        f"batch {args.batch_size}, {_sizes(args)}, {args.dtype}, mode "
        f"{args.mode}, {args.repeats} samples after {args.warmup} warm-up calls, load average "
        f"{os.getloadavg()[0]:.2f} at start"
    )
    results: list[Result] = []
    for name in args.models:
        images, labels = synthetic_batch(args.batch_size, image_size(args, name), 1000)
        timers: list[Timer] = []
        rows = []
        variants = ["eca"] + ([] if args.no_plain else [None]) + (["se"] if args.se else [])
        for attention in variants:
            log(f"{name}: compiling eca_flax (attention={attention}) ...")
            result, t = build_jax(name, attention, images, labels, dtype=args.dtype, mode=args.mode)
            rows.append(result)
            timers += t
        if args.torch:
            result, t = build_torch(
                name,
                images,
                labels,
                device,
                dtype=args.dtype,
                mode=args.mode,
                channels_last=args.channels_last,
            )
            rows.append(result)
            timers += t
        log(f"{name}: timing {len(timers)} functions, interleaved ...")
        interleave(timers, args.repeats, args.warmup, args.min_sample_s)
        results += rows
    log(f"load average at end: {os.getloadavg()[0]:.2f}")
    if device == "cuda":
        torch = sys.modules["torch"]
        log(
            f"peak device memory: jax {_fmt(device_peak_bytes() / 2**30, '.2f')} GiB, "
            f"torch {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        )
    log("")
    log(format_table(results, peak=peak_flops(args.dtype, args.peak_tflops)))
    if args.dispatch:
        log("")
        log(f"dispatch overhead, {args.models[0]}, batch 1 (median wall time per call):")
        overhead = dispatch_overhead(
            args.models[0],
            image_size=image_size(args, args.models[0]),
            repeats=args.repeats,
            warmup=args.warmup,
            min_sample_s=args.min_sample_s,
        )
        for label, seconds in overhead:
            log(f"  {label:45s} {seconds * 1e3:9.3f} ms")
    return results


def lower_for(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    """``--lower-for``: every step of ``lowering.CASES`` of each model, exported for the
    platform at the batch and image size asked; returns the number of problems found."""
    from eca_flax.benchmark import lowering

    log(f"machine: {machine_description()}; load average {os.getloadavg()[0]:.2f}")
    log(
        f"lowering for {args.lower_for} (jax.export, abstract shapes, nothing runs): batch "
        f"{args.batch_size}, {_sizes(args)}, 1000 classes"
    )
    found = 0
    for name in args.models:
        for case in lowering.CASES:
            program = lowering.lower(
                case,
                args.lower_for,
                model=name,
                batch_size=args.batch_size,
                image_size=image_size(args, name),
                num_classes=1000,
            )
            for line in lowering.summary(program, compile_cpu=args.compile_cpu):
                log(line)
            found += len(lowering.problems(program))
    log(f"{found} problems; load average at end {os.getloadavg()[0]:.2f}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.lower_for:  # exit status 1 when a lowered program has a problem
        xla_flags.add(args.xla_flags)
        return shell.run(lambda: 1 if lower_for(args) else 0)
    return shell.run(lambda: run(args))
