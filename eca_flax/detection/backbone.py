"""ECA-ResNet's C2-C5 on a shape bucket: eca_flax's own ECAResNet (its modules and weights),
run so that the area beyond the padded image changes nothing: every 3x3 convolution sees zeros
there (as v1's convolution padding gives) and each ECA layer averages over the padded image
only. Strided layers never read beyond it (the padded sizes are multiples of 32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.detection.layers import valid_mask
from eca_flax.models.layers import max_pool_3x3_s2
from eca_flax.models.resnet import BasicBlock, ECAResNet

Array = jax.Array


def _attention(block, out: Array, mask: Array, count: Array) -> Array:
    attention = getattr(block, block.attention_attr)
    if attention is None:
        return out
    pooled = jnp.sum(out.astype(jnp.float32) * mask, axis=(1, 2)) / count
    return attention(out, pooled=pooled)


def _strided(block) -> bool:
    """Whether the block halves the resolution (the stride sits on conv2, or BasicBlock's conv1)."""
    first = block.conv1 if isinstance(block, BasicBlock) else block.conv2
    return first.strides == (2, 2)


def _block(block, x: Array, mask: Array, count: Array) -> tuple[Array, Array, Array]:
    """One block, its 3x3 inputs masked; (output, its mask, its pixel count)."""
    strided = _strided(block)
    out_mask, out_count = (mask[:, ::2, ::2], count / 4) if strided else (mask, count)
    if isinstance(block, BasicBlock):
        out = nnx.relu(block.bn1(block.conv1(x if strided else x * mask)))
        out = block.bn2(block.conv2(out * out_mask))
    else:
        out = nnx.relu(block.bn1(block.conv1(x)))
        out = nnx.relu(block.bn2(block.conv2(out if strided else out * mask)))
        out = block.bn3(block.conv3(out))
    out = _attention(block, out, out_mask, out_count)
    shortcut = x if block.downsample is None else block.downsample(x)
    return nnx.relu(out + shortcut), out_mask, out_count


def stage_features(net: ECAResNet, x: Array, valid: Array) -> tuple[Array, ...]:
    """C2..C5 of ``net`` on ``x`` (1, Hb, Wb, 3), exact for the padded image of size ``valid``
    (height, width) in its top-left corner, as if run on that image alone."""
    x = x.astype(net.dtype)
    x = nnx.relu(net.bn1(net.conv1(x)))  # the image is zero beyond valid: nothing to mask
    x = max_pool_3x3_s2(x)  # reads inside valid only (stride 2, even sizes)
    mask = valid_mask(x.shape[1:3], valid, 4)
    count = (valid[0] // 4 * (valid[1] // 4)).astype(jnp.float32)
    features = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        for block in layer:
            x, mask, count = _block(block, x, mask, count)
        features.append(x)
    return tuple(features)
