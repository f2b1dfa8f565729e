"""v1's RoI heads (facts file sections 8, 9): the shared-2FC box head and the FCN mask head.
Background is class 0 in fc_cls, fc_reg and conv_logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.detection.layers import ConvModule, Upsample2x
from eca_flax.models.layers import conv2d, torch_default_init

Array = jax.Array


def linear(inp: int, out: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """nn.Linear with PyTorch's default init."""
    init = torch_default_init(inp)
    return nnx.Linear(inp, out, kernel_init=init, bias_init=init, rngs=rngs)


class BBoxHead(nnx.Module):
    """SharedFCBBoxHead (2 fcs): flatten C x 7 x 7 -> fc 1024 + ReLU -> fc 1024 + ReLU ->
    fc_cls (81) and fc_reg (81 x 4, class-specific)."""

    def __init__(self, channels: int = 256, classes: int = 81, *, rngs: nnx.Rngs):
        self.shared_fcs = nnx.List(
            [linear(channels * 49, 1024, rngs=rngs), linear(1024, 1024, rngs=rngs)]
        )
        self.fc_cls = linear(1024, classes, rngs=rngs)
        self.fc_reg = linear(1024, classes * 4, rngs=rngs)

    def __call__(self, rois: Array) -> tuple[Array, Array]:
        """(softmax scores (R, 81), deltas (R, 324)) of RoI features (R, 7, 7, C)."""
        x = jnp.transpose(rois, (0, 3, 1, 2)).reshape(rois.shape[0], -1)  # c*49 + y*7 + x
        for fc in self.shared_fcs:
            x = nnx.relu(fc(x))
        return jax.nn.softmax(self.fc_cls(x), axis=-1), self.fc_reg(x)


class MaskHead(nnx.Module):
    """FCNMaskHead: 4 x (3x3 conv + ReLU) -> 2x2 stride-2 transposed conv + ReLU -> 1x1 conv to
    81 channels (sigmoid), 28 x 28 per class."""

    def __init__(self, channels: int = 256, classes: int = 81, *, rngs: nnx.Rngs):
        self.convs = nnx.List([ConvModule(channels, channels, 3, rngs=rngs) for _ in range(4)])
        self.upsample = Upsample2x(channels, channels, rngs=rngs)
        self.conv_logits = conv2d(channels, classes, 1, bias=True, rngs=rngs)

    def __call__(self, rois: Array, labels: Array) -> Array:
        """(R, 28, 28) probabilities of each RoI's class (``labels`` 0..79, channel label + 1)."""
        x = rois
        for c in self.convs:
            x = nnx.relu(c(x))
        logits = self.conv_logits(nnx.relu(self.upsample(x)))
        picked = jnp.take_along_axis(logits, (labels + 1)[:, None, None, None], axis=-1)
        return jax.nn.sigmoid(picked[..., 0])
