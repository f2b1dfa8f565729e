"""The ECA layer, the attention choices, and the PyTorch layers the networks are built from.

Everything reproduces the PyTorch original exactly: explicit symmetric padding (never 'SAME'),
BatchNorm with PyTorch's epsilon and momentum, max-pool padding that acts as -inf, and
PyTorch's default initialisers where the original keeps them. Convolutions and the max-pool
run through ``eca_flax.models.cpu_kernels`` (faster formulations on XLA:CPU, lax elsewhere).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eca_flax.models import cpu_kernels

Array = jax.Array
Dtype = Any

# PyTorch BatchNorm2d defaults: eps=1e-5, momentum=0.1 (Flax counts momentum the other way).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9

# Initial weights are sampled eagerly, one program per weight shape and distribution. On CPU
# those compile at XLA's optimisation level 2: the same values as at its default level 3 (the
# samplers are elementwise; tests/test_models.py checks the initialisers against Flax's) for
# less compiling: normal, uniform and truncated normal samplers for 7 ResNet-50 weight shapes
# 10.3 -> 4.6 CPU-s; creating ECA-ResNet-50, ecaresnet26t, ECA-MobileNetV2 and eca_nfnet_l0 in a
# fresh process 31.4 -> 27.2 CPU-s. A process that chose its own level in XLA_FLAGS (lower, to
# compile faster) keeps it.
SAMPLER_OPTIONS = {"xla_backend_optimization_level": 2}


@functools.cache
def _sampler(name: str, shape: tuple[int, ...], dtype: Any, options: bool) -> Callable[..., Array]:
    fn = getattr(jax.random, name)
    if name == "truncated_normal":  # (key, lower, upper, shape, dtype)
        sample = lambda key, *bounds: fn(key, *bounds, shape, dtype)
    else:  # normal (key, shape, dtype), uniform (key, shape, dtype, minval, maxval)
        sample = lambda key, *bounds: fn(key, shape, dtype, *bounds)
    return jax.jit(sample, compiler_options=SAMPLER_OPTIONS if options else None)


def sample(name: str, key: Array, shape: Sequence[int], dtype: Dtype, *bounds: float) -> Array:
    """``jax.random.<name>`` (normal, uniform, truncated_normal) with the same values, through
    a sampler compiled for this shape (``SAMPLER_OPTIONS`` on CPU); ``bounds`` are passed as
    arguments, as jax.random passes them, never folded into the program. Inside a transform
    (eval_shape, jit: the key is a tracer) the sampler is a plain nested jit."""
    options = (
        jax.default_backend() == "cpu"
        and not isinstance(key, jax.core.Tracer)
        and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")
    )
    return _sampler(name, tuple(shape), jnp.dtype(dtype), options)(key, *bounds)


def normal_init(stddev: float) -> Callable[..., Array]:
    """N(0, stddev^2): Flax's ``initializers.normal(stddev)``, its values too."""

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        return sample("normal", key, shape, dtype) * jnp.array(stddev, dtype)

    return init


def truncated_normal_init(stddev: float) -> Callable[..., Array]:
    """stddev times a normal truncated to [-2, 2]: Flax's ``initializers.truncated_normal``."""

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        return sample("truncated_normal", key, shape, dtype, -2.0, 2.0) * jnp.array(stddev, dtype)

    return init


def kaiming_normal_init(scale: float, mode: str) -> Callable[..., Array]:
    """N(0, scale / fan) with fan = receptive field x (in or out) channels of an (..., in, out)
    kernel: Flax's ``initializers.variance_scaling(scale, mode, "normal")``, its values too."""

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        receptive = math.prod(shape) / shape[-2] / shape[-1]
        fan = receptive * shape[-2 if mode == "fan_in" else -1]
        variance = jnp.array(scale / fan, dtype)
        return sample("normal", key, shape, dtype) * jnp.sqrt(variance)

    return init


# Kaiming-normal with fan_out, untruncated: the original's normal_(0, sqrt(2 / (kh * kw * out))).
conv_kernel_init = kaiming_normal_init(2.0, "fan_out")


def torch_default_init(fan_in: int) -> Callable[..., Array]:
    """PyTorch's default Conv/Linear init: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        return sample("uniform", key, shape, dtype, -bound, bound)

    return init


class Sequential(nnx.List):
    """An indexable sequence of layers applied in order, like ``torch.nn.Sequential``.

    Its children live at integer paths (``downsample[0]``, ``features[3].conv[1]``), so a
    PyTorch state_dict key maps to a Flax path by splitting on dots.
    """

    def __call__(self, x: Array) -> Array:
        for layer in self:
            x = layer(x)
        return x


def conv2d(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    groups: int = 1,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    bias: bool = False,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A 2-D convolution with explicit symmetric padding (default (k-1)//2): bias-free with
    the ResNets' Kaiming init, or (``bias=True``, the detectors' necks and heads) with a bias
    and PyTorch's default init of both."""
    p = (kernel - 1) // 2 if padding is None else padding
    init = torch_default_init(in_ch // groups * kernel * kernel) if bias else None
    return nnx.Conv(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((p, p), (p, p)),
        feature_group_count=groups,
        use_bias=bias,
        kernel_init=init or conv_kernel_init,
        bias_init=init or nnx.initializers.zeros_init(),
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=cpu_kernels.conv_general_dilated,
        rngs=rngs,
    )


def batch_norm(
    features: int, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
) -> nnx.BatchNorm:
    """BatchNorm with PyTorch's epsilon 1e-5 and momentum 0.1 (Flax momentum 0.9)."""
    return nnx.BatchNorm(
        features,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def max_pool_3x3_s2(x: Array) -> Array:
    """3x3 stride-2 max-pool with one pixel of -inf padding on each side (MaxPool2d(3, 2, 1))."""
    return cpu_kernels.max_pool(x, window=3, stride=2, pad=1)


# --------------------------------------------------------------------------------------------
# Efficient Channel Attention.


def adaptive_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """The paper's adaptive ECA kernel size k = |log2(C)/gamma + b/gamma|_odd (eq. 12).

    As in the authors' code: t = int(|(log2 C + b) / gamma|), then k = t if t is odd else t + 1.
    ResNet-50's block widths 256, 512, 1024, 2048 give 5, 5, 5, 7.
    """
    if channels < 1:
        raise ValueError(f"channels must be positive, got {channels}")
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nnx.Module):
    """Efficient Channel Attention: x * sigmoid(conv1d_k(mean_hw(x))) across channels.

    ``shared=True`` is the paper's ECA: one k-tap filter slid over the channel axis
    (PyTorch Conv1d(1, 1, k, padding=(k-1)//2, bias=False), kernel (k, 1, 1) here).
    ``shared=False`` is the ECA-NS ablation: channel c has its own k taps over its k
    neighbours (PyTorch Conv1d(C, C, k, groups=C), kernel (k, 1, C) here).

    The attribute is named ``conv`` after the PyTorch ``eca.conv.weight``. The filter is applied
    as a sum of k shifted copies of the pooled vector: a cross-correlation exactly as PyTorch's,
    and far cheaper than a convolution primitive over a length-C, one-feature sequence.
    """

    def __init__(
        self,
        channels: int,
        k_size: int,
        *,
        shared: bool = True,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if k_size < 1 or k_size % 2 == 0:
            raise ValueError(f"ECA kernel size must be a positive odd number, got {k_size}")
        self.k_size = k_size
        self.channels = channels
        self.shared = shared
        groups = 1 if shared else channels
        p = (k_size - 1) // 2
        self.conv = nnx.Conv(
            groups,
            groups,
            (k_size,),
            padding=((p, p),),
            feature_group_count=groups,
            use_bias=False,
            kernel_init=torch_default_init(k_size),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array, pooled: Array | None = None) -> Array:
        """``pooled``: the (B, C) float32 mean over H, W when the caller computed it (a
        detector's masked mean over the image's area); by default the mean of ``x``."""
        k, p = self.k_size, (self.k_size - 1) // 2
        # Pool and gate in float32: a mean over H*W and a sigmoid are cheap and precision-sensitive.
        y = jnp.mean(x.astype(jnp.float32), axis=(1, 2)) if pooled is None else pooled  # (B, C)
        w = self.conv.kernel[...].astype(jnp.float32)[:, 0, :]  # (k, 1) shared or (k, C) non-shared
        ypad = jnp.pad(y, ((0, 0), (p, p)))
        c = y.shape[-1]
        z = sum(w[j] * ypad[:, j : j + c] for j in range(k))
        gate = jax.nn.sigmoid(z).astype(x.dtype)
        return x * gate[:, None, None, :]


class SE(nnx.Module):
    """Squeeze-and-Excitation (Hu et al.), the paper's baseline: x * sigmoid(fc2(relu(fc1(gap)))).

    fc1: C -> C // reduction and fc2: C // reduction -> C, both Linear with bias, PyTorch's
    default init (keys ``se.fc1.weight/bias``, ``se.fc2.weight/bias``). Reduction 16 gives
    SE-ResNet-50's 28,088,024 parameters (the paper's 28.09M).
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f"SE needs channels >= reduction, got {channels} and {reduction}")
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = nnx.Linear(
            channels,
            hidden,
            kernel_init=torch_default_init(channels),
            bias_init=torch_default_init(channels),
            **kw,
        )
        self.fc2 = nnx.Linear(
            hidden,
            channels,
            kernel_init=torch_default_init(hidden),
            bias_init=torch_default_init(hidden),
            **kw,
        )

    def __call__(self, x: Array) -> Array:
        # Pool and gate in float32 as ECA does; the fc layers compute in the model's dtype.
        y = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # (B, C)
        gate = jax.nn.sigmoid(self.fc2(nnx.relu(self.fc1(y))).astype(jnp.float32))
        return x * gate.astype(x.dtype)[:, None, None, :]


# --------------------------------------------------------------------------------------------
# Argument checks: a misuse is a TypeError / ValueError naming the argument and what it takes,
# raised before JAX sees the value (whose errors name neither).


def check_count(name: str, value: Any, minimum: int, note: str = "") -> int:
    """``value`` as an int >= ``minimum``: TypeError for a bool, float or anything else."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int >= {minimum}{note}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{note}, got {value!r}")
    return int(value)


def check_float_dtype(name: str, dtype: Any) -> None:
    """TypeError unless ``dtype`` is a floating-point dtype (jnp.float32, jnp.bfloat16, ...)."""
    try:
        floating = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
    except TypeError:
        floating = False
    if not floating:
        raise TypeError(
            f"{name} must be a floating-point dtype such as jnp.float32 or jnp.bfloat16, "
            f"got {dtype!r}"
        )


def check_images(x: Any) -> None:
    """TypeError / ValueError naming the input unless it is an array (numpy, jax, a tracer) of
    NHWC RGB images, (N, H, W, 3): the networks' convolutions and pools take nothing else."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(
            f"the input must be an array of images (N, H, W, 3), NHWC, such as a jax or numpy "
            f"array; got a {type(x).__name__} (np.asarray(x) makes one)"
        )
    shape = tuple(x.shape)
    if len(shape) == 4 and shape[-1] == 3:
        return
    if len(shape) == 4 and shape[1] == 3:
        hint = ": NCHW? x.transpose(0, 2, 3, 1) makes it NHWC"
    elif len(shape) == 4:
        hint = f": {shape[-1]} channels, the networks take RGB (3)"
    elif len(shape) == 3:
        hint = ": one image? x[None] makes a batch of one"
    else:
        hint = ""
    raise ValueError(f"the input must be images (N, H, W, 3), NHWC; got shape {shape}{hint}")


# --------------------------------------------------------------------------------------------
# The attention choices, spelled one way everywhere: "eca", "eca_ns", "se", or None (baseline).

ATTENTIONS = ("eca", "eca_ns", "se", None)


def attention_choice(value: Any) -> str | None:
    """The canonical attention choice: "eca", "eca_ns", "se", or None ("none" and None: none).

    Raises ValueError naming the choices for anything else.
    """
    if value is None or value == "none":
        return None
    if value not in ATTENTIONS:
        names = ", ".join("none" if a is None else a for a in ATTENTIONS)
        raise ValueError(f"unknown attention {value!r}; choices: {names}")
    return value


def attention_attribute(attention: str | None) -> str:
    """The attribute (= PyTorch module name) a block keeps its attention layer in: "se" for SE
    (``layerS.B.se.fc1``), "eca" otherwise (``layerS.B.eca.conv``, as the original)."""
    return "se" if attention == "se" else "eca"


def make_attention(
    attention: str | None, channels: int, k_size: int, *, dtype: Dtype, param_dtype: Dtype, rngs
) -> ECA | SE | None:
    """A block's attention layer: ECA, ECA-NS, SE (``k_size`` unused), or nothing (baseline)."""
    attention = attention_choice(attention)
    if attention is None:
        return None
    if attention == "se":
        return SE(channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    return ECA(
        channels,
        k_size,
        shared=attention == "eca",
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


# --------------------------------------------------------------------------------------------
# Parameter-free layers of timm's ResNet-D/T layouts, as modules so that ``Sequential`` indices
# keep PyTorch's (``conv1.2`` is the stem's first ReLU, ``downsample.0`` the avg-down pool).


class ReLU(nnx.Module):
    """``torch.nn.ReLU`` as a layer of a ``Sequential``."""

    def __call__(self, x: Array) -> Array:
        return nnx.relu(x)


class AvgDown(nnx.Module):
    """``AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)`` of timm's avg-down
    shortcut, or identity for stride 1.

    With ceil_mode an odd side gets a last window hanging one pixel past the edge; PyTorch
    averages it over the pixels inside only, so the sum is divided by the count of real pixels.
    """

    def __init__(self, stride: int):
        self.stride = stride

    def __call__(self, x: Array) -> Array:
        if self.stride == 1:
            return x
        s = self.stride
        h, w = x.shape[1:3]
        pad = ((0, 0), (0, (-(h - 2)) % s), (0, (-(w - 2)) % s), (0, 0))
        window, strides = (1, 2, 2, 1), (1, s, s, 1)
        total = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, window, strides, pad)
        ones = jnp.ones((1, h, w, 1), jnp.float32)
        count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, window, strides, pad)
        return (total / count).astype(x.dtype)


def timm_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """timm's ECA kernel size: the paper's rule (``adaptive_kernel_size``), at least 3."""
    return max(adaptive_kernel_size(channels, gamma, b), 3)


# --------------------------------------------------------------------------------------------
# Layers of timm's other ECA families (VoVNet, ByobNet, NFNet): conv-BN-act units, the head.

ACTIVATIONS: dict[str | None, Callable[[Array], Array]] = {
    "relu": nnx.relu,
    "silu": nnx.silu,
    None: lambda x: x,
}


class ConvNormAct(nnx.Module):
    """timm's ConvNormAct: a bias-free conv (symmetric padding ((s-1) + (k-1)) // 2), BN, and
    ReLU, SiLU or nothing; attributes ``conv`` and ``bn`` as timm's ``<name>.conv.weight``,
    ``<name>.bn.*`` keys."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        *,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        pad = ((stride - 1) + (kernel - 1)) // 2
        self.conv = conv2d(in_ch, out_ch, kernel, stride=stride, padding=pad, groups=groups, **kw)
        self.bn = batch_norm(out_ch, **kw)
        self.act = act

    def __call__(self, x: Array) -> Array:
        return ACTIVATIONS[self.act](self.bn(self.conv(x)))


class Head(nnx.Module):
    """timm's ClassifierHead: global average pool (float32), then ``fc`` (``head.fc.*``);
    returns float32 logits."""

    def __init__(
        self,
        features: int,
        num_classes: int,
        *,
        fc_init: Callable[..., Array] | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.fc = nnx.Linear(
            features,
            num_classes,
            kernel_init=fc_init or torch_default_init(features),
            bias_init=nnx.initializers.zeros_init(),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        return self.fc(pooled.astype(self.dtype)).astype(jnp.float32)


def max_pool_ceil(x: Array, window: int = 3, stride: int = 2) -> Array:
    """``MaxPool2d(window, stride, padding=0, ceil_mode=True)``: a last window that hangs past
    the bottom / right edge sees -inf there (VoVNet's stage pools: 56 -> 28 -> 14 -> 7)."""
    h, w = x.shape[1:3]

    def extra(n: int) -> int:
        out = -(-(n - window) // stride) + 1
        return max((out - 1) * stride + window - n, 0)

    pad = ((0, 0), (0, extra(h)), (0, extra(w)), (0, 0))
    return jax.lax.reduce_window(
        x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pad
    )


def timm_eca(
    channels: int, attention: str | None, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
) -> ECA | None:
    """timm's EcaModule on ``channels`` (k by ``timm_kernel_size``): ECA, ECA-NS or None."""
    attention = attention_choice(attention)
    if attention == "se":
        raise ValueError("attention 'se' is built for the ResNets only")
    k = timm_kernel_size(channels)
    return make_attention(attention, channels, k, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
