"""The GPU and TPU programs of the real train and eval steps, lowered on this CPU.

``eca_flax.benchmark.lowering`` builds the steps train.py runs (training.steps with a config's
optimizer, schedule, mixing and EMA) and exports them with ``jax.export`` for "cuda" and "tpu"
from abstract shapes: tracing and lowering only, nothing is compiled or run. A small network
(ECA-ResNet-18, 32x32, batch 8) has every kind of layer the big ones have.
"""

import dataclasses
import functools

import jax
import pytest

from eca_flax.benchmark import lowering

PROGRAMS = [  # the fast tier lowers the default recipe for cuda; the rest is slow
    pytest.param(case, platform, marks=[] if i == 0 else [pytest.mark.slow])
    for i, (case, platform) in enumerate((c, p) for c in lowering.CASES for p in lowering.PLATFORMS)
]


@functools.cache
def program(case: str, platform: str) -> lowering.Program:
    return lowering.lower(case, platform)


@pytest.mark.parametrize(("case", "platform"), PROGRAMS)
def test_accelerator_program(case, platform):
    p = program(case, platform)
    counts = p.op_counts()
    bf16 = p.config.dtype == "bfloat16"
    # The network's own convolutions: eca_resnet18 has 20 conv layers (stem, 16 in the blocks,
    # 3 downsamples); a train step adds each one's weight gradient and all but the stem's input
    # gradient.
    assert p.conv_layers == 20
    assert counts["convolution"] == (20 if p.kind == "eval" else 3 * 20 - 1)
    conv_types = {t for op in p.ops() if op.name == "convolution" for _, t in op.operands}
    assert conv_types == ({"bf16"} if bf16 else {"f32"})
    # No host callbacks, no effects.
    assert not [t for t in p.custom_call_targets() if "callback" in t.lower()]
    assert not p.exported.ordered_effects and not p.exported.unordered_effects
    # The batch enters as uint8; the train state (every leaf) is donated.
    types = p.argument_types()
    assert [t for shape, t in types.values() if shape == (8, 32, 32, 3)] == ["ui8"]
    if p.kind == "train":
        assert set(p.donated()) == set(range(p.num_state_args))
    else:
        assert not p.donated()
    # Everything above, and BatchNorm statistics, loss and dot_general operands (problems()).
    assert lowering.problems(p) == []


def test_problems_sees_a_cpu_formulation(monkeypatch):
    """The gate off: cpu_kernels' CPU branch taken in a cuda program (1x1 convolutions and
    weight gradients as dot_general, the max-pool gradient as comparisons) is reported."""
    monkeypatch.setattr(jax.lax, "platform_dependent", lambda *a, cpu, default: cpu(*a))
    p = lowering.lower("sgd_bfloat16", "cuda")
    found = "\n".join(lowering.problems(p))
    assert "convolutions, expected 59" in found
    assert "dot_general ops on feature maps" in found
    assert "without select_and_scatter" in found


@pytest.mark.slow
def test_problems_sees_float32_convolutions_in_a_bfloat16_program():
    p = program("sgd_float32", "cuda")
    _, bf16 = lowering.case_config("sgd_bfloat16", "eca_resnet18")
    assert any(
        "convolutions in f32" in line
        for line in lowering.problems(dataclasses.replace(p, config=bf16))
    )


@pytest.mark.slow
def test_benchmark_lower_for_prints_counts_and_flops():
    from eca_flax.benchmark import cli

    lines = []
    args = cli.parse_args(["--lower-for", "tpu", "--models", "eca_resnet18", "--batch-size", "8"])
    args.image_size = 32
    assert cli.lower_for(args, lines.append) == 0
    text = "\n".join(lines)
    assert "sgd_bfloat16 (train, eca_resnet18, tpu)" in text and "convolution 59" in text
    assert "(XLA cost analysis of the tpu lowering, unoptimized HLO)" in text
    assert text.count("flops: ") == len(lowering.CASES) and "0 problems" in text


# timm's other families (issue 30): the bfloat16 train and eval steps for cuda, as the GPU runs
# them. Conv layers (each one convolution per pass): eca_nfnet_l0 4 stem + 12 blocks x 4 + 4
# downsamples + final_conv; eca_resnext26ts 3 stem + 8 x 3 + 4 shortcuts; eca_halonext26ts 3 +
# 5 x 3 + 3 attention blocks x 4 (1x1 in, q, kv, 1x1 out) + 4; eca_vovnet39b 3 + 6 OSA blocks x 6.
# The weights are zeros (lowering reads shapes only): ~1 s (eval) and ~3 s (train) each.
FAMILIES = {"eca_nfnet_l0": 57, "eca_resnext26ts": 31, "eca_halonext26ts": 34, "eca_vovnet39b": 39}


@pytest.mark.parametrize("model", FAMILIES)
def test_timm_families_lower_for_cuda_in_bfloat16(model):
    size = 256 if model == "eca_halonext26ts" else 64  # Halo: multiples of 256
    for case in ("sgd_bfloat16", "eval_bfloat16"):
        p = lowering.lower(case, "cuda", model=model, batch_size=2, image_size=size)
        assert p.conv_layers == FAMILIES[model]
        counts = p.op_counts()
        assert counts["convolution"] == p.expected_convolutions()
        assert {t for op in p.ops() if op.name == "convolution" for _, t in op.operands} == {"bf16"}
        assert lowering.problems(p) == [], (case, lowering.problems(p))
        if case == "sgd_bfloat16":  # a max-pool's gradient is select_and_scatter; NFNet has none
            assert bool(counts["select_and_scatter"]) == (model != "eca_nfnet_l0")
    if model == "eca_nfnet_l0":  # the misreports before: its average pools are no max-pools,
        assert counts["reduce_window"] and not lowering._max_pools(p.text)
        # and its weight-standardized convolutions are convolutions (bias gradients: float32)
        assert p.batch_norms == 0 and p.expected_convolutions() == 57
    if model == "eca_halonext26ts":  # attention's products (heads axis) are no conv products
        assert counts["dot_general"] > 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["faster_rcnn", "mask_rcnn", "retinanet"])
def test_detectors_lower_for_cuda(kind):
    """The v1 detectors' jitted stages (eca_flax.detection) export for cuda from abstract
    shapes at the (1333, 800) landscape bucket, with lax's convolutions (no CPU formulation)."""
    from flax import nnx

    from eca_flax.detection.detectors import Detector, export_stages

    detector = nnx.eval_shape(lambda: Detector(kind, "eca_resnet50", (3, 3, 7, 7)))
    stages = export_stages(detector, "cuda")
    assert set(stages) == {"dense", "boxes", "masks"} - (
        {"masks"} if kind == "faster_rcnn" else set()
    ) - ({"boxes", "masks"} if kind == "retinanet" else set())
    for exported in stages.values():
        assert exported.platforms == ("cuda",)
        text = exported.mlir_module()
        assert "stablehlo.convolution" in text or "dot_general" in text
    stride = 8 if kind == "retinanet" else 4  # the finest FPN level: P3 or P2
    assert stages["dense"].out_avals[0].shape == (1, 800 // stride, 1344 // stride, 256)
