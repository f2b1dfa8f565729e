"""Model registry: ``create_model(name, ...)``, ``list_models()`` and per-model release info.

Each entry records the architecture and what was released for it. The original ECA-Net
models (source "ECA-Net"): the checkpoint file, its ECA kernel sizes, the exact learnable
parameter count and the published ImageNet accuracy (single 224 centre crop). timm's
ECA-ResNets (source "timm"): the ResNet ``Design`` (stem, avg-down, groups, pruned widths),
the parameter count, and each pretrained tag with its eval preprocessing, published top-1 at
its test size and Hugging Face Hub repo.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Collection, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eca_flax.models import byob, mobilenetv2, nfnet, pruned, resnet, vovnet
from eca_flax.models.layers import (
    adaptive_kernel_size,
    attention_choice,
    check_count,
    timm_kernel_size,
)

KSize = None | str | int | Sequence[int]
# Compute dtypes by config name (parameters stay float32).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
WEIGHTS = (nnx.Param, nnx.BatchStat)  # what checkpoints and pretrained files store


ORIGINAL = "ECA-Net"  # the authors' release (BangguWu/ECANet)
TIMM = "timm"  # huggingface/pytorch-image-models
TEST = "test"  # no release: a network small enough to compile in a second (as timm's test_*)
EVAL_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # every model here


@dataclasses.dataclass(frozen=True)
class PretrainedTag:
    """One published set of weights of a timm model: ``timm/<model>.<tag>`` on the Hub."""

    tag: str  # e.g. "ra2_in1k"
    input_size: int  # training resolution (and timm's default eval size)
    crop_pct: float
    test_size: int  # the resolution the published top-1 is measured at
    test_crop_pct: float
    top1: float  # published ImageNet top-1 at test_size (timm's results-imagenet.csv)
    interpolation: str = "bicubic"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What was released for one architecture."""

    name: str
    family: str  # "resnet", "mobilenet_v2", or one of OTHER_FAMILIES (timm's other ECA models)
    release_k_size: tuple[int, ...]  # per stage (ResNet) or (k for c < 96, k for c >= 96)
    checkpoint: str  # the original's released file ("" for timm's: see ``tags``)
    params: int
    eca_params: int
    top1: float | None  # the best published top-1 (original: 224 crop; timm: ``best_tag``)
    top5: float | None
    depth: int = 0  # original ResNets: the key of resnet.LAYOUTS
    source: str = ORIGINAL
    layers: tuple[int, ...] = ()  # timm ResNets: Bottleneck blocks per stage
    design: resnet.Design = resnet.Design()
    tags: tuple[PretrainedTag, ...] = ()  # timm's published weights (none: untrained)
    drive_id: str = ""  # the original's released file on Google Drive (the authors' README)
    default_size: int = 224  # timm's default input size (the first tag's, or the cfg's)
    default_crop_pct: float = 0.875  # ... and its crop_pct (untrained models: the cfg's)
    size_rule: tuple[str, int] | None = None  # ("only", 256) or ("multiple", 256)

    @property
    def tag_names(self) -> tuple[str, ...]:
        """The published tags, e.g. ('ra2_in1k', 'a1_in1k', ...)."""
        return tuple(t.tag for t in self.tags)

    def hub_repo(self, tag: str | None = None) -> str | None:
        """'timm/ecaresnet50t.ra2_in1k' (the first tag by default); None without weights."""
        if not self.tags:
            return None
        return f"timm/{self.name}.{tag or self.tags[0].tag}"

    @property
    def best_tag(self) -> PretrainedTag | None:
        """The tag with the highest published top-1."""
        return max(self.tags, key=lambda t: t.top1, default=None)


_MODELS = {
    m.name: m
    for m in (
        ModelInfo("eca_resnet18", "resnet", (3, 5, 7, 7), "eca_resnet18_k3577.pth.tar",
                  11_689_556, 44, 70.92, 89.93, 18,
                  drive_id="1LMRFRTyzVifGBi2MUpTuYEWW44S8mwyl"),
        ModelInfo("eca_resnet34", "resnet", (3, 3, 5, 7), "eca_resnet34_k3357.pth.tar",
                  21_797_744, 72, 74.21, 91.83, 34,
                  drive_id="15LV5Jkea3GPzvLP5__H7Gg88oNQUxBDE"),
        ModelInfo("eca_resnet50", "resnet", (3, 5, 5, 7), "eca_resnet50_k3557.pth.tar",
                  25_557_112, 80, 77.42, 93.62, 50,
                  drive_id="1670rce333c_lyMWFzBlNZoVUvtxbCF_U"),
        ModelInfo("eca_resnet101", "resnet", (3, 3, 5, 7), "eca_resnet101_k3357.pth.tar",
                  44_549_317, 157, 78.65, 94.34, 101,
                  drive_id="1b5FQ8yDFnZ_UhvWT9txmjI_LjbKkgnvC"),
        ModelInfo("eca_resnet152", "resnet", (3, 3, 5, 7), "eca_resnet152_k3357.pth.tar",
                  60_193_042, 234, 78.92, 94.55, 152,
                  drive_id="1_bYnaOg9ptsILC_iC7uQ5Izv-u2rjYG5"),
        ModelInfo("eca_mobilenet_v2", "mobilenet_v2", (1, 3), "eca_mobilenetv2_k13.pth.tar",
                  3_504_903, 31, 72.56, 90.81,
                  drive_id="1FxzeXPg1SJQZzVVH4HRjMeq_SVMfidUm"),
    )
}  # fmt: skip


def _timm(
    name: str,
    layers: tuple[int, ...],
    stem: str,
    params: int,
    tags=(),
    groups: int = 1,
    base_width: int = 64,
) -> ModelInfo:
    """A timm ECA-ResNet entry: Bottleneck blocks, avg-down shortcuts, ECA under ``se`` with
    timm's kernel rule on each stage's (unpruned) width, published top-1 of its best tag."""
    widths = pruned.block_widths(name) if name in pruned.PRUNED else None
    design = resnet.Design(
        stem=stem,
        avg_down=True,
        groups=groups,
        base_width=base_width,
        widths=widths,
        attention_name="se",
    )
    ks = tuple(timm_kernel_size(w * 4) for w in resnet.STAGE_WIDTHS)
    best = max((t.top1 for t in tags), default=None)
    return ModelInfo(
        name,
        "resnet",
        ks,
        "",
        params,
        sum(n * k for n, k in zip(layers, ks)),
        best,
        None,
        source=TIMM,
        layers=layers,
        design=design,
        tags=tuple(tags),
    )


_MIIL = PretrainedTag("miil_in1k", 224, 0.875, 288, 0.95, 0.0)
_TIMM_MODELS = (
    _timm("ecaresnet26t", (2, 2, 2, 2), "tiered", 16_011_916,
          [PretrainedTag("ra2_in1k", 256, 0.875, 320, 0.95, 79.900)]),
    _timm("ecaresnet50d", (3, 4, 6, 3), "deep", 25_576_350,
          [dataclasses.replace(_MIIL, top1=81.648)]),
    _timm("ecaresnet50d_pruned", (3, 4, 6, 3), "deep", 19_939_713,
          [dataclasses.replace(_MIIL, top1=80.808)]),
    _timm("ecaresnet50t", (3, 4, 6, 3), "tiered", 25_573_814,
          [PretrainedTag("ra2_in1k", 256, 0.875, 320, 0.95, 82.370),
           PretrainedTag("a1_in1k", 224, 0.95, 288, 1.0, 82.110),
           PretrainedTag("a2_in1k", 224, 0.95, 288, 1.0, 81.682),
           PretrainedTag("a3_in1k", 160, 0.95, 224, 0.95, 79.548)]),
    _timm("ecaresnetlight", (1, 1, 11, 3), "plain", 30_162_046,
          [dataclasses.replace(_MIIL, top1=81.430)]),
    _timm("ecaresnet101d", (3, 4, 23, 3), "deep", 44_568_563,
          [dataclasses.replace(_MIIL, top1=83.006)]),
    _timm("ecaresnet101d_pruned", (3, 4, 23, 3), "deep", 24_876_040,
          [dataclasses.replace(_MIIL, top1=82.016)]),
    _timm("ecaresnet200d", (3, 24, 36, 3), "deep", 64_693_400),
    _timm("ecaresnet269d", (3, 30, 48, 8), "deep", 102_093_077,
          [PretrainedTag("ra2_in1k", 320, 0.95, 352, 1.0, 84.968)]),
    _timm("ecaresnext26t_32x4d", (2, 2, 2, 2), "tiered", 15_406_220, groups=32, base_width=4),
    _timm("ecaresnext50t_32x4d", (3, 4, 6, 3), "tiered", 25_045_686, groups=32, base_width=4),
)  # fmt: skip
_MODELS.update((m.name, m) for m in _TIMM_MODELS)
# The smallest ECA-ResNet: one BasicBlock per stage, 16 to 128 channels. Nothing was released
# for it; it exists so that tests of the trainer, the checkpoints and the command lines (whose
# subject is not the network) run through the same code as ECA-ResNet-18 in a fraction of the
# compile time. Like timm's test_resnet, it is a model like any other.
_MODELS["test_eca_resnet"] = ModelInfo(
    "test_eca_resnet", "resnet", (3, 5, 7, 7), "", 438_478, 22, None, None, source=TEST,
    layers=(1, 1, 1, 1), design=resnet.Design(stem_width=16, stage_widths=(16, 32, 64, 128)),
)  # fmt: skip

# timm's other ECA models (timm_eca_family2_facts.md): their own files, ECA kernels fixed by
# timm's rule on each layer's channels (no k_size), every layer's key named as timm's.
OTHER_FAMILIES = {"vovnet": vovnet.VoVNet, "byob": byob.ByobNet, "nfnet": nfnet.NormFreeNet}


def _other(
    name: str,
    family: str,
    params: int,
    eca_params: int,
    tags=(),
    size: int = 224,
    crop: float = 0.875,
    size_rule: tuple[str, int] | None = None,
) -> ModelInfo:
    """An entry of timm's other ECA families: parameters, ECA weights, tags, default size."""
    best = max((t.top1 for t in tags), default=None)
    return ModelInfo(
        name, family, (), "", params, eca_params, best, None, source=TIMM, tags=tuple(tags),
        default_size=size, default_crop_pct=crop, size_rule=size_rule,
    )  # fmt: skip


_OTHER_MODELS = (
    _other("eca_nfnet_l0", "nfnet", 24_143_924, 12 * 5,
           [PretrainedTag("ra2_in1k", 224, 0.9, 288, 1.0, 82.590)], 224, 0.9),
    _other("eca_nfnet_l1", "nfnet", 41_407_728, 24 * 5,
           [PretrainedTag("ra2_in1k", 256, 0.9, 320, 1.0, 84.062)], 256, 0.9),
    _other("eca_nfnet_l2", "nfnet", 56_722_348, 36 * 5,
           [PretrainedTag("ra3_in1k", 320, 0.9, 384, 1.0, 84.710)], 320, 0.9),
    _other("eca_nfnet_l3", "nfnet", 72_036_968, 48 * 5, (), 352, 0.9),
    _other("nf_ecaresnet26", "nfnet", 15_995_220, 6 * 5 + 2 * 7, (), 224, 0.9),
    _other("nf_ecaresnet50", "nfnet", 25_557_118, 13 * 5 + 3 * 7, (), 224, 0.9),
    _other("nf_ecaresnet101", "nfnet", 44_549_331, 30 * 5 + 3 * 7, (), 224, 0.9),
    _other("eca_vovnet39b", "vovnet", 22_600_316, 4 * 5),
    _other("eca_resnet33ts", "byob", 19_676_302, 2 * 3 + 8 * 5,
           [PretrainedTag("ra2_in1k", 256, 0.9, 288, 1.0, 80.716)], 256, 0.9),
    _other("eca_resnext26ts", "byob", 10_297_988, 2 * 3 + 6 * 5,
           [PretrainedTag("ch_in1k", 256, 0.9, 288, 1.0, 78.020)], 256, 0.9),
    _other("eca_botnext26ts_256", "byob", 10_593_301, 2 * 3 + 3 * 5,
           [PretrainedTag("c1_in1k", 256, 0.95, 256, 0.95, 79.262)], 256, 0.95,
           byob.DESIGNS["eca_botnext26ts_256"].size_rule),
    _other("eca_halonext26ts", "byob", 10_756_885, 2 * 3 + 3 * 5,
           [PretrainedTag("c1_in1k", 256, 0.94, 256, 0.94, 79.518)], 256, 0.94,
           byob.DESIGNS["eca_halonext26ts"].size_rule),
)  # fmt: skip
_MODELS.update((m.name, m) for m in _OTHER_MODELS)


def list_models(source: str | None = None) -> list[str]:
    """Names accepted by ``create_model``; with ``source`` ("ECA-Net", "timm" or "test"), its
    models."""
    return [n for n, m in _MODELS.items() if source is None or m.source == source]


def split_tag(name: str) -> tuple[str, str | None]:
    """('ecaresnet50t', 'a1_in1k') for a timm tag of a known model, else (name, None): timm's
    ``model.tag`` names, which name the architecture too."""
    arch, _, tag = name.partition(".")
    if tag and arch in _MODELS and tag in _MODELS[arch].tag_names:
        return arch, tag
    return name, None


def resnet_layout(name: str) -> tuple[type, tuple[int, ...], resnet.Design]:
    """(block class, blocks per stage, design) of ResNet ``name``."""
    info = model_info(name)
    if info.depth:
        block, layers = resnet.LAYOUTS[info.depth]
        return block, layers, info.design
    block = resnet.Bottleneck if info.source == TIMM else resnet.BasicBlock
    return block, info.layers, info.design


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
    block, _, design = resnet_layout(name)
    return tuple(w * block.expansion for w in design.stage_widths)


def resolve_k_size(name: str, k_size: KSize = None) -> tuple[int, ...]:
    """Turn a user's ``k_size`` into the model's full kernel-size tuple.

    Accepts None (the released sizes), "adaptive" (the paper's formula on each ECA layer's
    channel count), the original CLI's digit string ("3557"), an int (every layer), or a
    sequence. ResNets take 4 sizes (one per stage); MobileNetV2 takes 2 (k where the table's
    c < 96, k elsewhere: the release is "13") or 17 (one per block). timm's models release
    timm's rule (the paper's, at least 3: 5,5,5,7), which "adaptive" gives them too; a pruned
    model's rule reads the unpruned widths, as timm's kernels do.
    """
    info = model_info(name)
    if info.family in OTHER_FAMILIES:
        if (
            k_size is None
            or k_size == "adaptive"
            or (not isinstance(k_size, str | int) and len(k_size) == 0)
        ):
            return ()
        raise ValueError(
            f"{name}'s ECA kernel sizes are fixed by timm's rule on each layer's channels; "
            f"k_size={k_size!r} is not an option (leave it out)"
        )
    n = 4 if info.family == "resnet" else mobilenetv2.NUM_BLOCKS
    if k_size is None:
        ks: tuple[int, ...] = info.release_k_size
    elif isinstance(k_size, str) and k_size == "adaptive":
        rule = timm_kernel_size if info.source == TIMM else adaptive_kernel_size
        ks = tuple(rule(c) for c in eca_channels(name))
    elif isinstance(k_size, str):
        if not re.fullmatch(r"\d+", k_size.replace(",", "")):
            raise ValueError(
                f"k_size {k_size!r} is not 'adaptive', a digit string like '3557' or a list"
            )
        ks = tuple(int(c) for c in (k_size.split(",") if "," in k_size else k_size))
    elif isinstance(k_size, int | np.integer) and not isinstance(k_size, bool):
        ks = (int(k_size),) * n
    elif isinstance(k_size, Sequence | np.ndarray):
        ks = tuple(check_count("k_size", k, 1, " (each kernel size)") for k in k_size)
    else:
        raise TypeError(
            f"k_size must be None, 'adaptive', a digit string like '3557', an int or a "
            f"sequence of ints, got {k_size!r}"
        )
    if info.family == "mobilenet_v2" and len(ks) == 2:
        ks = mobilenetv2.release_block_kernel_sizes(*ks)
    if len(ks) != n:
        raise ValueError(f"{name} needs {n} ECA kernel sizes, got {len(ks)}: {ks}")
    bad = [k for k in ks if k < 1 or k % 2 == 0]
    if bad:
        raise ValueError(f"ECA kernel sizes must be positive odd numbers, got {ks}")
    return ks


def check_input_size(name: str, height: int, width: int | None = None) -> None:
    """ValueError in one line naming the rule when ``name`` cannot take a height x width input
    (eca_botnext26ts_256: 256 only; eca_halonext26ts: multiples of 256; eca_vovnet39b: 29 px
    or more); others take any."""
    width = height if width is None else width
    if model_info(name).family == "byob":
        byob.check_input_size(name, height, width)
    elif model_info(name).family == "vovnet":
        vovnet.check_input_size(name, height, width)


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
) -> nnx.Module:
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
    if info.family in OTHER_FAMILIES:
        return OTHER_FAMILIES[info.family](arch=name, **common)
    block, layers, design = resnet_layout(name)
    return resnet.ECAResNet(block, layers, ks, design=design, arch=name, **common)


def arch_of(model: nnx.Module) -> str:
    """The registry name ``model`` was built as (the inverse of ``create_model``'s name)."""
    if isinstance(model, mobilenetv2.ECAMobileNetV2) and model.width_mult == 1.0:
        return "eca_mobilenet_v2"
    if isinstance(model, (resnet.ECAResNet, *OTHER_FAMILIES.values())) and (
        getattr(model, "arch", None) in _MODELS
    ):
        return model.arch
    if isinstance(model, resnet.ECAResNet) and f"eca_resnet{model.depth}" in _MODELS:
        return f"eca_resnet{model.depth}"
    raise ValueError(f"{type(model).__name__} is not one of {', '.join(_MODELS)}")


def count_params(model: nnx.Module) -> int:
    """Learnable parameters (nnx.Param); BN running statistics are not counted."""
    if not isinstance(model, nnx.Module):
        raise TypeError(f"count_params takes an nnx.Module (a model), got {model!r}")
    return sum(int(v.size) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def weight_paths(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    """The model's weights and BN statistics by Flax path (the variables a checkpoint holds)."""
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


@functools.lru_cache(maxsize=16)
def abstract_model(arch: str, k_size: tuple, num_classes: int, attention: str | None, dtype: str):
    """``nnx.eval_shape(create_model(...))``: tracing ResNet-152's construction takes seconds,
    and one process often builds a model repeatedly (convert, load, export). Callers clone it."""
    return nnx.eval_shape(
        lambda key: _constructed(key, (arch, k_size, num_classes, attention, dtype)),
        jax.random.key(0),
    )


def _constructed(key: jax.Array, spec: tuple) -> nnx.Module:
    """``create_model(*spec, rngs=nnx.Rngs(key))`` inside a trace (eval_shape, jit), its RNG
    counters kept concrete: flax reads ``.sharding`` of each counter it updates, and on a
    tracer jax builds an error message that walks the whole trace, so tracing grew
    quadratically with depth (ecaresnet269d's 913 counters: 14 s instead of minutes). The
    weights still come from the traced ``key``, so they stay abstract (or compiled, under jit)."""
    arch, k_size, num_classes, attention, dtype = spec
    with jax.ensure_compile_time_eval():
        return create_model(
            arch,
            k_size=k_size,
            num_classes=num_classes,
            attention=attention,
            dtype=jnp.dtype(dtype),
            rngs=nnx.Rngs(key),
        )


@functools.lru_cache(maxsize=16)
def _initialised(key: tuple, seed: int, init: frozenset) -> tuple[nnx.State, dict]:
    """What ``create_model(*key, rngs=nnx.Rngs(seed))`` gives the non-weight state (dropout RNG)
    and the weight paths in ``init``; under jit the unused initialisers are dropped."""

    def concrete(rng: jax.Array) -> tuple[nnx.State, dict]:
        made = _constructed(rng, key)
        _, weights, others = nnx.split(made, WEIGHTS, ...)
        return others, {p: v.get_value() for p, v in nnx.to_flat_state(weights) if p in init}

    return jax.jit(concrete)(jax.random.key(seed))


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
