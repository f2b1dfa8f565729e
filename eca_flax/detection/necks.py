"""v1's FPN (facts file section 2): 1x1 laterals, nearest-neighbour top-down sums, 3x3 output
convs; P6 by max-pool (kernel 1, stride 2) of P5 for the R-CNNs, P6 / P7 by stride-2 3x3 convs
on C5 / P6 for RetinaNet. Attribute names follow v1's keys (``neck.lateral_convs.0.conv``)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.detection.layers import ConvModule, valid_mask

Array = jax.Array
WIDTHS = (256, 512, 1024, 2048)  # C2..C5 channels


def upsample2x(x: Array) -> Array:
    """Nearest-neighbour 2x upsampling (NHWC)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class FPN(nnx.Module):
    """``start_level`` 0 (P2..P5, P6 pooled) or 1 with ``extra_convs`` (P3..P7, RetinaNet)."""

    def __init__(self, start_level: int, extra_convs: bool, out: int = 256, *, rngs: nnx.Rngs):
        self.start_level = start_level
        self.extra_convs = extra_convs
        inputs = WIDTHS[start_level:]
        self.lateral_convs = nnx.List([ConvModule(c, out, 1, rngs=rngs) for c in inputs])
        convs = [ConvModule(out, out, 3, rngs=rngs) for _ in inputs]
        if extra_convs:
            convs.append(ConvModule(WIDTHS[-1], out, 3, stride=2, rngs=rngs))
            convs.append(ConvModule(out, out, 3, stride=2, rngs=rngs))
        self.fpn_convs = nnx.List(convs)

    def strides(self) -> tuple[int, ...]:
        """Each output level's stride: 4..64 or 8..128."""
        return tuple(2 ** (i + 2) for i in range(self.start_level, self.start_level + 5))

    def __call__(self, features: Sequence[Array], valid: Array) -> list[Array]:
        """P levels from C2..C5, exact on the padded image of size ``valid`` (3x3 convs see
        zeros beyond it)."""
        inputs = features[self.start_level :]
        strides = self.strides()
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + upsample2x(laterals[i])
        outs = []
        for i, lateral in enumerate(laterals):
            mask = valid_mask(lateral.shape[1:3], valid, strides[i])
            outs.append(self.fpn_convs[i](lateral * mask))
        if not self.extra_convs:
            outs.append(outs[-1][:, ::2, ::2])  # max-pool, kernel 1, stride 2
            return outs
        c5 = inputs[-1]
        p6 = self.fpn_convs[len(laterals)](c5 * valid_mask(c5.shape[1:3], valid, 32))
        p7 = self.fpn_convs[len(laterals) + 1](p6 * valid_mask(p6.shape[1:3], valid, strides[-2]))
        return outs + [p6, p7]
