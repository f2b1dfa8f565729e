"""ECA-MobileNetV2: the older torchvision MobileNetV2 with ECA in every inverted residual block.

Attribute names follow the original state_dict: ``features[0]`` (stem ConvBNReLU),
``features[i].conv[j]`` (inverted residual blocks), ``features[18]`` (last 1x1 ConvBNReLU),
``classifier[1]`` (the Linear after Dropout).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.models.layers import (
    Sequential,
    attention_choice,
    batch_norm,
    check_count,
    check_float_dtype,
    check_images,
    conv2d,
    make_attention,
    normal_init,
)

Array = jax.Array
Dtype = Any

# (t, c, n, s): expansion, output channels, repeats, stride of the first repeat.
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
NUM_BLOCKS = sum(n for _, _, n, _ in INVERTED_RESIDUAL_SETTING)  # 17 inverted residual blocks

# Indices into ``features`` whose outputs are at strides 4, 8, 16, 32 (24, 32, 96, 1280 ch).
STAGE_FEATURE_INDICES = (3, 6, 13, 18)


def release_block_kernel_sizes(small: int = 1, large: int = 3) -> tuple[int, ...]:
    """Per-block ECA kernel sizes of the released model: ``small`` where the table's c < 96."""
    return tuple(
        small if c < 96 else large for _, c, n, _ in INVERTED_RESIDUAL_SETTING for _ in range(n)
    )


def block_channels(width_mult: float = 1.0) -> tuple[int, ...]:
    """Output channels (the ECA width) of each of the 17 inverted residual blocks."""
    return tuple(int(c * width_mult) for _, c, n, _ in INVERTED_RESIDUAL_SETTING for _ in range(n))


class ConvBNReLU(Sequential):
    """conv(k, stride, padding (k-1)//2, groups) - BN - ReLU6; children [0] conv, [1] BN."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1, **kw
    ):
        super().__init__(
            [
                conv2d(in_ch, out_ch, kernel, stride=stride, groups=groups, **kw),
                batch_norm(out_ch, **kw),
            ]
        )

    def __call__(self, x: Array) -> Array:
        return jax.nn.relu6(super().__call__(x))


class InvertedResidual(nnx.Module):
    """[1x1 expand] - 3x3 depthwise(stride) - 1x1 project - BN - ECA, + x when shapes allow."""

    def __init__(
        self,
        inp: int,
        oup: int,
        stride: int,
        expand_ratio: int,
        k_size: int,
        attention: str | None,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[Any] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU(inp, hidden, kernel=1, **kw))
        layers += [
            ConvBNReLU(hidden, hidden, stride=stride, groups=hidden, **kw),
            conv2d(hidden, oup, 1, **kw),
            batch_norm(oup, **kw),
        ]
        eca = make_attention(attention, oup, k_size, **kw)
        if eca is not None:
            layers.append(eca)
        self.conv = Sequential(layers)

    def __call__(self, x: Array) -> Array:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class ECAMobileNetV2(nnx.Module):
    """ECA-MobileNetV2 for NHWC ImageNet-normalized images; returns float32 logits.

    ``k_size`` gives one ECA kernel size per inverted residual block (17 of them).
    Dropout(0.25) before the classifier is active only in ``model.train()`` mode.
    """

    def __init__(
        self,
        k_size: Sequence[int],
        *,
        num_classes: int = 1000,
        width_mult: float = 1.0,
        attention: str | None = "eca",
        dropout: float = 0.25,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(k_size) != NUM_BLOCKS:
            raise ValueError(f"need {NUM_BLOCKS} per-block kernel sizes, got {len(k_size)}")
        check_count("num_classes", num_classes, 1)
        check_float_dtype("dtype", dtype)
        check_float_dtype("param_dtype", param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.k_size = tuple(int(k) for k in k_size)
        self.attention = attention_choice(attention)
        self.width_mult = width_mult
        input_channel = int(32 * width_mult)
        last_channel = int(1280 * max(1.0, width_mult))
        features: list[Any] = [ConvBNReLU(3, input_channel, stride=2, **kw)]
        ks = iter(self.k_size)
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            output_channel = int(c * width_mult)
            for i in range(n):
                stride = s if i == 0 else 1
                features.append(
                    InvertedResidual(
                        input_channel, output_channel, stride, t, next(ks), attention, **kw
                    )
                )
                input_channel = output_channel
        features.append(ConvBNReLU(input_channel, last_channel, kernel=1, **kw))
        self.features = Sequential(features)
        self.num_features = last_channel
        self.classifier = Sequential(
            [
                nnx.Dropout(dropout, rngs=rngs),
                nnx.Linear(
                    last_channel,
                    num_classes,
                    kernel_init=normal_init(0.01),
                    bias_init=nnx.initializers.zeros,
                    **kw,
                ),
            ]
        )

    def stage_features(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """Outputs of features[3], [6], [13], [18]: strides 4, 8, 16, 32 (24, 32, 96, 1280 ch)."""
        check_images(x)
        x = x.astype(self.dtype)
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in STAGE_FEATURE_INDICES:
                outs.append(x)
        return tuple(outs)

    def __call__(self, x: Array) -> Array:
        x = self.stage_features(x)[-1]
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return self.classifier(pooled.astype(self.dtype)).astype(jnp.float32)
