"""eca_flax.models.cpu_kernels: the XLA:CPU formulations give lax's values and gradients (and
PyTorch's max-pool gradient routing), and the switch turns them off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eca_flax.models import cpu_kernels, layers

NHWC = ("NHWC", "HWIO", "NHWC")


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
        # At most 4 output pixels: matrix products (cpu_kernels._small_map_conv).
        (2, 32, 48, 3, 1, 1, jnp.float32),  # 2x2: every tap reads some pixel
        (1, 32, 16, 3, 1, 1, jnp.float32),  # 1x1: only the centre tap reads a pixel
        (4, 32, 16, 3, 2, 1, jnp.float32),  # strided, 4x4 -> 2x2
        (3, 16, 24, 3, 2, 1, jnp.float32),  # strided, odd size: 3x3 -> 2x2
        (1, 16, 8, 7, 2, 1, jnp.float32),  # 7x7 stem kernel on one pixel
        (2, 16, 32, 3, 2, 1, jnp.bfloat16),  # 2x2 -> 1x1
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
    fast = lambda x, w: cpu_kernels.conv_general_dilated(x, w, *conv_args, **kw)
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
    window would be the whole feature map; on the smallest maps, no convolution at all."""
    x, w = jnp.ones((2, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    loss = lambda f: lambda w: f(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn).sum()
    window = lambda f: jax.jit(jax.grad(loss(f))).lower(w).compile().as_text()
    assert "size=16x16" in window(jax.lax.conv_general_dilated)  # what XLA does by itself
    assert "size=16x16" not in window(cpu_kernels.conv_general_dilated)
    # On a map of at most 4 output pixels no convolution is left at all: forward, input and
    # weight gradients.
    small = lambda f: lambda x, w: jnp.sin(f(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn))
    hlo = lambda f: jax.jit(jax.grad(lambda *a: small(f)(*a).sum(), (0, 1)))
    compiled = lambda f: hlo(f).lower(x[:, :2, :2], w).compile().as_text()
    assert compiled(jax.lax.conv_general_dilated).count("convolution(") == 3
    assert "convolution(" not in compiled(cpu_kernels.conv_general_dilated)


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
        got = cpu_kernels.conv_general_dilated(*args, dimension_numbers=dn, **kwargs)
        np.testing.assert_array_equal(got, want)


def test_block_gradients_match_the_lax_convolution():
    """A strided bottleneck block in train mode (1x1, strided 3x3, 1x1, strided projection
    shortcut, BatchNorm, ECA): parameter gradients with the CPU path against plain lax."""
    from eca_flax.models.resnet import Bottleneck

    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 12, 12, 32)), jnp.float32)
    grads = []
    for kernels in (True, False):
        block = Bottleneck(
            32, 16, 2, 3, "eca", dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
        )
        block.train()
        with cpu_kernels.switch(kernels):
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
