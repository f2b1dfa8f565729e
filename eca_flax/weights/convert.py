"""Mapping between PyTorch state_dicts of the original ECA-Net and eca_flax NNX models.

One mechanical rule, no per-model table: a key ``layer1.0.eca.conv.weight`` is the Flax path
``('layer1', 0, 'eca', 'conv', 'kernel')`` -- split on dots, digits become list indices, and
the leaf is renamed (weight -> kernel for convs/linears, scale for BN; running_mean -> mean,
running_var -> var; num_batches_tracked has no Flax counterpart). Tensors change layout by
their rank: conv OIHW -> HWIO, 1-D conv (O, I, k) -> (k, I, O), linear (out, in) -> (in, out).

On top of that rule, everything ``convert_torch_weights.py`` does: inferring the
architecture, kernel sizes and classes from the tensors alone (``infer_arch``), converting a
``.pth`` file (read by ``eca_flax.weights.pth``) to a pretrained directory or .safetensors file
(``convert_file``), checking the result against the PyTorch reference (``verify.verify_with_torch``)
and exporting back (``export_torch``). torch is imported inside the functions that need it only, so
``import eca_flax`` never needs torch.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from eca_flax import files
from eca_flax.errors import ConversionError
from eca_flax.models import mobilenetv2
from eca_flax.models.registry import (
    ORIGINAL,
    TIMM,
    KSize,
    count_params,
    empty_model,
    list_models,
    model_info,
    resnet_layout,
    resolve_k_size,
    weight_paths,
)
from eca_flax.weights import families, hub, pth
from eca_flax.weights.arch import ArchSpec, eca_kernel, format_k_size, head_classes
from eca_flax.weights.pretrained import (
    check_destination,
    load_pretrained,
    read_model_json,
    save_pretrained,
)
from eca_flax.weights.pth import PREFIX, list_keys, strip_prefix
from eca_flax.weights.verify import (
    verification_images,
    verify_backbone_with_torch,
    verify_with_torch,
)

_LEAF = {"bias": "bias", "running_mean": "mean", "running_var": "var"}
_TO_FLAX_AXES = {4: (2, 3, 1, 0), 3: (2, 1, 0), 2: (1, 0)}
_TO_TORCH_AXES = {4: (3, 2, 0, 1), 3: (2, 1, 0), 2: (1, 0)}


def torch_key_to_path(key: str, ndim: int) -> tuple[str | int, ...] | None:
    """The Flax path of a PyTorch state_dict key, or None for num_batches_tracked."""
    *parents, leaf = key.removeprefix(PREFIX).split(".")
    if leaf == "num_batches_tracked":
        return None
    if leaf == "weight":
        name = "kernel" if ndim >= 2 else "scale"
    elif leaf in _LEAF:
        name = _LEAF[leaf]
    else:
        name = leaf
    return tuple(int(p) if p.isdigit() else p for p in parents) + (name,)


def path_to_torch_key(path: tuple[str | int, ...]) -> str:
    """The PyTorch key of a Flax variable path (inverse of ``torch_key_to_path``)."""
    *parents, name = path
    leaf = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
    return ".".join([*(str(p) for p in parents), leaf.get(name, name)])


def to_flax_layout(array: np.ndarray) -> np.ndarray:
    """PyTorch layout -> Flax layout by rank (OIHW -> HWIO, (O,I,k) -> (k,I,O), (o,i) -> (i,o))."""
    axes = _TO_FLAX_AXES.get(array.ndim)
    return np.transpose(array, axes) if axes else array


def to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Flax layout -> PyTorch layout (inverse of ``to_flax_layout``)."""
    axes = _TO_TORCH_AXES.get(array.ndim)
    return np.ascontiguousarray(np.transpose(array, axes) if axes else array)


def load_state_dict(model: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> None:
    """Copy a PyTorch state_dict (numpy arrays, with or without 'module.') into ``model``.

    Strict like PyTorch's ``load_state_dict``: missing keys, unexpected keys and shape
    mismatches raise ConversionError naming them; the model is untouched on error.
    """
    variables = weight_paths(model)
    expected = {path_to_torch_key(p): p for p in variables}
    sd = strip_prefix(state_dict)
    missing = sorted(k for k in expected if k not in sd)
    unexpected = sorted(
        k for k in sd if k not in expected and not k.endswith(".num_batches_tracked")
    )
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {list_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {list_keys(unexpected)}")
        raise ConversionError("; ".join(parts))
    if bad := sorted(k for k in expected if not np.isfinite(np.asarray(sd[k])).all()):
        raise ConversionError(
            f"{len(bad)} tensors hold NaN or infinite values ({list_keys(bad)}): a diverged or "
            "damaged checkpoint; refusing to convert it"
        )
    new_values = {}
    for key, path in expected.items():
        value = to_flax_layout(np.asarray(sd[key]))
        var = variables[path]
        if value.shape != var.shape:
            torch_shape = tuple(np.asarray(sd[key]).shape)
            want = tuple(to_torch_layout(np.zeros(var.shape, np.int8)).shape)
            raise ConversionError(
                f"shape mismatch for {key}: checkpoint {torch_shape}, model {want}"
            )
        # copy: on CPU jax may alias a numpy buffer that the caller (e.g. torch) still mutates
        new_values[path] = jnp.array(np.array(value, copy=True), dtype=var.dtype)
    for path, value in new_values.items():
        variables[path].set_value(value)


def state_dict(model: nnx.Module, *, prefix: str = "") -> dict[str, np.ndarray]:
    """The model's weights as a PyTorch state_dict of numpy arrays, original keys and layouts.

    BatchNorm layers get a 0-dim int64 ``num_batches_tracked`` (0) as PyTorch writes them, so
    the original model loads the result with ``strict=True``.
    """
    out: dict[str, np.ndarray] = {}
    for path, var in sorted(weight_paths(model).items(), key=lambda kv: str(kv[0])):
        key = path_to_torch_key(path)
        out[prefix + key] = to_torch_layout(np.asarray(var[...], dtype=np.float32))
        if path[-1] == "var":
            bn = key.rsplit(".", 1)[0]
            out[f"{prefix}{bn}.num_batches_tracked"] = np.array(0, dtype=np.int64)
    return out


# --------------------------------------------------------------------------------------------
# Architecture inference.


_SE_KEY = re.compile(r"layer[1-4]\.\d+\.se\.fc1\.weight")
_ECA_KEY = {
    "resnet": re.compile(r"layer([1-4])\.(\d+)\.eca\.conv\.weight"),
    "mobilenet_v2": re.compile(r"features\.(\d+)\.conv\.\d+\.conv\.weight"),
}


def _resnet_arch(sd: Mapping[str, np.ndarray]) -> str:
    """The registry name of the ResNet whose block keys these are."""
    blocks = [0, 0, 0, 0]
    for key in sd:
        m = re.match(r"layer([1-4])\.(\d+)\.", key)
        if m:
            s = int(m.group(1)) - 1
            blocks[s] = max(blocks[s], int(m.group(2)) + 1)
    bottleneck = any(re.fullmatch(r"layer[1-4]\.\d+\.conv3\.weight", k) for k in sd)
    for name in list_models(ORIGINAL):
        info = model_info(name)
        if info.family == "resnet":
            block, layers, _ = resnet_layout(name)
            if tuple(layers) == tuple(blocks) and (block.expansion == 4) == bottleneck:
                return name
    kind = "bottleneck" if bottleneck else "basic"
    raise ConversionError(
        f"a ResNet with {kind} blocks {','.join(map(str, blocks))} per stage is none of "
        "ECA-ResNet-18/34 (basic 2,2,2,2 / 3,4,6,3) or 50/101/152 (bottleneck 3,4,6,3 / "
        "3,4,23,3 / 3,8,36,3)"
    )


def infer_arch(state_dict: Mapping[str, np.ndarray]) -> ArchSpec:
    """Architecture, ECA kernel sizes, attention kind and classes, from the tensors alone.

    ResNet depth and block type come from the ``layerS.B.*`` keys, MobileNetV2 from
    ``features.*``; each ECA kernel size from its ``eca.conv.weight`` shape (SE ResNets:
    ``se.fc1.weight`` keys); num_classes from the classifier. timm's ECA-ResNets (3x3 stems,
    avg-down shortcuts, ECA under ``se``) are told by ``hub.infer_timm_arch``. Nothing else (in
    particular not the file's 'arch' entry or config.json) is consulted.
    """
    sd = strip_prefix(state_dict)
    if spec := families.infer_family_arch(sd):
        return spec
    if hub.is_timm_layout(sd):
        return hub.infer_timm_arch(sd)
    if foreign := hub.foreign_timm_model(sd):
        raise ConversionError(f"not an ECA-Net state_dict: {foreign}")
    if any(k.startswith("features.") for k in sd):
        family, head = "mobilenet_v2", "classifier.1"
        arch = "eca_mobilenet_v2"
        n_features = 1 + max(
            (int(m.group(1)) for k in sd if (m := re.match(r"features\.(\d+)\.", k))),
            default=-1,
        )
        want = mobilenetv2.NUM_BLOCKS + 2  # stem, 17 inverted residuals, last 1x1 conv
        if n_features != want:
            raise ConversionError(
                f"a MobileNetV2 with {n_features} feature blocks; ECA-MobileNetV2 has {want} "
                f"(features.0 to features.{want - 1})"
            )
    elif any(k.startswith("layer1.") for k in sd):
        family, head = "resnet", "fc"
        arch = _resnet_arch(sd)
    else:
        raise ConversionError(
            "not an ECA-Net state_dict: no ResNet keys (layer1.0.conv1.weight, ...) and no "
            f"MobileNetV2 keys (features.0.0.weight, ...); its keys: {list_keys(sorted(sd))}"
        )
    release = resolve_k_size(arch, None)
    kinds: set[str] = set()
    per_group: dict[int, set[int]] = {}
    for key, value in sd.items():
        m = _ECA_KEY[family].fullmatch(key)
        if m:
            kind, k = eca_kernel(key, tuple(np.shape(value)))
            kinds.add(kind)
            group = int(m.group(1)) - 1  # stage (ResNet) or block (features.1 is block 0)
            per_group.setdefault(group, set()).add(k)
    if len(kinds) > 1:
        raise ConversionError("the state_dict mixes shared ECA (1, 1, k) and ECA-NS (C, 1, k)")
    if not kinds and family == "resnet" and any(_SE_KEY.fullmatch(k) for k in sd):
        kinds = {"se"}  # SE fc shapes and any stray keys: load_state_dict names them
    for group, ks in per_group.items():
        if len(ks) > 1:
            raise ConversionError(
                f"layer{group + 1} mixes ECA kernel sizes {sorted(ks)}; ECA-ResNet uses one "
                "kernel size per stage"
            )
        if not 0 <= group < len(release):
            raise ConversionError(f"ECA layer in unexpected block {group + 1}")
    k_size = tuple(min(per_group.get(g, {k})) for g, k in enumerate(release))
    attention = kinds.pop() if kinds else None
    return ArchSpec(arch, k_size, head_classes(sd, head), attention)


# Every key of the classification ECA-ResNets' state_dicts (ECA, SE or none), in one pattern.
_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"  # a BatchNorm2d's leaves
_RESNET_KEY = re.compile(
    rf"conv1\.weight|bn1\.{_BN}|fc\.(weight|bias)|layer[1-4]\.\d+\.(conv[123]\.weight"
    rf"|bn[123]\.{_BN}|eca\.conv\.weight|se\.fc[12]\.(weight|bias)|downsample\.0\.weight"
    rf"|downsample\.1\.{_BN})"
)


def backbone_arch(checkpoint: pth.Checkpoint) -> ArchSpec:
    """``infer_arch`` for a detector's backbone (``checkpoint.detection``): num_classes 0, and
    a backbone that is not an ECA-ResNet (another key layout, grouped convolutions, another
    depth) is one ConversionError naming the first key that does not fit."""
    where = f"{checkpoint.path}: the detector's backbone is not an ECA-ResNet"
    sd = checkpoint.state_dict
    unknown = [k for k in sd if not _RESNET_KEY.fullmatch(k)]
    if unknown:
        raise ConversionError(
            f"{where}: {pth.BACKBONE}{unknown[0]} is not a key of the classification ECA-ResNets "
            f"(conv1, bn1, layerS.B.convN/bnN/eca.conv/downsample){_more(len(unknown) - 1)}"
        )
    for key, value in sd.items():
        shape = tuple(np.shape(value))
        if key.endswith(".conv2.weight") and len(shape) == 4 and shape[1] != shape[0]:
            raise ConversionError(
                f"{where}: {pth.BACKBONE}{key} has shape {shape}, a grouped 3x3 convolution "
                f"({shape[0] // max(shape[1], 1)} groups, as in ResNeXt or RegNet); ECA-ResNet's "
                f"is ({shape[0]}, {shape[0]}, 3, 3)"
            )
    try:
        spec = infer_arch(sd)
    except ConversionError as e:
        raise ConversionError(f"{where}: {e}") from None
    return dataclasses.replace(spec, num_classes=0)


def _more(n: int) -> str:
    return f"; {n} more keys it does not recognise" if n > 0 else ""


def confirm_arch(spec: ArchSpec, *, arch: str | None = None, k_size: KSize = None) -> None:
    """Check the user's --arch / --k-size against what the file holds; they never override it."""
    if arch is not None and arch != spec.arch:
        raise ConversionError(
            f"--arch {arch} does not match the file, which holds {spec.describe()}"
        )
    if k_size is None:
        return
    if spec.attention in (None, "se"):
        raise ConversionError(f"--k-size given, but the file has no ECA layers: {spec.describe()}")
    try:
        want = resolve_k_size(spec.arch, k_size)
    except ValueError as e:
        raise ConversionError(f"--k-size: {e}") from None
    if tuple(want) != spec.k_size:
        raise ConversionError(
            f"--k-size {format_k_size(want)} does not match the file, whose ECA kernel sizes are "
            f"{format_k_size(spec.k_size)} ({spec.describe()})"
        )


# --------------------------------------------------------------------------------------------
# The two directions of convert_torch_weights.py.


def say(line: str) -> None:
    """A progress line on stdout, flushed: it shows when it happens also in a log file or pipe."""
    print(line, flush=True)


def summary(spec: ArchSpec, params: int, checkpoint: pth.Checkpoint | None = None) -> str:
    """'eca_resnet50, k=3,5,5,7, 1000 classes, 25,557,112 params, epoch 100, best_prec1 77.42';
    for a detector's backbone, then '; neck, rpn_head: 16 tensors not converted (detector parts)'.
    """
    parts = [spec.describe(), f"{params:,} params"]
    if checkpoint is not None and checkpoint.epoch is not None:
        parts.append(f"epoch {checkpoint.epoch}")
    if checkpoint is not None and checkpoint.best_prec1 is not None:
        parts.append(f"best_prec1 {checkpoint.best_prec1:.2f}")
    if checkpoint is not None and checkpoint.detection is not None:
        version = checkpoint.detection.meta.get("mmdet_version")
        parts.append(f"from a detector{f' (mmdet {version})' if version else ''}")
        return ", ".join(parts) + "; " + checkpoint.detection.describe_left_out()
    return ", ".join(parts)


def convert_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    arch: str | None = None,
    k_size: KSize = None,
    verify: bool = False,
    overwrite: bool = False,
    allow_unsafe_pickle: bool = False,
    detector: Callable[..., nnx.Module] | None = None,
    log: Callable[[str], None] = say,
) -> nnx.Module:
    """Convert a PyTorch ECA-Net checkpoint to a pretrained directory (a single file for a
    ``dst`` ending in .safetensors: ``save_pretrained``); returns the model.

    An mmdetection detector (the COCO releases) converts whole through ``detector``
    (``eca_flax.detection.io.convert_detector``, the command line's default), or with None
    keeps its ECA-ResNet under ``backbone.`` alone.
    Everything is inferred from the tensors; ``arch`` / ``k_size`` only confirm. With
    ``verify``, the PyTorch reference and the converted model must agree (``LogitComparison``)
    before anything is written. On any error nothing is written (ConversionError or
    PretrainedError with a one-line message).
    """
    check_destination(dst, overwrite)  # fail before reading a large file
    checkpoint, config = hub.read_source(src, allow_unsafe_pickle=allow_unsafe_pickle)
    files.check_apart(src, dst, ConversionError)  # a source that reads: not to be replaced
    detection = checkpoint.detection  # an mmdetection file: its backbone, num_classes 0
    spec = backbone_arch(checkpoint) if detection else infer_arch(checkpoint.state_dict)
    hub.confirm_config(spec, config, str(src))
    confirm_arch(spec, arch=arch, k_size=k_size)
    if detection and detection.left_out and detector is not None:
        return detector(checkpoint, spec, dst, verify=verify, log=log)
    model = empty_model(
        spec.arch, k_size=spec.k_size, num_classes=spec.num_classes, attention=spec.attention
    )
    try:
        load_state_dict(model, checkpoint.state_dict)
    except ConversionError as e:
        part = f" {pth.BACKBONE}*" if detection else ""
        raise ConversionError(f"{checkpoint.path}:{part} {e} (read as {spec.describe()})") from None
    model.eval()
    log(summary(spec, count_params(model), checkpoint))
    if checkpoint.arch_field and checkpoint.arch_field != spec.arch:
        log(f"note: the file's 'arch' entry says {checkpoint.arch_field!r}; ignored")
    if spec.attention is None:
        log("note: no ECA layers in this state_dict: converted as the plain model (attention=None)")
    if verify:
        rule = model_info(spec.arch).size_rule  # BoT / Halo: 256 (the size they take)
        images, what = verification_images(rule[1] if rule else 224)
        check = verify_backbone_with_torch if detection else verify_with_torch
        result = check(model, spec, checkpoint.state_dict, images)
        log(f"verify ({what}): {result.describe()}")
        if not result.ok:
            raise ConversionError(f"verification failed: {result.describe()}; nothing written")
    source = {"file": checkpoint.path.name, "sha256": checkpoint.sha256()}
    extra = {"epoch": checkpoint.epoch, "best_prec1": checkpoint.best_prec1}
    if detection:  # model.json says what the backbone came from (export_torch reads prefix)
        extra["backbone"] = {
            "prefix": pth.BACKBONE,
            "left_out": detection.left_out,
            "mmdet_meta": detection.meta,
        }
    sizes = timm_eval_sizes(spec, config, extra, log)
    save_pretrained(
        model,
        dst,
        arch=spec.arch,
        attention=spec.attention,
        source=source,
        extra=extra,
        overwrite=overwrite,
        **sizes,
    )
    log(f"wrote {dst}")
    return model


def timm_eval_sizes(
    spec: ArchSpec, config: Mapping | None, extra: dict, log: Callable[[str], None]
) -> dict[str, int]:
    """A timm model's eval preprocessing for model.json: ``extra["preprocessing"]`` (config.json's
    or the registry's) and the image_size / resize_size arguments of ``save_pretrained`` (the
    test size and floor(size / test crop_pct)); nothing for the original's models."""
    if model_info(spec.arch).source != TIMM:
        return {}
    pre = hub.eval_preprocessing(spec.arch, config)
    extra["preprocessing"] = pre
    size, crop = pre["test_input_size"], pre["test_crop_pct"]
    resize = hub.resize_for_crop(size, crop)
    log(
        f"eval preprocessing ({pre['origin']}): resize {resize} {pre['interpolation']}, "
        f"center crop {size} (crop_pct {crop})"
    )
    return {"image_size": size, "resize_size": resize}


def export_torch(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = say,
) -> dict[str, Any]:
    """Write a pretrained model's weights as a PyTorch state_dict file: torch.save's zip format,
    or safetensors for an ``out`` ending in .safetensors (``pth.save_state_dict``).

    The keys are exactly the original model's (num_batches_tracked included, as 0), without
    'module.', so ``model.load_state_dict(torch.load(out), strict=True)`` (or
    ``safetensors.torch.load_file(out)``) works on the original architecture. A backbone
    converted from a detector goes back under its ``backbone.`` prefix, without fc: a detector
    loads it with ``strict=False``. Written to a temporary file and renamed: no partial ``out``.
    """
    out = Path(out).expanduser()
    pth.check_output(out, overwrite)
    files.check_apart(src, out, ConversionError)
    backbone = read_model_json(src).get("backbone") or {}
    prefix = backbone.get("prefix", "") if isinstance(backbone, dict) else ""
    tensors = state_dict(load_pretrained(src), prefix=prefix)
    pth.save_state_dict(tensors, out)
    under = f" under {prefix} (a detector's backbone: load it with strict=False)" if prefix else ""
    log(f"wrote {out}: {len(tensors)} tensors{under}")
    return tensors
