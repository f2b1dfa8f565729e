"""v1's RPN head and RetinaNet head (facts file sections 5, 7) and the part of their test-time
selection that runs on the device: per level, the top ``nms_pre`` anchors of the padded image's
area by score (sigmoid), with their deltas. Decoding and NMS follow on the host (boxes.py)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.detection.layers import ConvModule, valid_mask
from eca_flax.models.layers import conv2d

Array = jax.Array
INVALID = -1.0  # score of anchors beyond the padded image (sigmoid scores are >= 0)


def top_anchors(scores: Array, deltas: Array, rank: Array, inside: Array, k: int):
    """The ``k`` anchors of highest ``rank`` inside the image: (index, scores, deltas, inside)."""
    rank = jnp.where(inside, rank, INVALID)
    k = min(k, rank.shape[0])
    _, index = jax.lax.top_k(rank, k)
    return index, scores[index], deltas[index], inside[index]


def _inside(shape: tuple[int, int], valid: Array, stride: int, anchors: int) -> Array:
    mask = valid_mask(shape, valid, stride)[0, :, :, 0] > 0
    return jnp.repeat(mask.reshape(-1), anchors)


class RPNHead(nnx.Module):
    """rpn_conv 3x3 + ReLU, rpn_cls 1x1 (A sigmoid scores), rpn_reg 1x1 (4A), on every level."""

    def __init__(self, channels: int = 256, anchors: int = 3, *, rngs: nnx.Rngs):
        self.anchors = anchors
        self.rpn_conv = conv2d(channels, channels, 3, bias=True, rngs=rngs)
        self.rpn_cls = conv2d(channels, anchors, 1, bias=True, rngs=rngs)
        self.rpn_reg = conv2d(channels, anchors * 4, 1, bias=True, rngs=rngs)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        """(cls logits (1, H, W, A), deltas (1, H, W, 4A)) of a masked level."""
        x = nnx.relu(self.rpn_conv(x))
        return self.rpn_cls(x), self.rpn_reg(x)

    def select(
        self, levels: Sequence[Array], strides: Sequence[int], valid: Array, nms_pre: int
    ) -> list[tuple[Array, ...]]:
        """Per level: the top ``nms_pre`` anchors by score (index, score, deltas, inside)."""
        out = []
        for x, stride in zip(levels, strides):
            shape = x.shape[1:3]
            logits, deltas = self(x * valid_mask(shape, valid, stride))
            scores = jax.nn.sigmoid(logits.reshape(-1))
            inside = _inside(shape, valid, stride, self.anchors)
            out.append(top_anchors(scores, deltas.reshape(-1, 4), scores, inside, nms_pre))
        return out


class RetinaHead(nnx.Module):
    """4 x (3x3 conv + ReLU) per branch, retina_cls (A x 80 sigmoid), retina_reg (A x 4)."""

    def __init__(self, channels: int = 256, anchors: int = 9, classes: int = 80, *, rngs: nnx.Rngs):
        self.anchors = anchors
        self.classes = classes
        self.cls_convs = nnx.List([ConvModule(channels, channels, 3, rngs=rngs) for _ in range(4)])
        self.reg_convs = nnx.List([ConvModule(channels, channels, 3, rngs=rngs) for _ in range(4)])
        self.retina_cls = conv2d(channels, anchors * classes, 3, bias=True, rngs=rngs)
        self.retina_reg = conv2d(channels, anchors * 4, 3, bias=True, rngs=rngs)

    def __call__(self, x: Array, mask: Array) -> tuple[Array, Array]:
        """(cls logits (1, H, W, A*80), deltas (1, H, W, 4A)); ``mask``: the level's area."""
        c = r = x * mask
        for cls_conv, reg_conv in zip(self.cls_convs, self.reg_convs):
            c = nnx.relu(cls_conv(c)) * mask
            r = nnx.relu(reg_conv(r)) * mask
        return self.retina_cls(c), self.retina_reg(r)

    def select(
        self, levels: Sequence[Array], strides: Sequence[int], valid: Array, nms_pre: int
    ) -> list[tuple[Array, ...]]:
        """Per level: the top ``nms_pre`` anchors by their highest class score, with all 80
        scores (index, scores (k, 80), deltas, inside)."""
        out = []
        for x, stride in zip(levels, strides):
            shape = x.shape[1:3]
            logits, deltas = self(x, valid_mask(shape, valid, stride))
            scores = jax.nn.sigmoid(logits.reshape(-1, self.classes))
            inside = _inside(shape, valid, stride, self.anchors)
            rank = jnp.max(scores, axis=1)
            out.append(top_anchors(scores, deltas.reshape(-1, 4), rank, inside, nms_pre))
        return out
