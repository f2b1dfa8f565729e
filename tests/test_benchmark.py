"""The benchmark tool end to end, its FLOP count, and the CPU convolution path it measures."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import eca_flax
from eca_flax import benchmark, layers

NHWC = ("NHWC", "HWIO", "NHWC")


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


TINY = ("--models", "eca_resnet18", "--batch-size", "2", "--image-size", "32", "--repeats", "2",
        "--warmup", "0")  # fmt: skip


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
    table = out[out.index("| model | variant") :]
    assert re.search(r"\| eca_resnet18 \| eca_flax \| 11,689,556 \| [\d.]+ \| [\d.]+M \|", table)
    ratio = re.search(
        r"eca_flax / PyTorch throughput \(>1: faster\) \| ([\d.]+)x \| ([\d.]+)x \|", table
    )
    assert ratio, table
    want_ratio = ours.images_per_s("train") / theirs.images_per_s("train")
    assert float(ratio.group(2)) == pytest.approx(want_ratio, abs=0.006)


def test_benchmark_eca_overhead_row():
    results, out = run_tool(*TINY, "--mode", "infer")
    assert [r.variant for r in results] == ["eca_flax", "eca_flax, attention=None"]
    ours, plain = results
    assert plain.params == ours.params - eca_flax.model_info("eca_resnet18").eca_params
    assert ours.train is None and 0 < plain.flops < ours.flops
    overhead = plain.images_per_s("infer") / ours.images_per_s("infer")
    assert f"| eca_resnet18 | ECA overhead: time with ECA / without | {overhead:.2f}x | - |" in out


def test_bad_arguments_exit_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.parse_args(["--models", "resnet50"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "unknown model 'resnet50'" in err and "eca_resnet50" in err


# --------------------------------------------------------------------------------------------
# layers.conv_general_dilated: the CPU formulation gives lax's results and gradients.


@pytest.mark.parametrize(
    "size,cin,cout,k,stride,groups,dtype",
    [
        (9, 8, 16, 1, 1, 1, jnp.float32),  # 1x1: a matrix product
        (9, 32, 8, 1, 2, 1, jnp.float32),  # strided 1x1 (projection shortcut)
        (10, 32, 16, 3, 1, 1, jnp.float32),  # 3x3: weight gradient per tap
        (16, 8, 16, 3, 1, 1, jnp.float32),  # large map, few channels: products per image
        (16, 16, 8, 1, 1, 1, jnp.float32),
        (11, 32, 48, 3, 2, 1, jnp.float32),
        (12, 3, 8, 7, 2, 1, jnp.float32),  # RGB stem: XLA's own weight gradient
        (10, 24, 24, 3, 1, 24, jnp.float32),  # depthwise: shifted copies
        (11, 24, 24, 3, 2, 24, jnp.float32),
        (10, 32, 16, 3, 2, 1, jnp.bfloat16),
        (9, 16, 32, 1, 1, 1, jnp.bfloat16),
        (10, 16, 16, 3, 2, 16, jnp.bfloat16),
    ],
)
def test_cpu_conv_matches_lax_values_and_gradients(size, cin, cout, k, stride, groups, dtype):
    rng = np.random.default_rng(k * 100 + cin)
    x = jnp.asarray(rng.standard_normal((2, size, size, cin)), dtype)
    w = jnp.asarray(0.1 * rng.standard_normal((k, k, cin // groups, cout)), dtype)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    p = (k - 1) // 2
    conv_args = ((stride, stride), ((p, p), (p, p)))
    kw = dict(dimension_numbers=dn, feature_group_count=groups)
    ref = lambda x, w: jax.lax.conv_general_dilated(x, w, *conv_args, **kw)
    fast = lambda x, w: layers.conv_general_dilated(x, w, *conv_args, **kw)
    want, got = jax.jit(ref)(x, w), jax.jit(fast)(x, w)
    assert got.dtype == want.dtype and got.shape == want.shape
    cotangent = jnp.asarray(rng.standard_normal(want.shape), dtype)
    grads = lambda f: jax.jit(lambda x, w: jax.vjp(f, x, w)[1](cotangent))(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for a, b in zip((got, *grads(fast)), (want, *grads(ref))):
        assert a.dtype == b.dtype and a.shape == b.shape
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.abs(a - b).max() <= tol * np.abs(b).max()


def test_cpu_weight_gradients_are_matrix_products():
    """The point of the CPU path: no weight gradient is left to XLA:CPU's convolution, whose
    window would be the whole feature map."""
    x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    loss = lambda f: lambda w: f(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn).sum()
    window = lambda f: jax.jit(jax.grad(loss(f))).lower(w).compile().as_text()
    assert "size=16x16" in window(jax.lax.conv_general_dilated)  # what XLA does by itself
    assert "size=16x16" not in window(layers.conv_general_dilated)


def test_other_convolutions_fall_back_to_lax():
    """'SAME' padding, dilation, groups that are not depthwise: lax itself, bit for bit."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 8, 8, 4)), jnp.float32)
    cases = [
        (jnp.ones((3, 3, 1, 4)), "SAME", {}),
        (jnp.ones((3, 3, 4, 4)), ((2, 2), (2, 2)), dict(rhs_dilation=(2, 2))),
        (jnp.ones((3, 3, 2, 4)), ((1, 1), (1, 1)), dict(feature_group_count=2)),
    ]
    for w, padding, kwargs in cases:
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
        kwargs.setdefault("feature_group_count", w.shape[3] // w.shape[2])
        args = (x, w, (1, 1), padding)
        want = jax.lax.conv_general_dilated(*args, dimension_numbers=dn, **kwargs)
        got = layers.conv_general_dilated(*args, dimension_numbers=dn, **kwargs)
        np.testing.assert_array_equal(got, want)


def test_block_gradients_match_the_lax_convolution():
    """A strided bottleneck block in train mode (1x1, strided 3x3, 1x1, strided projection
    shortcut, BatchNorm, ECA): parameter gradients with the CPU path against plain lax."""
    from eca_flax.resnet import Bottleneck

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 12, 12, 32)), jnp.float32)
    grads = []
    for conv in (layers.conv_general_dilated, jax.lax.conv_general_dilated):
        block = Bottleneck(32, 16, 2, 3, "eca", dtype=jnp.float32, param_dtype=jnp.float32,
                           rngs=nnx.Rngs(0))  # fmt: skip
        for _, m in nnx.iter_graph(block):
            if isinstance(m, nnx.Conv):
                m.conv_general_dilated = conv
        block.train()
        grads.append(nnx.jit(nnx.grad(lambda b: jnp.sum(jnp.sin(b(x)))))(block))
    fast, ref = (dict(nnx.to_flat_state(g)) for g in grads)
    assert fast.keys() == ref.keys() and len(fast) == 13
    for path, want in ref.items():
        a, b = np.asarray(fast[path][...]), np.asarray(want[...])
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max(), path


@pytest.mark.parametrize("shape", [(2, 12, 12, 3), (2, 11, 13, 4)])
def test_max_pool_gradient_goes_to_the_first_maximum_like_pytorch(shape):
    """The CPU max-pool gradient: PyTorch's values and routing, ties included (post-ReLU zeros
    and equal maxima), on even and odd sizes."""
    import torch

    rng = np.random.default_rng(sum(shape))
    x = np.maximum(rng.standard_normal(shape), 0).astype(np.float32)
    x[0, :4, :4, 0] = 1.0
    out_shape = (shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2, shape[3])
    cotangent = rng.standard_normal(out_shape).astype(np.float32)
    y, vjp = jax.vjp(layers.max_pool_3x3_s2, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(cotangent))
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    ty = torch.nn.functional.max_pool2d(tx, 3, 2, 1)
    ty.backward(torch.from_numpy(cotangent.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(y), ty.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)
