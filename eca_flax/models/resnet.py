"""ECA-ResNet: ResNet v1.5 (stride on the 3x3) with an ECA layer after each block's last BN.

The whole network is here: its blocks, the depth table (``LAYOUTS``), the stem and head, and
the options (``Design``) of timm's ECA-ResNets: deep / tiered stems, the avg-down shortcut,
grouped 3x3 convolutions (ResNeXt), per-block widths (the pruned models) and the attention's
attribute name. Attribute names follow the PyTorch state_dicts (``conv1``, ``bn1``,
``layer1[0].conv2``, ``layer1[0].eca.conv``, ``layer2[0].downsample[0]``, ``fc``); the SE
baseline keeps its layer in the same place as ``layer1[0].se.fc1`` / ``.fc2``; timm keeps ECA
under ``se`` (``layer1[0].se.conv``) and its stem in ``conv1[0..6]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.models.layers import (
    AvgDown,
    ReLU,
    Sequential,
    attention_attribute,
    attention_choice,
    batch_norm,
    check_count,
    check_float_dtype,
    check_images,
    conv2d,
    make_attention,
    max_pool_3x3_s2,
    torch_default_init,
)

Array = jax.Array
Dtype = Any
BlockWidths = tuple[int, int, int]  # a Bottleneck's conv1, conv2 and conv3 output channels
STEMS = {"deep": (32, 32), "tiered": (24, 32)}  # 3x3 stems' first two widths (then 64)


@dataclasses.dataclass(frozen=True)
class Design:
    """The ResNet options beyond depth and kernel sizes; the default is the original ECA-ResNet.

    ``stem``: "plain" (7x7/2 conv), "deep" (3x3 convs 32, 32, 64) or "tiered" (24, 32, 64).
    ``avg_down``: shortcuts AvgPool2d(2, stride, ceil_mode, count_include_pad=False) + 1x1 conv
    + BN (ResNet-D) instead of a strided 1x1 conv. ``groups`` / ``base_width``: the 3x3 conv's
    groups and width per group (ResNeXt 32x4d: 32, 4). ``widths``: per stage, per block the
    (conv1, conv2, conv3) output channels, for pruned networks (None: the regular widths).
    ``stem_width`` / ``stage_widths``: the stem's output channels and each stage's planes
    (64 and 64, 128, 256, 512 in every released model; smaller only in the test model).
    ``attention_name``: the attribute the attention layer lives in (None: "eca", or "se" for
    SE, as the original; timm: "se" for its ECA too).
    """

    stem: str = "plain"
    avg_down: bool = False
    groups: int = 1
    base_width: int = 64
    widths: tuple[tuple[BlockWidths, ...], ...] | None = None
    attention_name: str | None = None
    stem_width: int = 64
    stage_widths: tuple[int, int, int, int] = (64, 128, 256, 512)

    def __post_init__(self):
        if self.stem != "plain" and self.stem not in STEMS:
            raise ValueError(f"unknown stem {self.stem!r}; choices: plain, {', '.join(STEMS)}")


class _Block(nnx.Module):
    """What both blocks share: the attention layer after the last BN, then the residual add."""

    def _attach_attention(
        self, attention: str | None, channels: int, k_size: int, name: str | None, **kw
    ) -> None:
        """Keep the attention layer as ``self.eca`` (ECA, ECA-NS, none) or ``self.se`` (SE), or
        under ``name`` (timm's "se")."""
        self.attention_attr = name or attention_attribute(attention)
        setattr(self, self.attention_attr, make_attention(attention, channels, k_size, **kw))

    def _attend_and_add(self, out: Array, x: Array) -> Array:
        """attention(out) + shortcut(x), ReLU."""
        attention = getattr(self, self.attention_attr)
        if attention is not None:
            out = attention(out)
        shortcut = x if self.downsample is None else self.downsample(x)
        return nnx.relu(out + shortcut)


class BasicBlock(_Block):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN-ECA, + shortcut, ReLU (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        k_size: int,
        attention: str | None,
        design: Design = Design(),
        widths: BlockWidths | None = None,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        if design.groups != 1 or design.base_width != 64 or widths is not None:
            raise ValueError("BasicBlock supports only groups=1, base_width=64, regular widths")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = conv2d(inplanes, planes, 3, stride=stride, **kw)
        self.bn1 = batch_norm(planes, **kw)
        self.conv2 = conv2d(planes, planes, 3, **kw)
        self.bn2 = batch_norm(planes, **kw)
        self._attach_attention(attention, planes, k_size, design.attention_name, **kw)
        self.downsample = _downsample(inplanes, planes, stride, design.avg_down, **kw)

    def __call__(self, x: Array) -> Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self._attend_and_add(out, x)


class Bottleneck(_Block):
    """conv1x1-BN-ReLU-conv3x3(stride, groups)-BN-ReLU-conv1x1(x4)-BN-ECA, + shortcut, ReLU.

    The inner width is floor(planes * base_width / 64) * groups (ResNeXt), unless ``widths``
    gives all three convolutions' outputs (a pruned block).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int,
        k_size: int,
        attention: str | None,
        design: Design = Design(),
        widths: BlockWidths | None = None,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if widths is None:
            width = planes * design.base_width // 64 * design.groups
            widths = (width, width, planes * self.expansion)
        w1, w2, out_ch = widths
        self.conv1 = conv2d(inplanes, w1, 1, **kw)
        self.bn1 = batch_norm(w1, **kw)
        self.conv2 = conv2d(w1, w2, 3, stride=stride, groups=design.groups, **kw)
        self.bn2 = batch_norm(w2, **kw)
        self.conv3 = conv2d(w2, out_ch, 1, **kw)
        self.bn3 = batch_norm(out_ch, **kw)
        self._attach_attention(attention, out_ch, k_size, design.attention_name, **kw)
        self.downsample = _downsample(inplanes, out_ch, stride, design.avg_down, **kw)

    def __call__(self, x: Array) -> Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = nnx.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self._attend_and_add(out, x)


def _downsample(inplanes: int, out_ch: int, stride: int, avg_down: bool, **kw) -> Sequential | None:
    """Projection shortcut where the shape changes, else identity: conv1x1(stride)-BN, or with
    ``avg_down`` AvgPool(2, stride)-conv1x1-BN (``downsample[1]``, ``[2]`` as in timm)."""
    if stride == 1 and inplanes == out_ch:
        return None
    if avg_down:
        conv = conv2d(inplanes, out_ch, 1, **kw)
        return Sequential([AvgDown(stride), conv, batch_norm(out_ch, **kw)])
    return Sequential([conv2d(inplanes, out_ch, 1, stride=stride, **kw), batch_norm(out_ch, **kw)])


# Depth -> (block, blocks per stage): ECA-ResNet-18/34/50/101/152.
LAYOUTS: dict[int, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}
STAGE_WIDTHS = Design().stage_widths  # planes per stage (x block.expansion at each block's output)


def depth_of(block: type, layers: Sequence[int]) -> int | None:
    """The depth (18, ..., 152) whose layout is ``block`` with ``layers``, else None."""
    return next((d for d, lay in LAYOUTS.items() if lay == (block, tuple(layers))), None)


def _stem(stem: str, width: int, **kw) -> nnx.Conv | Sequential:
    """``conv1``: 7x7/2 3->width (plain), or conv3x3/2-BN-ReLU-conv3x3-BN-ReLU-conv3x3 to width
    (deep, tiered: timm's ``conv1.0`` ... ``conv1.6``)."""
    if stem == "plain":
        return conv2d(3, width, 7, stride=2, padding=3, **kw)
    c0, c1 = STEMS[stem]
    return Sequential([
        conv2d(3, c0, 3, stride=2, **kw), batch_norm(c0, **kw), ReLU(),
        conv2d(c0, c1, 3, **kw), batch_norm(c1, **kw), ReLU(),
        conv2d(c1, width, 3, **kw),
    ])  # fmt: skip


class ECAResNet(nnx.Module):
    """ECA-ResNet for NHWC images normalized with the ImageNet mean/std; returns float32 logits.

    ``k_size`` gives one ECA kernel size per stage; ``attention`` is "eca", "eca_ns", "se"
    (Squeeze-and-Excitation, reduction 16; ``k_size`` unused) or None. ``design`` selects the
    stem, shortcut, groups and widths (default: the original's); ``arch`` is the registry name
    the model is built as (``registry.arch_of``). ``num_classes=0`` builds a backbone without
    ``fc``: ``stage_features`` works, calling it for logits is a TypeError.
    Use ``model.eval()`` for inference (running BN statistics) and ``model.train()`` to train.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        k_size: Sequence[int],
        *,
        num_classes: int = 1000,
        attention: str | None = "eca",
        design: Design = Design(),
        arch: str | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(layers) != 4 or len(k_size) != 4:
            raise ValueError(f"need 4 stages and 4 kernel sizes, got {layers} and {k_size}")
        if design.widths is not None and tuple(map(len, design.widths)) != tuple(layers):
            raise ValueError(f"widths for {tuple(map(len, design.widths))} blocks, not {layers}")
        check_count("num_classes", num_classes, 0, " (0: a backbone without a classifier)")
        check_float_dtype("dtype", dtype)
        check_float_dtype("param_dtype", param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dtype = dtype
        self.k_size = tuple(int(k) for k in k_size)
        self.attention = attention_choice(attention)
        self.arch = arch
        # None for layouts other than the original five
        self.depth = depth_of(block, layers) if design == Design() else None
        self.conv1 = _stem(design.stem, design.stem_width, **kw)
        self.bn1 = batch_norm(design.stem_width, **kw)
        inplanes = design.stem_width
        for i, (planes, n, k) in enumerate(zip(design.stage_widths, layers, self.k_size)):
            stride = 1 if i == 0 else 2
            blocks = []
            for b in range(n):
                widths = None if design.widths is None else design.widths[i][b]
                s = stride if b == 0 else 1
                blocks.append(block(inplanes, planes, s, k, attention, design, widths, **kw))
                inplanes = widths[-1] if widths else planes * block.expansion
            setattr(self, f"layer{i + 1}", Sequential(blocks))
        self.num_features = inplanes
        # num_classes=0: a backbone without fc (stage_features only), e.g. from a detector
        self.fc = (
            nnx.Linear(
                inplanes,
                num_classes,
                kernel_init=torch_default_init(inplanes),
                bias_init=torch_default_init(inplanes),
                **kw,
            )
            if num_classes
            else None
        )

    def stem(self, x: Array) -> Array:
        """conv 7x7/2 (or the 3x3 stem) - BN - ReLU - max-pool 3x3/2: stride 4 output."""
        check_images(x)
        x = x.astype(self.dtype)
        return max_pool_3x3_s2(nnx.relu(self.bn1(self.conv1(x))))

    def stage_features(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """Outputs of layer1..layer4, at strides 4, 8, 16, 32 (a detection backbone's inputs)."""
        x = self.stem(x)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5

    def __call__(self, x: Array) -> Array:
        if self.fc is None:
            raise TypeError(
                "this ECA-ResNet is a backbone without a classifier (num_classes=0, e.g. "
                "converted from a detection checkpoint): use model.stage_features(x) for C2-C5, "
                "or load_pretrained(path, num_classes=N) for a new N-class head"
            )
        c5 = self.stage_features(x)[-1]
        pooled = jnp.mean(c5.astype(jnp.float32), axis=(1, 2))  # any input size works
        return self.fc(pooled.astype(self.dtype)).astype(jnp.float32)
