"""timm's normalization-free ECA networks: eca_nfnet_l0..l3 and nf_ecaresnet26/50/101.

No BatchNorm anywhere: every conv is weight-standardized (``StdConv``: per output channel, the
raw weight minus its mean over the standard deviation (population, eps 1e-5), times a learned
``gain``, the activation's NF gamma and fan_in^-1/2), with a bias. Pre-activation bottlenecks
scale their input by beta = 1 / sqrt(expected variance), add alpha (0.2) times the branch, and
apply ECA with a gain of 2 after the last conv. There are no batch statistics: the model's
state is its parameters alone. Attribute names follow timm's state_dict (``stem.conv1``,
``stages.2.0.downsample.conv``, ``stages.2.0.conv2b``, ``stages.2.0.attn_last.conv``,
``final_conv``, ``head.fc``); ``gain`` is stored (1, 1, 1, O), as the converter's rank rule
gives timm's (O, 1, 1, 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.models import cpu_kernels
from eca_flax.models.layers import (
    ACTIVATIONS,
    AvgDown,
    Head,
    Sequential,
    attention_choice,
    kaiming_normal_init,
    max_pool_3x3_s2,
    normal_init,
    timm_eca,
)

Array = jax.Array
Dtype = Any
STD_CONV_EPS = 1e-5  # NfCfg.std_conv_eps of these models (the class default 1e-6 is not used)
NF_GAMMA = {"silu": 1.7881293296813965, "relu": 1.7139588594436646}  # activations' NF gammas
ALPHA = 0.2  # residual branch scale
ATTN_GAIN = 2.0  # the ECA output's gain


@dataclasses.dataclass(frozen=True)
class NfDesign:
    """One model: blocks per stage, output widths, 3x3 group size (0: no groups), the stem
    ("quad": four 3x3 convs; "7x7": conv + max-pool), a second 3x3 (``conv2b``), the final
    1x1 conv's width (0: none) and the activation."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    group_size: int
    stem: str
    conv2b: bool
    final_chs: int
    act: str


def _l(depths: tuple[int, ...], final: int) -> NfDesign:
    return NfDesign(depths, (256, 512, 1536, 1536), 64, "quad", True, final, "silu")


def _r(depths: tuple[int, ...]) -> NfDesign:
    return NfDesign(depths, (256, 512, 1024, 2048), 0, "7x7", False, 0, "relu")


DESIGNS = {
    "eca_nfnet_l0": _l((1, 2, 6, 3), 2304),
    "eca_nfnet_l1": _l((2, 4, 12, 6), 3072),
    "eca_nfnet_l2": _l((3, 6, 18, 9), 3072),
    "eca_nfnet_l3": _l((4, 8, 24, 12), 3072),
    "nf_ecaresnet26": _r((2, 2, 2, 2)),
    "nf_ecaresnet50": _r((3, 4, 6, 3)),
    "nf_ecaresnet101": _r((3, 4, 23, 3)),
}


class StdConv(nnx.Module):
    """timm's ScaledStdConv2d: conv(x, gain * gamma * (W - mean) / sqrt(var + eps) / sqrt(N)) + b,
    mean and (population) variance over each output channel's N = (C_in / groups) * kh * kw
    weights, recomputed from the raw ``kernel`` every call (float32)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int,
        *,
        stride: int = 1,
        groups: int = 1,
        gamma: float,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        init = kaiming_normal_init(1.0, "fan_in")  # kaiming, linear
        shape = (kernel, kernel, cin // groups, cout)
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype))
        self.gain = nnx.Param(jnp.ones((1, 1, 1, cout), param_dtype))
        self.stride, self.groups, self.gamma, self.dtype = stride, groups, gamma, dtype
        self.pad = ((stride - 1) + (kernel - 1)) // 2

    def standardized(self) -> Array:
        """The weight the conv applies (HWIO, float32)."""
        w = self.kernel[...].astype(jnp.float32)
        fan_in = w.shape[0] * w.shape[1] * w.shape[2]
        mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
        var = jnp.mean(jnp.square(w - mean), axis=(0, 1, 2), keepdims=True)
        scale = self.gain[...].astype(jnp.float32) * (self.gamma * fan_in**-0.5)
        return (w - mean) * jax.lax.rsqrt(var + STD_CONV_EPS) * scale

    def __call__(self, x: Array) -> Array:
        p = self.pad
        y = cpu_kernels.conv_general_dilated(
            x.astype(self.dtype),
            self.standardized().astype(self.dtype),
            (self.stride, self.stride),
            ((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        # The bias added in float32: its gradient, a sum over (B, H, W), then is one too.
        return (y.astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


class Downsample(nnx.Module):
    """AvgPool 2x2 (ceil, count_include_pad False; stride 2 only) then a 1x1 ``conv``."""

    def __init__(self, cin: int, cout: int, stride: int, **kw):
        self.pool = AvgDown(stride)
        self.conv = StdConv(cin, cout, 1, **kw)

    def __call__(self, x: Array) -> Array:
        return self.conv(self.pool(x))


class NormFreeBlock(nnx.Module):
    """a = beta * act(x); shortcut = downsample(a) or x; h = conv1(a); h = conv2(act(h))
    (stride, groups); [h = conv2b(act(h))]; h = conv3(act(h)); y = alpha * 2 * ECA(h) + shortcut.
    """

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        beta: float,
        design: NfDesign,
        attention: str | None,
        *,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(gamma=NF_GAMMA[design.act], dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        mid = cout // 4
        groups = mid // design.group_size if design.group_size else 1
        self.beta, self.act = beta, design.act
        need = stride > 1 or cin != cout
        self.downsample = Downsample(cin, cout, stride, **kw) if need else None
        self.conv1 = StdConv(cin, mid, 1, **kw)
        self.conv2 = StdConv(mid, mid, 3, stride=stride, groups=groups, **kw)
        self.conv2b = StdConv(mid, mid, 3, groups=groups, **kw) if design.conv2b else None
        self.conv3 = StdConv(mid, cout, 1, **kw)
        self.conv3.gain.set_value(jnp.zeros_like(self.conv3.gain[...]))  # timm's init: gain 0
        self.attn_last = timm_eca(cout, attention, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.act]
        a = act(x) * self.beta
        shortcut = x if self.downsample is None else self.downsample(a)
        h = self.conv2(act(self.conv1(a)))
        if self.conv2b is not None:
            h = self.conv2b(act(h))
        h = self.conv3(act(h))
        if self.attn_last is not None:
            h = self.attn_last(h) * ATTN_GAIN
        return h * ALPHA + shortcut


class QuadStem(nnx.Module):
    """conv1 3x3/2 3->16, act, conv2 16->32, act, conv3 32->64, act, conv4 3x3/2 64->128."""

    def __init__(self, act: str, **kw):
        self.act = act
        self.conv1 = StdConv(3, 16, 3, stride=2, **kw)
        self.conv2 = StdConv(16, 32, 3, **kw)
        self.conv3 = StdConv(32, 64, 3, **kw)
        self.conv4 = StdConv(64, 128, 3, stride=2, **kw)

    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.act]
        x = act(self.conv1(x))
        x = act(self.conv2(x))
        x = act(self.conv3(x))
        return self.conv4(x)


class ResStem(nnx.Module):
    """conv 7x7/2 3->64, then MaxPool 3x3/2 pad 1 (no activation between)."""

    def __init__(self, **kw):
        self.conv = StdConv(3, 64, 7, stride=2, **kw)

    def __call__(self, x: Array) -> Array:
        return max_pool_3x3_s2(self.conv(x))


def betas(depths: tuple[int, ...]) -> list[list[float]]:
    """Each block's beta: 1 / sqrt(1 + alpha^2 * j) for block j >= 1; block 0 of stage s >= 1
    continues from the end of the previous stage (j = its depth); block 0 of stage 0: 1."""
    out, previous = [], 0
    for d in depths:
        out.append([(1 + ALPHA**2 * (j if j else previous)) ** -0.5 for j in range(d)])
        previous = d
    return out


class NormFreeNet(nnx.Module):
    """One of timm's NF ECA networks (``DESIGNS``) for NHWC images; float32 logits; any size.

    ``attention``: "eca" (timm's), "eca_ns" or None; ``design`` replaces ``arch``'s (a smaller
    network of the same blocks, say). ``num_classes=0`` builds a backbone
    without ``head`` (``stage_features`` only). No BatchNorm: no batch statistics.
    """

    def __init__(
        self,
        *,
        arch: str,
        num_classes: int = 1000,
        attention: str | None = "eca",
        design: NfDesign | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        design = DESIGNS[arch] if design is None else design  # another design: e.g. tests
        self.arch, self.dtype, self.k_size, self.act = arch, dtype, (), design.act
        self.attention = attention_choice(attention)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        gamma = NF_GAMMA[design.act]
        if design.stem == "quad":
            self.stem = QuadStem(design.act, gamma=gamma, **kw)
            cin = 128
        else:
            self.stem = ResStem(gamma=gamma, **kw)
            cin = 64
        stages = []
        for s, (n, cout, bs) in enumerate(zip(design.depths, design.widths, betas(design.depths))):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(NormFreeBlock(cin, cout, stride, bs[b], design, attention, **kw))
                cin = cout
            stages.append(Sequential(blocks))
        self.stages = Sequential(stages)
        final = design.final_chs
        self.final_conv = StdConv(cin, final, 1, gamma=gamma, **kw) if final else None
        self.num_features = final or cin
        fc_init = normal_init(0.01)
        self.head = (
            Head(self.num_features, num_classes, fc_init=fc_init, **kw) if num_classes else None
        )

    @staticmethod
    def depths(name: str) -> tuple[int, ...]:
        """Blocks per stage of ``name`` (what a state_dict's keys are matched against)."""
        return DESIGNS[name].depths

    def stage_features(self, x: Array) -> tuple[Array, Array, Array, Array]:
        """The four stages' outputs at strides 4, 8, 16, 32; the last after ``final_conv`` (if
        any) and the activation, as the head sees it."""
        x = self.stem(x.astype(self.dtype))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        if self.final_conv is not None:
            features[-1] = self.final_conv(features[-1])
        features[-1] = ACTIVATIONS[self.act](features[-1])
        return tuple(features)

    def __call__(self, x: Array) -> Array:
        if self.head is None:
            raise TypeError("a backbone without a classifier (num_classes=0): use stage_features")
        return self.head(self.stage_features(x)[-1])
