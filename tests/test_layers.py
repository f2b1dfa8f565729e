"""eca_flax.models.layers against PyTorch: ECA (shared and not), SE, BatchNorm's variance, the
max-pool's padding, the adaptive kernel rule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_models import images, to_nchw

import eca_flax
from eca_flax.models import layers
from eca_flax.models import torch_reference as tr
from eca_flax.weights import convert


def test_running_var_uses_biased_variance():
    """The one documented BN difference: Flax's running_var uses the biased batch variance."""
    bn = layers.batch_norm(3, rngs=nnx.Rngs(0))
    tbn = torch.nn.BatchNorm2d(3)
    x = images(4, 5, seed=6)[..., :3]
    bn(jnp.asarray(x))
    tbn(to_nchw(x))
    n = 4 * 5 * 5
    biased = x.reshape(-1, 3).var(0)
    np.testing.assert_allclose(np.asarray(bn.mean[...]), tbn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.var[...]), 0.9 + 0.1 * biased, rtol=1e-5)
    unbiased_var = tbn.running_var.detach().numpy()
    np.testing.assert_allclose(unbiased_var, 0.9 + 0.1 * biased * n / (n - 1), rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
@pytest.mark.parametrize("shared", [True, False])
def test_eca_layer_forward_and_gradients_match_reference(k, shared):
    c = 24
    ref = (tr.ECALayer if shared else tr.ECANSLayer)(c, k)
    with torch.no_grad():
        ref.conv.weight.copy_(
            torch.randn(ref.conv.weight.shape, generator=torch.Generator().manual_seed(k))
        )
    eca = layers.ECA(c, k, shared=shared, rngs=nnx.Rngs(0))
    convert.load_state_dict(eca, {"conv.weight": ref.conv.weight.detach().numpy()})
    x = np.random.RandomState(k).randn(3, 5, 5, c).astype(np.float32)

    tx = to_nchw(x).requires_grad_(True)
    ref(tx).pow(2).sum().backward()
    want_dx = tx.grad.numpy().transpose(0, 2, 3, 1)
    want_dw = convert.to_flax_layout(ref.conv.weight.grad.numpy())

    def loss(eca, x):
        return jnp.sum(eca(x) ** 2)

    (dw, dx) = nnx.grad(loss, argnums=(0, 1))(eca, jnp.asarray(x))
    with torch.no_grad():
        want = ref(to_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(eca(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw.conv.kernel[...]), want_dw, rtol=1e-4, atol=1e-5)


def test_se_layer_forward_gradients_and_init_match_reference():
    c = 64  # hidden width c // 16 = 4, as in ResNet-18's first stage
    ref = tr.SELayer(c)
    se = layers.SE(c, rngs=nnx.Rngs(0))
    assert (se.fc1.kernel.shape, se.fc2.kernel.shape) == ((64, 4), (4, 64))
    # PyTorch's default Linear init: uniform(+-1/sqrt(fan_in)) for weight and bias
    for fc, fan_in in ((se.fc1, 64), (se.fc2, 4)):
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(fc.bias[...]).max() <= bound
        assert 0.9 * bound < np.abs(fc.kernel[...]).max() <= bound  # 256 uniform draws
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    assert sorted(sd) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    convert.load_state_dict(se, sd)
    x = np.random.RandomState(1).randn(3, 5, 5, c).astype(np.float32)
    tx = to_nchw(x).requires_grad_(True)
    out = ref(tx)
    out.pow(2).sum().backward()

    def loss(se, x):
        return jnp.sum(se(x) ** 2)

    (dw, dx) = nnx.grad(loss, argnums=(0, 1))(se, jnp.asarray(x))
    # float32 sums over <= 64 terms of O(1) values: 1e-5 / 1e-4 relative covers their rounding
    want = out.detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(se(jnp.asarray(x))), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
    for fc in ("fc1", "fc2"):
        got, ref_fc = getattr(dw, fc), getattr(ref, fc)
        want_dw = convert.to_flax_layout(ref_fc.weight.grad.numpy())
        np.testing.assert_allclose(got.kernel[...], want_dw, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.bias[...], ref_fc.bias.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_eca_is_cross_correlation_not_convolution():
    """An asymmetric kernel must not be flipped: the PyTorch Conv1d is a cross-correlation."""
    eca = layers.ECA(4, 3, rngs=nnx.Rngs(0))
    eca.conv.kernel.set_value(jnp.array([1.0, 0.0, 0.0]).reshape(3, 1, 1))
    y = jnp.array([1.0, 2.0, 3.0, 4.0])
    x = jnp.broadcast_to(y, (1, 2, 2, 4))
    gate = eca(x)[0, 0, 0] / y
    # tap 0 reads the previous channel: z_c = y_{c-1} (zero-padded)
    np.testing.assert_allclose(gate, jax.nn.sigmoid(jnp.array([0.0, 1.0, 2.0, 3.0])), rtol=1e-6)


def test_max_pool_pads_with_minus_infinity():
    x = -np.abs(images(2, 8, seed=7)) - 1.0
    want = torch.nn.MaxPool2d(3, 2, 1)(to_nchw(x)).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(layers.max_pool_3x3_s2(jnp.asarray(x))), want)


def test_adaptive_kernel_formula():
    # k = |log2(C)/2 + 1/2|_odd as in the authors' code
    got = {c: eca_flax.adaptive_kernel_size(c) for c in (16, 64, 128, 256, 512, 1024, 2048)}
    assert got == {16: 3, 64: 3, 128: 5, 256: 5, 512: 5, 1024: 5, 2048: 7}
    for c in range(1, 5000, 37):
        t = int(abs((math.log2(c) + 1) / 2))
        assert eca_flax.adaptive_kernel_size(c) == (t if t % 2 else t + 1)
    assert eca_flax.adaptive_kernel_size(256, gamma=1, b=0) == 9
