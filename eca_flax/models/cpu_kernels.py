"""XLA:CPU formulations of the convolution and max-pool that eca_flax's layers use.

XLA:CPU (jax 0.10) computes a convolution's weight gradient as a convolution whose window is
the whole feature map, after transposing both operands to its canonical layout: in an
ECA-ResNet-50 train step these took ~60% of the time (docs/benchmarks.md). Here, on CPU only,
1x1 convolutions are matrix products, every weight gradient is a product over (batch, height,
width), depthwise convolutions (10-100x slower as XLA:CPU grouped convolutions) are sums of
shifted copies, kxk convolutions with at most 4 output pixels (the last stages on small
images, where XLA:CPU's kernels were 10-100x slower) are matrix products, and the max-pool
gradient is nine comparisons instead of select-and-scatter.
Values and gradients equal lax's to float32 rounding; other platforms always run lax.

One switch turns all of it off: the environment variable ``ECA_FLAX_CPU_KERNELS=0`` or
``with cpu_kernels.switch(False): ...`` around the code that traces (jits) the model, e.g.
to measure what the kernels buy (``benchmarks/cpu_train_ablation.py``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Padding2D = tuple[tuple[int, int], tuple[int, int]]

_NHWC = ("NHWC", "HWIO", "NHWC")
_SUM_BATCH_SPACE = (((0, 1, 2), (0, 1, 2)), ((), ()))  # dot_general: contract N, H, W
_MIN_TAP_CHANNELS = 16  # Below this (the RGB stems) XLA's own weight gradient is faster.
_enabled = os.environ.get("ECA_FLAX_CPU_KERNELS", "1") != "0"


def active() -> bool:
    """Whether models traced now use the CPU kernels (on CPU; other platforms never do)."""
    return _enabled


@contextlib.contextmanager
def switch(on: bool) -> Iterator[None]:
    """Use (or not) the CPU kernels for everything traced inside the block."""
    global _enabled
    before, _enabled = _enabled, bool(on)
    try:
        yield
    finally:
        _enabled = before


# --------------------------------------------------------------------------------------------
# Convolution.


def _lax_conv(x: Array, w: Array, strides: tuple[int, int], padding: Padding2D) -> Array:
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC)


def _strided(x: Array, strides: tuple[int, int]) -> Array:
    """x[:, ::sh, ::sw]: the pixels a stride-s 1x1 convolution reads."""
    return x if strides == (1, 1) else x[:, :: strides[0], :: strides[1]]


def _window(x: Array, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, int]) -> Array:
    """x[:, i + s*h, j + s*w, :] for every output pixel (h, w): what kernel tap (i, j) reads."""
    (ho, wo), (sh, sw) = out_hw, strides
    end = (x.shape[0], i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, x.shape[3])
    return jax.lax.slice(x, (0, i, j, 0), end, (1, sh, sw, 1))


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
def _conv(x: Array, w: Array, strides: tuple[int, int], padding: Padding2D) -> Array:
    """NHWC x HWIO convolution (groups 1, no dilation) as XLA:CPU runs fastest."""
    if w.shape[:2] == (1, 1) and padding == ((0, 0), (0, 0)):
        return jax.lax.dot_general(_strided(x, strides), w[0, 0], (((3,), (0,)), ((), ())))
    return _lax_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding):
    return _conv(x, w, strides, padding), (x, w)


def _conv_bwd(strides, padding, residuals, dy):
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


_conv.defvjp(_conv_fwd, _conv_bwd)


# At most this many output pixels, a kxk convolution is matrix products (_small_map_conv).
_SMALL_MAP = 4


def _output_hw(x: Array, w: Array, strides: tuple[int, int], padding: Padding2D) -> tuple:
    return tuple(
        (x.shape[d + 1] + sum(padding[d]) - w.shape[d]) // strides[d] + 1 for d in range(2)
    )


def _taps_by_pixel(x: Array, w: Array, strides: tuple[int, int], padding: Padding2D) -> list:
    """For each output pixel (h, w), row by row: the kernel taps (i, j) that read a real pixel,
    with that pixel's (row, column) in ``x`` (the others read padding: zeros)."""
    out_hw = _output_hw(x, w, strides, padding)
    taps = []
    for h in range(out_hw[0]):
        for q in range(out_hw[1]):
            at = [
                ((i, j), (h * strides[0] + i - padding[0][0], q * strides[1] + j - padding[1][0]))
                for i in range(w.shape[0])
                for j in range(w.shape[1])
            ]
            taps.append(
                [(t, p) for t, p in at if 0 <= p[0] < x.shape[1] and 0 <= p[1] < x.shape[2]]
            )
    return taps


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _small_map_conv(x: Array, w: Array, strides: tuple[int, int], padding: Padding2D) -> Array:
    """A kxk convolution with at most ``_SMALL_MAP`` output pixels as one matrix product per
    output pixel: the real pixels its taps read, side by side (N, taps*Cin), against those taps'
    weights (the multiply-adds of the convolution, no more). Its gradients come from one
    product over all taps (``_tap_product``). XLA:CPU's convolution kernels are 10-170x slower
    on such maps (ResNet's last stages on 16-64 px images: a 3x3 256->256 layer on a 2x2 map,
    gradients 88 ms against 5.6; benchmarks/small_maps.py, docs/benchmarks.md)."""
    ho, wo = _output_hw(x, w, strides, padding)
    pixels = []
    for taps in _taps_by_pixel(x, w, strides, padding):
        cols = jnp.concatenate([x[:, r, c] for _, (r, c) in taps], axis=-1)
        pixels.append(cols @ jnp.concatenate([w[i, j] for (i, j), _ in taps], axis=0))
    return jnp.stack(pixels, axis=1).reshape(x.shape[0], ho, wo, w.shape[-1])


def _tap_product(x: Array, w: Array, strides: tuple[int, int], padding: Padding2D) -> Array:
    """The same convolution as one product: the windows of the taps that read any real pixel,
    side by side (N, Ho, Wo, taps*Cin), against those taps' weights. It also multiplies the
    padding's zeros, but its gradients (two products) are the fastest found: as fast as the
    per-pixel products' on most layers, 2.3x faster on a strided 4x4 512->512 one."""
    out_hw = _output_hw(x, w, strides, padding)
    live = sorted({t for taps in _taps_by_pixel(x, w, strides, padding) for t, _ in taps})
    xp = jnp.pad(x, ((0, 0), *padding, (0, 0)))
    cols = jnp.concatenate([_window(xp, i, j, out_hw, strides) for i, j in live], axis=-1)
    weights = jnp.concatenate([w[i, j] for i, j in live], axis=0)
    return jax.lax.dot_general(cols, weights, (((3,), (0,)), ((), ())))


def _small_map_fwd(x, w, strides, padding):
    return _small_map_conv(x, w, strides, padding), (x, w)


def _small_map_bwd(strides, padding, residuals, dy):
    _, vjp = jax.vjp(lambda x_, w_: _tap_product(x_, w_, strides, padding), *residuals)
    return vjp(dy)  # XLA drops the unused forward product


_small_map_conv.defvjp(_small_map_fwd, _small_map_bwd)


def _depthwise(x: Array, w: Array, strides: tuple[int, int], padding: Padding2D) -> Array:
    """Depthwise convolution (kernel (kh, kw, 1, C)) as a sum of kh*kw shifted, scaled copies:
    one fused loop, forward and backward (autodiff of slices and products)."""
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
    """``lax.conv_general_dilated`` with the CPU formulations above; same signature and results.

    Given to ``nnx.Conv(conv_general_dilated=...)``. Only 2-D NHWC convolutions with explicit
    padding, no dilation, default precision and one group (or depthwise) take the CPU path, and
    only when compiled for CPU (``lax.platform_dependent``) with the switch on.
    """
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
    simple = (
        precision is None
        and preferred_element_type is None
        and not any(v is not None for v in kwargs.values())
    )
    if not (
        _enabled
        and simple
        and _takes_cpu_path(
            lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count
        )
    ):
        return lax_conv(lhs, rhs)
    strides = (int(window_strides[0]), int(window_strides[1]))
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    if feature_group_count != 1:
        cpu_conv = _depthwise
    elif rhs.shape[0] * rhs.shape[1] > 1 and np.prod(_output_hw(lhs, rhs, strides, pads)) <= (
        _SMALL_MAP
    ):
        cpu_conv = _small_map_conv
    else:
        cpu_conv = _conv
    return jax.lax.platform_dependent(
        lhs, rhs, cpu=lambda x, w: cpu_conv(x, w, strides, pads), default=lax_conv
    )


def _takes_cpu_path(
    lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers, groups
) -> bool:
    if lhs.ndim != 4 or isinstance(padding, str):
        return False
    depthwise = groups == lhs.shape[-1] == rhs.shape[-1] and rhs.shape[-2] == 1
    if groups != 1 and not depthwise:
        return False
    if any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
        return False
    nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    return jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == nhwc


# --------------------------------------------------------------------------------------------
# Max-pool.


def max_pool(x: Array, window: int, stride: int, pad: int) -> Array:
    """NHWC max-pool with ``pad`` pixels of -inf on each side (PyTorch's MaxPool2d).

    On CPU (switch on) the gradient goes, as in PyTorch, to the first maximum of each window in
    row-major order, computed with window**2 comparisons: XLA:CPU's select-and-scatter took 2.5x
    longer. Elsewhere it is ``lax.reduce_window`` and its own gradient.
    """
    pool = functools.partial(_reduce_window_max, window=window, stride=stride, pad=pad)
    if not _enabled:
        return pool(x)
    first_max = lambda x: _first_max_pool(x, window, stride, pad)
    return jax.lax.platform_dependent(x, cpu=first_max, default=pool)


def _reduce_window_max(x: Array, *, window: int, stride: int, pad: int) -> Array:
    return jax.lax.reduce_window(
        x,
        np.array(-np.inf, x.dtype),  # A concrete init value: differentiable max-pool.
        jax.lax.max,
        (1, window, window, 1),
        (1, stride, stride, 1),
        ((0, 0), (pad, pad), (pad, pad), (0, 0)),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _first_max_pool(x: Array, window: int, stride: int, pad: int) -> Array:
    return _reduce_window_max(x, window=window, stride=stride, pad=pad)


def _first_max_fwd(x, window, stride, pad):
    y = _reduce_window_max(x, window=window, stride=stride, pad=pad)
    return y, (x, y)


def _first_max_bwd(window, stride, pad, residuals, dy):
    x, y = residuals
    spatial = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    xp = jnp.pad(x, spatial, constant_values=-np.inf)
    taken = jnp.zeros(y.shape, bool)
    dxp = jnp.zeros(xp.shape, dy.dtype)
    for i in range(window):
        for j in range(window):
            # The window tap (i, j) reads, and its transpose: a strided scatter into xp's shape.
            tap, put_back = jax.vjp(
                lambda t, i=i, j=j: _window(t, i, j, y.shape[1:3], (stride, stride)), xp
            )
            first = (tap == y) & ~taken
            taken = taken | first
            dxp = dxp + put_back(jnp.where(first, dy, jnp.zeros((), dy.dtype)))[0]
    return (dxp[:, pad : xp.shape[1] - pad, pad : xp.shape[2] - pad],)


_first_max_pool.defvjp(_first_max_fwd, _first_max_bwd)
