"""Building blocks shared by the ECA networks: the ECA layer itself and exact PyTorch layers.

Everything here reproduces the PyTorch original bit for bit in layout-independent terms:
explicit symmetric padding (never 'SAME'), BatchNorm with PyTorch's epsilon and momentum,
and PyTorch's default initialisers where the original keeps them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
Dtype = Any

# PyTorch BatchNorm2d defaults: eps=1e-5, momentum=0.1 (Flax counts momentum the other way).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# Kaiming-normal with fan_out, untruncated: the original's normal_(0, sqrt(2 / (kh * kw * out))).
conv_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch's default Conv/Linear init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Sequential(nnx.List):
    """An indexable sequence of layers applied in order, like ``torch.nn.Sequential``.

    Its children live at integer paths (``downsample[0]``, ``features[3].conv[1]``), so a
    PyTorch state_dict key maps to a Flax path by splitting on dots.
    """

    def __call__(self, x: Array) -> Array:
        for layer in self:
            x = layer(x)
        return x


# --------------------------------------------------------------------------------------------
# 2-D convolution with a CPU fast path. XLA:CPU (jax 0.10) computes a weight gradient as a
# convolution whose window is the whole feature map, after transposing both operands to its
# canonical layout: in an ECA-ResNet-50 train step these took ~60% of the time (docs/benchmarks.md).
# On CPU we express 1x1 convolutions as matrix products, every weight gradient as products
# over (batch, height, width), and depthwise convolutions (grouped ones are 10-100x slower in
# XLA:CPU) as sums of shifted copies. Other platforms keep lax.conv_general_dilated.

_NHWC = ("NHWC", "HWIO", "NHWC")
_SUM_BATCH_SPACE = (((0, 1, 2), (0, 1, 2)), ((), ()))  # dot_general: contract N, H, W
_MIN_TAP_CHANNELS = 16  # Below this (the RGB stems) XLA's own weight gradient is faster.

Padding2D = tuple[tuple[int, int], tuple[int, int]]


def _lax_conv(x: Array, w: Array, strides: tuple[int, int], padding: Padding2D) -> Array:
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _strided(x: Array, strides: tuple[int, int]) -> Array:
    """x[:, ::sh, ::sw]: the pixels a stride-s 1x1 convolution reads."""
    return x if strides == (1, 1) else x[:, :: strides[0], :: strides[1]]


def _sum_batch_space(a: Array, b: Array) -> Array:
    """sum over n, h, w of a[n,h,w,i] * b[n,h,w,j] -> (I, J), in float32.

    XLA:CPU transposes the left operand of this product (its dot kernels want the contracted
    axis innermost). On large feature maps with few channels (ResNet's 56x56 stage) one
    product per image is 1.5-2.3x faster: the transposes stay in cache and both cores get work.
    XLA's dots have no bfloat16 x bfloat16 -> float32 form, so other dtypes are upcast.
    """
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    n, h, w, _ = a.shape
    if n > 1 and h * w >= 8 * max(a.shape[-1], b.shape[-1]):
        per_image = jax.lax.dot_general(a, b, (((1, 2), (1, 2)), ((0,), (0,))))
        return per_image.sum(0)
    return jax.lax.dot_general(a, b, _SUM_BATCH_SPACE)


def _weight_product(x: Array, dy: Array) -> Array:
    """A 1x1 convolution's weight gradient (Cin, Cout): the smaller operand goes on the left."""
    if x.shape[-1] <= dy.shape[-1]:
        return _sum_batch_space(x, dy)
    return _sum_batch_space(dy, x).T


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _cpu_conv(x: Array, w: Array, strides: tuple[int, int], padding: Padding2D) -> Array:
    """NHWC x HWIO convolution (groups 1, no dilation) as XLA:CPU runs fastest."""
    if w.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
        return jax.lax.dot_general(_strided(x, strides), w[0, 0], (((3,), (0,)), ((), ())))
    return _lax_conv(x, w, strides, padding)


def _cpu_conv_fwd(x, w, strides, padding):
    return _cpu_conv(x, w, strides, padding), (x, w)


def _cpu_conv_bwd(strides, padding, residuals, dy):
    x, w = residuals
    kh, kw, cin, _ = w.shape
    if (kh, kw) == (1, 1) and padding == ((0, 0), (0, 0)):
        xs = _strided(x, strides)
        dw = _weight_product(xs, dy)[None, None]
        dxs = jax.lax.dot_general(dy, w[0, 0], (((3,), (1,)), ((), ())))
        _, to_x = jax.vjp(lambda x_: _strided(x_, strides), x)  # scatter back to stride s
        return to_x(dxs.astype(x.dtype))[0], dw.astype(w.dtype)
    _, conv_vjp = jax.vjp(lambda x_, w_: _lax_conv(x_, w_, strides, padding), x, w)
    if cin < _MIN_TAP_CHANNELS:
        return conv_vjp(dy)
    dx = conv_vjp(dy)[0]  # XLA drops the unused weight gradient
    # One product per kernel tap (i, j): the input window it saw against the output gradient.
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    # dy on the left: XLA transposes it once for all taps. Each tap gives dW[i, j].T.
    taps = [
        _sum_batch_space(dy, _window(xp, i, j, dy.shape[1:3], strides))
        for i in range(kh)
        for j in range(kw)
    ]
    dw = jnp.stack(taps).reshape(kh, kw, -1, cin).transpose(0, 1, 3, 2)
    return dx, dw.astype(w.dtype)


_cpu_conv.defvjp(_cpu_conv_fwd, _cpu_conv_bwd)


def _window(x: Array, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, int]) -> Array:
    """x[:, i + s*h, j + s*w, :] for every output pixel (h, w): what kernel tap (i, j) reads."""
    (ho, wo), (sh, sw) = out_hw, strides
    end = (x.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, x.shape[3])
    return jax.lax.slice(x, (0, i, j, 0), end, (1, sh, sw, 1))


def _cpu_depthwise(x: Array, w: Array, strides: tuple[int, int], padding: Padding2D) -> Array:
    """Depthwise convolution (kernel (kh, kw, 1, C)) as a sum of kh*kw shifted, scaled copies.

    XLA:CPU's grouped convolution runs MobileNetV2's depthwise layers 10-100x slower than this
    single fused loop, forward and backward (autodiff of slices and products).
    """
    kh, kw = w.shape[:2]
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), *padding, (0, 0)))
    out_hw = tuple((xp.shape[d + 1] - k) // strides[d] + 1 for d, k in enumerate((kh, kw)))
    w32 = w.astype(jnp.float32)
    taps = [_window(xp, i, j, out_hw, strides) * w32[i, j, 0] for i in range(kh) for j in range(kw)]
    return functools.reduce(jnp.add, taps).astype(x.dtype)


def conv_general_dilated(
    lhs: Array,
    rhs: Array,
    window_strides: Sequence[int],
    padding: Any,
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    **kwargs: Any,
) -> Array:
    """``lax.conv_general_dilated`` with the CPU fast path above; same signature and results.

    Given to ``nnx.Conv(conv_general_dilated=...)``. Only 2-D NHWC convolutions with explicit
    padding, no dilation, default precision and one group (or depthwise) take the fast path,
    and only when compiled for CPU (``lax.platform_dependent``). Results agree with lax to
    float32 rounding (the forward of a kxk convolution, k > 1, is lax's own).
    """
    args = (lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers)
    lax_conv = functools.partial(
        jax.lax.conv_general_dilated,
        window_strides=window_strides,
        padding=padding,
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
        **kwargs,
    )
    if not _takes_cpu_path(*args, feature_group_count, precision, preferred_element_type, kwargs):
        return lax_conv(lhs, rhs)
    strides = (int(window_strides[0]), int(window_strides[1]))
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    cpu_conv = _cpu_conv if feature_group_count == 1 else _cpu_depthwise
    return jax.lax.platform_dependent(
        lhs, rhs, cpu=lambda x, w: cpu_conv(x, w, strides, pads), default=lax_conv
    )


def _takes_cpu_path(
    lhs, rhs, strides, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups, precision,
    preferred_element_type, kwargs,
) -> bool:  # fmt: skip
    if lhs.ndim != 4 or precision is not None or isinstance(padding, str):
        return False
    depthwise = groups == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[-2] == 1
    if groups != 1 and not depthwise:
        return False
    if preferred_element_type is not None or any(v is not None for v in kwargs.values()):
        return False
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return False
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    return jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


def conv2d(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A bias-free 2-D convolution with explicit symmetric padding (default (k-1)//2)."""
    p = (kernel - 1) // 2 if padding is None else padding
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        feature_group_count=groups,
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


def batch_norm(
    features: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
) -> nnx.BatchNorm:
    """BatchNorm with PyTorch's epsilon 1e-5 and momentum 0.1 (Flax momentum 0.9)."""
    return nnx.BatchNorm(
        features,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def max_pool_3x3_s2(x: Array) -> Array:
    """3x3 stride-2 max-pool with one pixel of -inf padding on each side (PyTorch's MaxPool2d).

    On CPU its gradient goes, as in PyTorch, to the first maximum of each window in row-major
    order, computed with nine comparisons: XLA:CPU's own select-and-scatter took 2.5x longer.
    """
    return jax.lax.platform_dependent(x, cpu=_max_pool_first_max, default=_reduce_window_max)


def _reduce_window_max(x: Array) -> Array:
    return jax.lax.reduce_window(
        x,
        np.array(-np.inf, x.dtype),  # A concrete init value: differentiable max-pool.
        jax.lax.max,
        (1, 3, 3, 1),
        (1, 2, 2, 1),
        ((0, 0), (1, 1), (1, 1), (0, 0)),
    )


@jax.custom_vjp
def _max_pool_first_max(x: Array) -> Array:
    return _reduce_window_max(x)


def _max_pool_fwd(x: Array) -> tuple[Array, tuple[Array, Array]]:
    y = _reduce_window_max(x)
    return y, (x, y)


def _max_pool_bwd(residuals: tuple[Array, Array], dy: Array) -> tuple[Array]:
    x, y = residuals
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, dy.dtype)
    for i in range(3):
        for j in range(3):
            # The window tap (i, j) reads, and its transpose: a strided scatter into xp's shape.
            window, put_back = jax.vjp(
                lambda t, i=i, j=j: _window(t, i, j, y.shape[1:3], (2, 2)), xp
            )
            first = (window == y) & ~taken
            taken = taken | first
            dxp = dxp + put_back(jnp.where(first, dy, jnp.zeros((), dy.dtype)))[0]
    return (dxp[:, 1:-1, 1:-1],)


_max_pool_first_max.defvjp(_max_pool_fwd, _max_pool_bwd)


def adaptive_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The paper's adaptive ECA kernel size k = |log2(C)/gamma + b/gamma|_odd (eq. 12).

    As in the authors' code: t = int(|(log2 C + b) / gamma|), then k = t if t is odd else t + 1.
    ResNet-50's block widths 256, 512, 1024, 2048 give 5, 5, 5, 7.
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nnx.Module):
    """Efficient Channel Attention: x * sigmoid(conv1d_k(mean_hw(x))) across channels.

    ``shared=True`` is the paper's ECA: one k-tap filter slid over the channel axis
    (PyTorch Conv1d(1, 1, k, padding=(k-1)//2, bias=False), kernel (k, 1, 1) here).
    ``shared=False`` is the ECA-NS ablation: channel c has its own k taps over its k
    neighbours (PyTorch Conv1d(C, C, k, groups=C), kernel (k, 1, C) here).

    The attribute is named ``conv`` after the PyTorch ``eca.conv.weight``. The filter is applied
    as a sum of k shifted copies of the pooled vector: a cross-correlation exactly as PyTorch's,
    and far cheaper than a convolution primitive over a length-C, one-feature sequence.
    """

    def __init__(
        self,
        channels: int,
        k_size: int,
        *,
        shared: bool = True,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if k_size < 1 or k_size % 2 == 0:
            raise ValueError(f"ECA kernel size must be a positive odd number, got {k_size}")
        self.k_size = k_size
        self.channels = channels
        self.shared = shared
        groups = 1 if shared else channels
        p = (k_size - 1) // 2
        self.conv = nnx.Conv(
            groups,
            groups,
            (k_size,),
            padding=((p, p),),
            feature_group_count=groups,
            use_bias=False,
            kernel_init=torch_default_init(k_size),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        k, p = self.k_size, (self.k_size - 1) // 2
        # Pool and gate in float32: a mean over H*W and a sigmoid are cheap and precision-sensitive.
        y = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (B, C)
        w = self.conv.kernel[...].astype(jnp.float32)[:, 0, :]  # (k, 1) shared or (k, C) non-shared
        ypad = jnp.pad(y, ((0, 0), (p, p)))
        c = y.shape[-1]
        z = sum(w[j] * ypad[:, j : j + c] for j in range(k))
        gate = jax.nn.sigmoid(z).astype(x.dtype)
        return x * gate[:, None, None, :]
