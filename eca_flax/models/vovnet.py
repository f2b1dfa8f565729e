"""ECA-VoVNet (timm's eca_vovnet39b): VoVNet-39 with One-Shot Aggregation blocks, ECA after the
concatenating 1x1 conv of each stage's last block, and the "b" residual.

Attribute names follow timm's state_dict (``stem.0.conv``, ``stages.1.blocks.0.conv_mid.3.bn``,
``stages.1.blocks.0.conv_concat``, ``stages.1.blocks.0.attn.conv``, ``head.fc``), so
``convert.torch_key_to_path`` maps every key without a table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.models.layers import (
    ConvNormAct,
    Head,
    Sequential,
    attention_choice,
    max_pool_ceil,
    timm_eca,
)

Array = jax.Array
Dtype = Any

# eca_vovnet39b: per stage (conv chs, out chs, blocks); 5 layers per OSA block; stem 64, 64, 128.
STAGES = ((128, 256, 1), (160, 512, 1), (192, 768, 2), (224, 1024, 2))
LAYERS_PER_BLOCK = 5
STEM = (64, 64, 128)


class OsaBlock(nnx.Module):
    """One-Shot Aggregation: five chained 3x3 CNA layers, the input and all five outputs
    concatenated (input first), a 1x1 CNA to ``out_ch``, ECA (``attn``, the stage's last block
    only), then + input for blocks after the first (``residual``); no activation after the add."""

    def __init__(
        self,
        in_ch: int,
        mid_ch: int,
        out_ch: int,
        *,
        residual: bool,
        attention: str | None,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        chs = [in_ch] + [mid_ch] * LAYERS_PER_BLOCK
        self.conv_mid = Sequential([ConvNormAct(c, mid_ch, 3, **kw) for c in chs[:-1]])
        self.conv_concat = ConvNormAct(in_ch + LAYERS_PER_BLOCK * mid_ch, out_ch, 1, **kw)
        self.attn = timm_eca(out_ch, attention, **kw)
        self.residual = residual

    def __call__(self, x: Array) -> Array:
        outs = [x]
        for layer in self.conv_mid:
            outs.append(layer(outs[-1]))
        y = self.conv_concat(jnp.concatenate(outs, axis=-1))
        if self.attn is not None:
            y = self.attn(y)
        return y + x if self.residual else y


def _stage_pool_inputs(side: int) -> list[int]:
    """The side of the map each stage max-pool (stages 1-3) receives from an input ``side``:
    the stem's two 3x3 stride-2 convs (pad 1), then each 3x3/2 ceil-mode pool."""
    n = (side - 1) // 2 + 1
    n = (n - 1) // 2 + 1
    sides = []
    for _ in range(3):
        sides.append(n)
        n = -(-(n - 3) // 2) + 1
    return sides


MIN_INPUT_SIZE = next(s for s in range(1, 64) if min(_stage_pool_inputs(s)) >= 2)  # 29


def check_input_size(name: str, height: int, width: int) -> None:
    """ValueError in one line when a side is under ``MIN_INPUT_SIZE``: a stage's max-pool
    would get a 1-pixel map (PyTorch's MaxPool2d(3, 2, ceil_mode=True): "Output size is too
    small"; here an empty map, NaN losses)."""
    if min(height, width) < MIN_INPUT_SIZE:
        raise ValueError(
            f"{name} needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} (its stage "
            f"max-pools, 3x3 stride 2, need maps of 2 pixels or more); got {height}x{width}"
        )


class OsaStage(nnx.Module):
    """MaxPool 3x3/2 ceil-mode (stages 1-3), then the stage's OSA ``blocks``."""

    def __init__(self, blocks: list[OsaBlock], downsample: bool):
        self.downsample = downsample
        self.blocks = Sequential(blocks)

    def __call__(self, x: Array) -> Array:
        return self.blocks(max_pool_ceil(x) if self.downsample else x)


class VoVNet(nnx.Module):
    """ECA-VoVNet-39b for NHWC images (ImageNet mean/std); float32 logits; inputs of 29 px or
    more (``check_input_size``).

    ``attention`` is "eca" (timm's), "eca_ns" or None (no attention layers); ``stages``: per
    stage (conv chs, out chs, blocks), eca_vovnet39b's by default (another: e.g. tests).
    ``num_classes=0`` builds a backbone without ``head`` (``stage_features`` only).
    """

    def __init__(
        self,
        *,
        arch: str = "eca_vovnet39b",
        num_classes: int = 1000,
        attention: str | None = "eca",
        stages: tuple[tuple[int, int, int], ...] = STAGES,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.arch, self.dtype, self.k_size = arch, dtype, ()
        self.attention = attention_choice(attention)
        c0, c1, c2 = STEM
        self.stem = Sequential([
            ConvNormAct(3, c0, 3, stride=2, **kw),
            ConvNormAct(c0, c1, 3, **kw),
            ConvNormAct(c1, c2, 3, stride=2, **kw),
        ])  # fmt: skip
        built, in_ch = [], c2
        for i, (mid, out, n) in enumerate(stages):
            blocks = []
            for b in range(n):
                last = b == n - 1
                blocks.append(
                    OsaBlock(
                        in_ch, mid, out, residual=b > 0, attention=attention if last else None, **kw
                    )
                )
                in_ch = out
            built.append(OsaStage(blocks, downsample=i > 0))
        self.stages = Sequential(built)
        self.num_features = in_ch
        self.head = Head(in_ch, num_classes, **kw) if num_classes else None

    @staticmethod
    def depths(name: str) -> tuple[int, ...]:
        """OSA blocks per stage of ``name`` (what a state_dict's keys are matched against)."""
        return tuple(n for _, _, n in STAGES)

    def stage_features(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """The four stages' outputs, at strides 4, 8, 16, 32 (256, 512, 768, 1024 channels)."""
        check_input_size(self.arch, x.shape[1], x.shape[2])
        x = self.stem(x.astype(self.dtype))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return tuple(features)

    def __call__(self, x: Array) -> Array:
        if self.head is None:
            raise TypeError("a backbone without a classifier (num_classes=0): use stage_features")
        return self.head(self.stage_features(x)[-1])
