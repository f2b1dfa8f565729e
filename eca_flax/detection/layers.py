"""The detector's building blocks: mmdetection's ConvModule (a biased convolution kept under
``conv``), the 2x2 stride-2 transposed convolution, and the valid-area mask of the shape
buckets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.models.layers import conv2d, torch_default_init

Array = jax.Array


class ConvModule(nnx.Module):
    """mmdetection's ConvModule without norm: ``name.conv.weight`` / ``.bias``."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, rngs: nnx.Rngs):
        self.conv = conv2d(in_ch, out_ch, kernel, stride=stride, bias=True, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


class Upsample2x(nnx.Module):
    """ConvTranspose2d(in, out, kernel 2, stride 2): out[2i+a, 2j+b, o] = bias[o] +
    sum_c x[i, j, c] W[c, o, a, b]. The kernel is kept as (2, 2, out, in), which is what the
    converter's rank-4 rule makes of PyTorch's (in, out, 2, 2)."""

    def __init__(self, in_ch: int, out_ch: int, *, rngs: nnx.Rngs):
        init = torch_default_init(out_ch * 4)
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, out_ch, in_ch)))
        self.bias = nnx.Param(init(rngs.params(), (out_ch,)))

    def __call__(self, x: Array) -> Array:
        n, h, w, _ = x.shape
        y = jnp.einsum("nijc,aboc->niajbo", x, self.kernel[...])
        return y.reshape(n, 2 * h, 2 * w, -1) + self.bias[...]


def valid_mask(shape: tuple[int, int], valid: Array, stride: int) -> Array:
    """(1, H, W, 1) float32: 1 inside the padded image's area at ``stride``, 0 beyond.

    ``valid`` is the padded image's (height, width); a level covers ceil(valid / stride)."""
    h = (valid[0] + stride - 1) // stride
    w = (valid[1] + stride - 1) // stride
    rows = jnp.arange(shape[0])[:, None] < h
    cols = jnp.arange(shape[1])[None, :] < w
    return (rows & cols).astype(jnp.float32)[None, :, :, None]
