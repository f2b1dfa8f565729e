"""The train and eval steps as a GPU or TPU receives them, lowered here, on any machine.

``lower(case, "cuda" | "tpu")`` builds the jitted step train.py runs (``training.steps``, with the
model ``start.build_model`` gives and the optimizer, schedule and mixing of a config) and
exports it with ``jax.export`` for that platform from abstract shapes: nothing runs and no
device of that kind is needed. The result's StableHLO text is read by ``Program``: op counts
(through the module's private functions, times their calls), the convolutions' element types,
the donated and uint8 arguments, reductions and custom calls. ``tests/test_lowering.py``
asserts on it; ``python -m eca_flax.benchmark --lower-for cuda`` prints it with XLA's flop
count. It lives here, beside the benchmark, because it measures programs and is no part of
training; the steps it lowers are training's own.

FLOPs: an exported module has no cost analysis. ``Program.flops`` is XLA's cost analysis of the
same jitted step lowered for the platform (``Traced.lower(lowering_platforms=...)``), i.e. of the
unoptimized HLO the GPU/TPU compiler would start from (no foreign compiler runs here);
``cpu_compiled_flops`` compiles the exported module itself for this CPU (the platform check
disabled), a figure after XLA:CPU's optimizations of the same program.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

PLATFORMS = ("cuda", "tpu")
# The steps CI lowers: (kind, config overrides). The LAMB step is RSB A3's (LAMB, BCE, Mixup /
# CutMix every batch) with an EMA of the weights; the eval step is the bfloat16 model's.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd_float32": ("train", {"dtype": "float32"}),
    "sgd_bfloat16": ("train", {"dtype": "bfloat16"}),
    "lamb_mix_ema_bfloat16": (
        "train",
        {"dtype": "bfloat16", "recipe": "rsb_a3", "ema_decay": 0.9998, "ema_warmup": True},
    ),
    "eval_bfloat16": ("eval", {"dtype": "bfloat16"}),
}

_TENSOR = re.compile(r"tensor<((?:[0-9?]+x)*)([a-z][a-z0-9]*)>")
_OP = re.compile(r"(?:^|=)\s*\"?stablehlo\.([a-z_0-9]+)")
_CALL = re.compile(r"\bcall @([\w.$-]+)")
_REDUCE_WINDOW = re.compile(r"stablehlo\.reduce_window")
_FUNC = re.compile(r"func\.func (?:public |private )?@([\w.$-]+)\(")


def _types(text: str) -> list[tuple[tuple[int, ...], str]]:
    """(shape, element type) of every tensor type in ``text``, in order."""
    return [
        (tuple(int(d) for d in dims.split("x") if d), dtype)
        for dims, dtype in _TENSOR.findall(text)
    ]


@dataclasses.dataclass(frozen=True)
class Op:
    """One StableHLO op: its name, operand and result types, attributes (the op's text), and
    how many times it runs per call of main (its function's call count)."""

    name: str
    operands: list[tuple[tuple[int, ...], str]]
    results: list[tuple[tuple[int, ...], str]]
    text: str
    times: int


@dataclasses.dataclass
class Program:
    """A step exported for one platform, and what its StableHLO says."""

    case: str
    kind: str  # "train" or "eval"
    platform: str
    exported: Any  # jax.export.Exported
    step: Any  # the jitted step
    args: tuple  # its abstract arguments
    config: ml_collections.ConfigDict
    conv_layers: int  # 2-D convolution modules of the model
    image_convs: int  # those whose input is the image (no input gradient)
    batch_norms: int
    num_state_args: int  # leaves of the train state (train) or of the weights (eval)
    batch_shape: tuple[int, ...]

    @functools.cached_property
    def text(self) -> str:
        return self.exported.mlir_module()

    @functools.cached_property
    def _ops(self) -> list[Op]:
        return self._parse_ops()

    def ops(self) -> list[Op]:
        """Every op of the module with its run count (see ``_parse_ops``)."""
        return self._ops

    def _parse_ops(self) -> list[Op]:
        """Every op of the module with its run count: a private function's ops count once per
        call, so outlined helpers (relu, _where, ...) count as often as they run."""
        bodies = _functions(self.text)
        calls = collections.Counter()

        def visit(name: str, times: int) -> None:
            calls[name] += times
            for callee in _CALL.findall(bodies.get(name, "")):
                visit(callee, times)

        visit("main", 1)
        out = []
        for name, body in bodies.items():
            for line in body.splitlines():
                m = _OP.search(line)
                if not m or not calls[name]:
                    continue
                signature = line.rsplit(" : ", 1)[-1] if " : " in line else ""
                ins, _, outs = signature.partition("->")
                out.append(Op(m[1], _types(ins), _types(outs), line, calls[name]))
        return out

    def op_counts(self) -> collections.Counter:
        """Ops per StableHLO name, each counted as many times as it runs."""
        counts = collections.Counter()
        for op in self.ops():
            counts[op.name] += op.times
        return counts

    def expected_convolutions(self) -> int:
        """The network's own: each conv layer's forward; in training also its weight gradient
        and, unless it reads the image, its input gradient."""
        if self.kind == "eval":
            return self.conv_layers
        return 3 * self.conv_layers - self.image_convs

    def arguments(self) -> list[tuple[int, str]]:
        """(flat index of the jax argument, its text with attributes) for main's arguments."""
        text = self.text
        start = text.index("func.func public @main(")
        end = re.compile(r"\)\s*->\s*").search(text, start).start()
        parts = re.split(r"(?=%arg\d+: )", text[start:end])[1:]
        kept = sorted(self.exported.module_kept_var_idx)
        # Platform-index or dimension arguments come first when there are any.
        extra = len(parts) - len(kept)
        return list(zip(kept, parts[extra:], strict=True))

    def donated(self) -> list[int]:
        """Flat indices of the arguments whose buffers are donated (aliased to an output, or
        marked as donors)."""
        marks = ("tf.aliasing_output", "jax.buffer_donor")
        return [i for i, a in self.arguments() if any(m in a for m in marks)]

    def argument_types(self) -> dict[int, tuple[tuple[int, ...], str]]:
        return {i: _types(a)[0] for i, a in self.arguments()}

    def custom_call_targets(self) -> list[str]:
        text = self.text
        return re.findall(r"custom_call @([\w.$-]+)", text) + re.findall(
            r"call_target_name = \"([^\"]+)\"", text
        )

    def flops(self) -> float | None:
        """XLA's cost analysis of the step lowered for the platform (unoptimized HLO), or None
        when this jax gives none."""
        try:
            lowered = self.step.trace(*self.args).lower(lowering_platforms=(self.platform,))
        except TypeError:  # a jax without lowering_platforms
            return None
        return _flops(lowered)

    def cpu_compiled_flops(self) -> float | None:
        """XLA's cost analysis after compiling this very module for the CPU (the platform check
        disabled): the same program after XLA:CPU's passes. Slow (a full compile)."""
        return _flops(jax.jit(self.exported.call).lower(*self.args).compile())


def _flops(stage: Any) -> float | None:
    try:
        analysis = stage.cost_analysis()
    except Exception:  # noqa: BLE001 - any backend may refuse; the caller says "unavailable"
        return None
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else None
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


def _functions(text: str) -> dict[str, str]:
    """name -> body text of every func.func of a module."""
    starts = [(m.start(), m[1]) for m in _FUNC.finditer(text)]
    ends = [s for s, _ in starts[1:]] + [len(text)]
    return {name: text[s:e] for (s, name), e in zip(starts, ends, strict=True)}


def case_config(case: str, model: str) -> tuple[str, ml_collections.ConfigDict]:
    """(kind, resolved config) of one of ``CASES`` for ``model``."""
    from eca_flax.training.config import default_config, resolve_config

    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; choices: {', '.join(CASES)}")
    kind, overrides = CASES[case]
    from eca_flax.models.registry import model_info

    config = default_config()
    config.update({"model": model, **overrides})
    if rule := model_info(model).size_rule:  # BoT / Halo: the config check wants their size
        config.image_size = rule[1]
    return kind, resolve_config(config)


@functools.lru_cache(maxsize=4)
def _network(model: str, dtype: str, num_classes: int) -> nnx.Module:
    """train.py's model for a config of ``model`` in ``dtype``, its weights zeros: lowering
    needs their shapes only, and random initialisation (a compile per parameter shape, ~10 s
    of CPU for eca_nfnet_l0) would be most of its time. Built once; the steps split it when
    they are made, so cases can share it."""
    from eca_flax.training import start

    _, config = case_config("sgd_float32", model)
    with config.unlocked():
        config.dtype = dtype
    graphdef, state = nnx.split(nnx.eval_shape(lambda: start.build_model(config, num_classes)[0]))
    return nnx.merge(graphdef, jax.tree.map(_zeros, state))


def _zeros(leaf: Any) -> Any:
    """An array of a ShapeDtypeStruct's shape: zeros, or PRNG keys (MobileNetV2's dropout)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.split(jax.random.key(0), leaf.shape) if leaf.shape else jax.random.key(0)
    return np.zeros(leaf.shape, leaf.dtype)


def lower(
    case: str,
    platform: str,
    *,
    model: str = "eca_resnet18",
    batch_size: int = 8,
    image_size: int = 32,
    num_classes: int = 10,
) -> Program:
    """Export the step of ``case`` (see ``CASES``) for ``platform`` from abstract shapes."""
    from eca_flax.training import mesh, steps
    from eca_flax.training.config import Plan

    if platform not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; choices: {', '.join(PLATFORMS)}")
    kind, config = case_config(case, model)
    net = _network(model, config.dtype, num_classes)
    one = mesh.make_mesh(jax.devices()[:1])
    spe = 100
    plan = Plan(num_classes, spe, spe * config.num_epochs, 0, batch_size, batch_size, 0.1)
    batch = {
        "image": jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), "uint8"),
        "label": jax.ShapeDtypeStruct((batch_size,), "int32"),
    }
    if kind == "train":
        schedule = steps.make_schedule(config, plan)
        tx = steps.make_optimizer(config, schedule)
        step = steps.make_train_step(net, tx, schedule, one, config, num_classes=num_classes)
        state = steps.init_state(net, tx, config.seed, one, ema=config.ema_decay > 0)
        args = (_abstract(state), batch)
    else:
        step = steps.make_eval_step(net, one)
        batch["mask"] = jax.ShapeDtypeStruct((batch_size,), "float32")
        args = (*_abstract(steps.split_weights(net)), batch)
    # The platform check off: cpu_compiled_flops compiles this module for the CPU.
    exported = jax.export.export(
        step, platforms=[platform], disabled_checks=[jax.export.DisabledSafetyCheck.platform()]
    )(*args)
    convs = conv_layers(net)
    return Program(
        case=case,
        kind=kind,
        platform=platform,
        exported=exported,
        step=step,
        args=args,
        config=config,
        conv_layers=len(convs),
        image_convs=sum(cin == 3 for cin in convs),
        batch_norms=sum(isinstance(m, nnx.BatchNorm) for _, m in nnx.iter_graph(net)),
        num_state_args=len(jax.tree.leaves(args[:-1])),
        batch_shape=batch["image"].shape,
    )


def conv_layers(net: nnx.Module) -> list[int]:
    """The input channels of every 2-D convolution module of ``net``: ``nnx.Conv`` (the ResNets,
    byob, VoVNet) and the NF networks' weight-standardized ``StdConv``, each one convolution in
    the program (ECA's 1-D convolution is not one: it is lowered as products of shifted taps)."""
    from eca_flax.models.nfnet import StdConv

    out = []
    for _, m in nnx.iter_graph(net):
        if isinstance(m, nnx.Conv) and len(m.kernel_size) == 2:
            out.append(m.in_features)
        elif isinstance(m, StdConv):
            out.append(m.kernel.shape[2] * m.groups)
    return out


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def problems(program: Program) -> list[str]:
    """What is wrong with a program meant for an accelerator (empty: nothing): the checks of
    tests/test_lowering.py, one sentence each, so the benchmark can print them too."""
    out = []
    ops = program.ops()
    counts = program.op_counts()
    bf16 = program.config.dtype == "bfloat16"
    convs = [op for op in ops if op.name == "convolution"]
    # The network's own convolutions, one per layer (and gradient): cpu_kernels' formulations
    # replace 1x1 convolutions and weight gradients by dot_general, so fewer remain.
    if counts["convolution"] != program.expected_convolutions():
        out.append(
            f"{counts['convolution']} convolutions, expected {program.expected_convolutions()} "
            f"({program.conv_layers} conv layers)"
        )
    want = "bf16" if bf16 else "f32"
    wrong = sorted({t for op in convs for _, t in op.operands + op.results if t != want})
    if wrong:
        out.append(f"convolutions in {', '.join(wrong)} (expected {want} only)")
    # cpu_kernels recasts convolutions as products of an NHWC map (4-D) with a matrix or with
    # another map: operands of rank 4 at most, one of them 4-D. The classifier is (B, C) x
    # (C, K); BoT's and Halo's attention products carry a heads axis (5-D and 7-D operands).
    dots = [op for op in ops if op.name == "dot_general" and _conv_as_product(op)]
    if dots:
        out.append(f"{len(dots)} dot_general ops on feature maps (CPU formulations)")
    if program.kind == "train" and _max_pools(program.text) and not counts["select_and_scatter"]:
        out.append("max-pool gradient without select_and_scatter (the CPU formulation)")
    targets = program.custom_call_targets()
    callbacks = [t for t in targets if "callback" in t.lower()]
    if callbacks or any(counts[n] for n in ("send", "recv", "outfeed", "infeed")):
        out.append(f"host callbacks or transfers: {callbacks or 'send/recv/infeed/outfeed'}")
    if program.exported.ordered_effects or program.exported.unordered_effects:
        out.append("the program has effects (callbacks, prints)")
    types = program.argument_types()
    n_state = program.num_state_args
    if program.kind == "train":
        donated = set(program.donated())
        missing = [i for i in types if i < n_state and i not in donated]
        if missing or not donated:
            out.append(f"{len(missing)} of {n_state} train-state arguments are not donated")
    image = [i for i, (shape, _) in types.items() if shape == program.batch_shape]
    if [types[i][1] for i in image] != ["ui8"]:
        out.append(f"the image batch enters as {[types[i] for i in image]}, not one ui8 argument")
    out += _float32_statistics(program, ops)
    return out


def _max_pools(text: str) -> int:
    """reduce_window ops taking a maximum (max-pools; the NF networks' average pools sum)."""
    bodies = [
        text[m.end() : text.find("stablehlo.return", m.end())]
        for m in _REDUCE_WINDOW.finditer(text)
    ]
    return sum("stablehlo.maximum" in body for body in bodies)


def _conv_as_product(op: Op) -> bool:
    """Whether a dot_general has cpu_kernels' shape: a 4-D operand, none of higher rank."""
    ranks = [len(shape) for shape, _ in op.operands]
    return max(ranks) == 4


def _float32_statistics(program: Program, ops: list[Op]) -> list[str]:
    """BatchNorm's batch statistics (reductions of (B, H, W, C) over B, H, W) and the loss
    (reductions of (B, K) logits over K) in float32."""
    out = []
    b = program.batch_shape[0]
    reduces = [op for op in ops if op.name == "reduce" and op.operands]
    dims = lambda op: tuple(int(d) for d in re.findall(r"\d+", _dims(op.text)))
    stats = [op for op in reduces if len(op.operands[0][0]) == 4 and dims(op) == (0, 1, 2)]
    if program.kind == "train":
        low = [op.operands[0][1] for op in stats if op.operands[0][1] != "f32"]
        if low or sum(op.times for op in stats) < 2 * program.batch_norms:
            out.append(  # BatchNorm's statistics, and biases' gradients (the NF networks)
                f"BatchNorm statistics: {sum(op.times for op in stats)} reductions over "
                f"(B, H, W) for {program.batch_norms} BatchNorms, non-float32: {sorted(set(low))}"
            )
        loss = [
            op
            for op in reduces
            if len(op.operands[0][0]) == 2 and op.operands[0][0][0] == b and 1 in dims(op)
        ]
        wrong = sorted({op.operands[0][1] for op in loss} - {"f32"})
        if not loss or wrong:
            out.append(f"loss reductions over the classes: {len(loss)}, non-float32: {wrong}")
        avals = jax.tree.unflatten(program.exported.out_tree, program.exported.out_avals)
        state, metrics = avals
        bad = [a.dtype for a in jax.tree.leaves(state["batch_stats"]) if a.dtype != "float32"]
        if metrics["loss"].dtype != "float32" or bad:
            out.append(f"loss {metrics['loss'].dtype}, batch_stats {sorted(set(map(str, bad)))}")
    return out


def _dims(op_text: str) -> str:
    m = re.search(r"dimensions = \[([0-9, ]*)\]", op_text)
    return m[1] if m else ""


def summary(program: Program, *, compile_cpu: bool = False) -> list[str]:
    """Lines for the benchmark: op counts, donation, flops (labelled by where they come from)."""
    counts = program.op_counts()
    convs = collections.Counter(
        "/".join(sorted({t for _, t in op.operands}))
        for op in program.ops()
        if op.name == "convolution"
        for _ in range(op.times)
    )
    shown = ("convolution", "dot_general", "reduce", "reduce_window", "select_and_scatter")
    lines = [
        f"{program.case} ({program.kind}, {program.config.model}, {program.platform}): "
        f"{sum(counts.values())} ops; "
        + ", ".join(f"{n} {counts[n]}" for n in shown)
        + f"; custom_call {counts['custom_call']}",
        f"  convolutions by dtype: {dict(convs)} (expected {program.expected_convolutions()} "
        f"for {program.conv_layers} conv layers); donated arguments {len(program.donated())} "
        f"of {program.num_state_args} state leaves",
    ]
    flops = program.flops()
    lines.append(
        f"  flops: {flops / 1e9:.3f} G (XLA cost analysis of the {program.platform} lowering, "
        "unoptimized HLO)"
        if flops is not None
        else f"  flops: unavailable for {program.platform} from this jax"
    )
    if compile_cpu:
        cpu = program.cpu_compiled_flops()
        lines.append(
            f"  flops: {cpu / 1e9:.3f} G (the same module compiled for this CPU, after XLA:CPU's "
            "passes)"
            if cpu is not None
            else "  flops: the CPU compile gave no cost analysis"
        )
    lines += [f"  PROBLEM: {p}" for p in problems(program)]
    return lines
