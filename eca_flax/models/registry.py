"""Model registry: ``create_model(name, ...)``, ``list_models()`` and per-model release info.

Each entry records the architecture and what the authors released for it: the checkpoint
file, its ECA kernel sizes, the exact learnable parameter count and the published
ImageNet accuracy (single 224 centre crop).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.models import mobilenetv2, resnet
from eca_flax.models.layers import adaptive_kernel_size, attention_choice

KSize = None | str | int | Sequence[int]
# Compute dtypes by config name (parameters stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
WEIGHTS = (nnx.Param, nnx.BatchStat)  # what checkpoints and pretrained files store


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What the authors released for one architecture."""

    name: str
    family: str  # "resnet" or "mobilenet_v2"
    release_k_size: tuple[int, ...]  # per stage (ResNet) or (k for c < 96, k for c >= 96)
    checkpoint: str
    params: int
    eca_params: int
    top1: float
    top5: float
    depth: int = 0  # ResNets: the key of resnet.LAYOUTS


_MODELS = {
    m.name: m
    for m in (
        ModelInfo("eca_resnet18", "resnet", (3, 5, 7, 7), "eca_resnet18_k3577.pth.tar",
                  11_689_556, 44, 70.92, 89.93, 18),
        ModelInfo("eca_resnet34", "resnet", (3, 3, 5, 7), "eca_resnet34_k3357.pth.tar",
                  21_797_744, 72, 74.21, 91.83, 34),
        ModelInfo("eca_resnet50", "resnet", (3, 5, 5, 7), "eca_resnet50_k3557.pth.tar",
                  25_557_112, 80, 77.42, 93.62, 50),
        ModelInfo("eca_resnet101", "resnet", (3, 3, 5, 7), "eca_resnet101_k3357.pth.tar",
                  44_549_317, 157, 78.65, 94.34, 101),
        ModelInfo("eca_resnet152", "resnet", (3, 3, 5, 7), "eca_resnet152_k3357.pth.tar",
                  60_193_042, 234, 78.92, 94.55, 152),
        ModelInfo("eca_mobilenet_v2", "mobilenet_v2", (1, 3), "eca_mobilenetv2_k13.pth.tar",
                  3_504_903, 31, 72.56, 90.81),
    )
}  # fmt: skip


def list_models() -> list[str]:
    """Names accepted by ``create_model``."""
    return list(_MODELS)


def model_info(name: str) -> ModelInfo:
    """Release information for ``name``; unknown names list the choices."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choices: {', '.join(_MODELS)}") from None


def eca_channels(name: str) -> tuple[int, ...]:
    """The channel count each ECA layer sees: per stage (ResNet) or per block (MobileNetV2)."""
    info = model_info(name)
    if info.family == "mobilenet_v2":
        return mobilenetv2.block_channels()
    block, _ = resnet.LAYOUTS[info.depth]
    return tuple(w * block.expansion for w in resnet.STAGE_WIDTHS)


def resolve_k_size(name: str, k_size: KSize = None) -> tuple[int, ...]:
    """Turn a user's ``k_size`` into the model's full kernel-size tuple.

    Accepts None (the released sizes), "adaptive" (the paper's formula on each ECA layer's
    channel count), the original CLI's digit string ("3557"), an int (every layer), or a
    sequence. ResNets take 4 sizes (one per stage); MobileNetV2 takes 2 (k where the table's
    c < 96, k elsewhere: the release is "13") or 17 (one per block).
    """
    info = model_info(name)
    n = 4 if info.family == "resnet" else mobilenetv2.NUM_BLOCKS
    if k_size is None:
        ks: tuple[int, ...] = info.release_k_size
    elif isinstance(k_size, str) and k_size == "adaptive":
        ks = tuple(adaptive_kernel_size(c) for c in eca_channels(name))
    elif isinstance(k_size, str):
        if not re.fullmatch(r"\d+", k_size.replace(",", "")):
            raise ValueError(
                f"k_size {k_size!r} is not 'adaptive', a digit string like '3557' or a list"
            )
        ks = tuple(int(c) for c in (k_size.split(",") if "," in k_size else k_size))
    elif isinstance(k_size, int):
        ks = (k_size,) * n
    else:
        ks = tuple(int(k) for k in k_size)
    if info.family == "mobilenet_v2" and len(ks) == 2:
        ks = mobilenetv2.release_block_kernel_sizes(*ks)
    if len(ks) != n:
        raise ValueError(f"{name} needs {n} ECA kernel sizes, got {len(ks)}: {ks}")
    bad = [k for k in ks if k < 1 or k % 2 == 0]
    if bad:
        raise ValueError(f"ECA kernel sizes must be positive odd numbers, got {ks}")
    return ks


def model_attention(name: str, attention: Any) -> str | None:
    """``attention_choice(attention)``, checked against ``name``: SE is built for the ResNets."""
    attention = attention_choice(attention)
    if attention == "se" and model_info(name).family != "resnet":
        raise ValueError(f"attention 'se' (the SE baseline) is built for the ResNets, not {name}")
    return attention


def create_model(
    name: str,
    *,
    k_size: KSize = None,
    num_classes: int = 1000,
    attention: str | None = "eca",
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
    **kwargs: Any,
) -> resnet.ECAResNet | mobilenetv2.ECAMobileNetV2:
    """Build a model by name, initialised as the original for training from scratch.

    ``attention`` is "eca" (the paper), "eca_ns" (non-shared ablation), "se" (the SE baseline,
    ResNets only) or None (plain baseline).
    ``dtype`` is the compute dtype (e.g. jnp.bfloat16); parameters stay ``param_dtype``.
    Extra keyword arguments go to the model class (e.g. ``width_mult`` for MobileNetV2).
    """
    info = model_info(name)
    attention = model_attention(name, attention)
    ks = resolve_k_size(name, k_size)
    rngs = nnx.Rngs(0) if rngs is None else rngs
    common = dict(
        num_classes=num_classes,
        attention=attention,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **kwargs,
    )
    if info.family == "mobilenet_v2":
        return mobilenetv2.ECAMobileNetV2(ks, **common)
    block, layers = resnet.LAYOUTS[info.depth]
    return resnet.ECAResNet(block, layers, ks, **common)


def arch_of(model: nnx.Module) -> str:
    """The registry name ``model`` was built as (the inverse of ``create_model``'s name)."""
    if isinstance(model, mobilenetv2.ECAMobileNetV2) and model.width_mult == 1.0:
        return "eca_mobilenet_v2"
    if isinstance(model, resnet.ECAResNet) and f"eca_resnet{model.depth}" in _MODELS:
        return f"eca_resnet{model.depth}"
    raise ValueError(f"{type(model).__name__} is not one of {', '.join(_MODELS)}")


def count_params(model: nnx.Module) -> int:
    """Learnable parameters (nnx.Param); BN running statistics are not counted."""
    return sum(int(v.size) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def weight_paths(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    """The model's weights and BN statistics by Flax path (the variables a checkpoint holds)."""
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


@functools.lru_cache(maxsize=16)
def abstract_model(arch: str, k_size: tuple, num_classes: int, attention: str | None, dtype: str):
    """``nnx.eval_shape(create_model(...))``: tracing ResNet-152's construction takes seconds,
    and one process often builds a model repeatedly (convert, load, export). Callers clone it."""
    return nnx.eval_shape(
        lambda: create_model(
            arch, k_size=k_size, num_classes=num_classes, attention=attention,
            dtype=jnp.dtype(dtype)
        )
    )  # fmt: skip


@functools.lru_cache(maxsize=16)
def _initialised(key: tuple, seed: int, init: frozenset) -> tuple[nnx.State, dict]:
    """What ``create_model(*key, rngs=nnx.Rngs(seed))`` gives the non-weight state (dropout RNG)
    and the weight paths in ``init``; under jit the unused initialisers are dropped."""
    arch, k_size, num_classes, attention, dtype = key

    def concrete() -> tuple[nnx.State, dict]:
        made = create_model(
            arch,
            k_size=k_size,
            num_classes=num_classes,
            attention=attention,
            dtype=jnp.dtype(dtype),
            rngs=nnx.Rngs(seed),
        )
        _, weights, others = nnx.split(made, WEIGHTS, ...)
        return others, {p: v.get_value() for p, v in nnx.to_flat_state(weights) if p in init}

    return jax.jit(concrete)()


def empty_model(
    arch: str,
    *,
    k_size: Any = None,
    num_classes: int = 1000,
    attention: str | None = "eca",
    dtype: Any = jnp.float32,
    seed: int = 0,
    init: Collection[tuple] = (),
) -> nnx.Module:
    """``create_model(arch, ...)`` without the cost of random initialisation.

    Weights and BN statistics are left as abstract ``jax.ShapeDtypeStruct`` placeholders for
    the caller to fill (``convert.load_state_dict`` or a checkpoint); everything else (the
    dropout RNG of MobileNetV2) and the weight paths listed in ``init`` (a new head) get exactly
    the values ``create_model(..., rngs=nnx.Rngs(seed))`` would give them.
    """
    key = (
        arch,
        resolve_k_size(arch, k_size),
        int(num_classes),
        attention_choice(attention),
        jnp.dtype(dtype).name,
    )
    model = nnx.clone(abstract_model(*key))
    _, _, rest = nnx.split(model, WEIGHTS, ...)
    if init or jax.tree.leaves(rest):
        others, fresh = _initialised(key, seed, frozenset(map(tuple, init)))
        nnx.update(model, others)
        variables = weight_paths(model)
        for path, value in fresh.items():
            variables[tuple(path)].set_value(value)
    return model


def abstract_paths(model: nnx.Module) -> list[str]:
    """Weight paths of ``model`` still holding placeholders (empty when fully loaded)."""
    return [
        "/".join(map(str, p))
        for p, v in weight_paths(model).items()
        if isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]
