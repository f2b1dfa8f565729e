"""The benchmark tool end to end and its FLOP count, against the PyTorch reference."""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import no_tensorflow
import pytest
from flax import nnx

import eca_flax
from eca_flax import benchmark


def test_cost_flops_reads_xla_cost_analysis():
    a, b = jnp.ones((8, 32)), jnp.ones((32, 16))
    compiled = jax.jit(lambda a, b: a @ b).lower(a, b).compile()
    assert benchmark.cost_flops(compiled) == 2 * 8 * 32 * 16
    assert benchmark.buffer_bytes(compiled) >= 4 * (8 * 32 + 32 * 16 + 8 * 16)


def conv_macs(name: str, size: int) -> int:
    """Multiply-accumulates of every convolution and the fc layer of ``name`` at size x size,
    counted by hand from the shapes each convolution sees (padded taps excluded, as in XLA)."""
    model = eca_flax.create_model(name)
    total = model.fc.kernel.size

    def counting(lhs, rhs, strides, padding, **kwargs):
        nonlocal total
        kh, kw, cin, cout = rhs.shape
        (pt, pb), (pl, pr) = padding
        h, w = lhs.shape[1:3]
        ho, wo = (h + pt + pb - kh) // strides[0] + 1, (w + pl + pr - kw) // strides[1] + 1
        rows = sum(0 <= i * strides[0] + a - pt < h for i in range(ho) for a in range(kh))
        cols = sum(0 <= j * strides[1] + b - pl < w for j in range(wo) for b in range(kw))
        total += lhs.shape[0] * rows * cols * cin * cout
        return jax.lax.conv_general_dilated(lhs, rhs, strides, padding, **kwargs)

    for _, m in nnx.iter_graph(model):
        if isinstance(m, nnx.Conv) and m.kernel.ndim == 4:
            m.conv_general_dilated = counting
    model.eval()
    model(jnp.zeros((1, size, size, 3)))
    return total


def run_tool(*argv: str) -> tuple[list[benchmark.Result], str]:
    lines: list[str] = []
    results = benchmark.run(benchmark.parse_args(list(argv)), log=lines.append)
    return results, "\n".join(lines)


TINY = (
    "--models",
    "eca_resnet18",
    "--batch-size",
    "2",
    "--image-size",
    "32",
    "--repeats",
    "2",
    "--warmup",
    "0",
)


@pytest.mark.slow
def test_benchmark_against_torch_end_to_end():
    """The real tool with --torch on a tiny batch: train.py's step and PyTorch's, interleaved;
    FLOPs equal to the MACs counted by hand; the table and the ratios."""
    results, out = run_tool(*TINY, "--torch", "--no-plain")
    assert out.startswith("machine: CPU ") and "torch 2." in out
    assert [r.variant for r in results] == ["eca_flax", "PyTorch"]
    ours, theirs = results
    for r in results:
        assert len(r.infer.samples) == len(r.train.samples) == 2
        assert r.images_per_s("infer") > 0 and r.images_per_s("train") > 0
    assert ours.params == theirs.params == eca_flax.model_info("eca_resnet18").params
    assert ours.compile_infer_s > 0 and ours.compile_train_s > 0 and ours.memory_bytes > 0
    # XLA's count of the compiled forward: the convolutions' and fc's MACs plus a little
    # elementwise work (BN, ReLU, ECA, pooling), well under 10% here.
    want = conv_macs("eca_resnet18", 32)
    assert want <= ours.flops / 2 <= 1.1 * want
    table = out[out.index("| model | size | variant") :]
    row = r"\| eca_resnet18 \| 32 \| eca_flax \| 11,689,556 \| [\d.]+ \| [\d.]+M \|"
    assert re.search(row, table)
    ratio = re.search(
        r"eca_flax / PyTorch throughput \(>1: faster\) \| ([\d.]+)x \| ([\d.]+)x \|", table
    )
    assert ratio, table
    want_ratio = ours.images_per_s("train") / theirs.images_per_s("train")
    assert float(ratio.group(2)) == pytest.approx(want_ratio, abs=0.006)


@pytest.mark.slow
def test_benchmark_eca_and_se_overhead_rows():
    results, out = run_tool(*TINY, "--mode", "infer", "--se")
    variants = ["eca_flax", "eca_flax, attention=None", "eca_flax, attention=se"]
    assert [r.variant for r in results] == variants
    ours, plain, se = results
    assert plain.params == ours.params - eca_flax.model_info("eca_resnet18").eca_params
    se_model = nnx.eval_shape(lambda: eca_flax.create_model("eca_resnet18", attention="se"))
    assert se.params == eca_flax.count_params(se_model) == plain.params + 89_080
    assert ours.train is None and 0 < plain.flops < ours.flops
    for label, r, added in (("ECA", ours, "44"), ("SE", se, "89,080")):
        overhead = plain.images_per_s("infer") / r.images_per_s("infer")
        row = f"| eca_resnet18 | {label} overhead (+{added} params): time with {label} / without |"
        assert f"{row} {overhead:.2f}x | - |" in out


def test_se_needs_the_plain_run_and_a_resnet(capsys):
    for argv in (["--se", "--no-plain"], ["--se", "--models", "eca_mobilenet_v2"]):
        with pytest.raises(SystemExit):
            benchmark.parse_args(argv)
        assert "--se compares SE with the plain network" in capsys.readouterr().err


def test_bad_arguments_exit_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--models", "resnet50"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown model 'resnet50'" in err and "eca_resnet50" in err


@pytest.mark.slow
def test_train_mode_and_the_train_step_need_no_tensorflow():
    """The benchmark's train mode runs eca_flax.training.steps in a Python without TensorFlow."""
    blocked = subprocess.run(
        [sys.executable, "-c", no_tensorflow.HOOK + "import tensorflow"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert blocked.returncode == 1 and "No module named 'tensorflow'" in blocked.stderr
    proc = no_tensorflow.run(
        "eca_flax.benchmark", *TINY, "--mode", "train", "--repeats", "1", "--no-plain"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("tensorflow imported: False"), proc.stderr
    row = r"\| eca_resnet18 \| 32 \| eca_flax \| 11,689,556 \|.*\| [\d.]+ \|"
    assert re.search(row, proc.stdout)


def test_each_model_at_its_own_size_and_size_rules(capsys):
    """Without --image-size each model runs at its timm default (issue 30's four in one run:
    224 for eca_nfnet_l0 and eca_vovnet39b, 256 for the byob models); a size Halo's windows
    cannot take is one line naming the rule."""
    from eca_flax.benchmark import cli

    four = ["eca_nfnet_l0", "eca_resnext26ts", "eca_halonext26ts", "eca_vovnet39b"]
    args = benchmark.parse_args(["--models", *four, "--torch", "--mode", "infer", "--no-plain"])
    assert [cli.image_size(args, m) for m in four] == [224, 256, 256, 224]
    args = benchmark.parse_args(["--models", "eca_resnet50", "--image-size", "160"])
    assert cli.image_size(args, "eca_resnet50") == 160
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--models", "eca_halonext26ts", "--image-size", "224"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--image-size 224" in err and "multiples of 256" in err
