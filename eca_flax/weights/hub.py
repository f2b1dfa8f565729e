"""timm's files: Hugging Face Hub folders, bare state_dicts, and timm's ECA-ResNet keys.

A Hub folder (``hf download timm/ecaresnet50t.ra2_in1k``) holds ``config.json`` (the
architecture, num_classes and ``pretrained_cfg``: input / test size, crop_pct, interpolation,
mean, std) and ``model.safetensors`` (or sharded: ``model.safetensors.index.json`` naming its
shards) or ``pytorch_model.bin`` (timm's state_dict). ``read_source`` reads such a folder or a
bare ``.safetensors`` / ``.bin`` / ``.pth`` file. ``infer_timm_arch``
tells which of timm's ECA-ResNets the tensors are (stem, blocks, groups, per-block widths,
ECA kernel sizes, classes), from the tensors alone; ``confirm_config`` then checks config.json
against them, and ``eval_preprocessing`` gives what model.json records.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from eca_flax.errors import ConversionError
from eca_flax.files import one_line
from eca_flax.models import resnet
from eca_flax.models.registry import EVAL_MEAN_STD, TIMM, list_models, model_info
from eca_flax.weights import pth
from eca_flax.weights.arch import ArchSpec, eca_kernel, head_classes
from eca_flax.weights.description import is_safetensors

CONFIG = "config.json"
SHARD_INDEX = "model.safetensors.index.json"  # sharded safetensors: {"weight_map": {key: file}}
# what timm's save_for_hf writes (and Hugging Face's sharded form), in the order they are used
HUB_WEIGHTS = ("model.safetensors", SHARD_INDEX, "pytorch_model.bin")
DEFAULT_EVAL = {"input_size": 224, "crop_pct": 0.875, "interpolation": "bicubic"}  # timm's _tcfg


# --------------------------------------------------------------------------------------------
# Reading the files.


def read_source(
    src: str | Path, *, allow_unsafe_pickle: bool = False
) -> tuple[pth.Checkpoint, dict | None]:
    """(the state_dict with its file, config.json or None) from a Hub folder or a bare file."""
    path = Path(src).expanduser()
    if not path.is_dir():
        return read_weights_file(path, allow_unsafe_pickle=allow_unsafe_pickle), None
    config_file = path / CONFIG
    if not config_file.is_file():
        raise ConversionError(
            f"{path}: is a directory without {CONFIG}, neither a Hugging Face Hub folder "
            f"({CONFIG} + {' or '.join(HUB_WEIGHTS)}) nor a state_dict file"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{config_file}: unreadable ({one_line(e)})") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{config_file}: not a JSON object")
    check_config(config, config_file)
    weights = next((path / w for w in HUB_WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise ConversionError(f"{path}: no {' or '.join(HUB_WEIGHTS)} beside {CONFIG}")
    if weights.name == SHARD_INDEX:
        return read_shards(weights), config
    return read_weights_file(weights, allow_unsafe_pickle=allow_unsafe_pickle), config


def shard_files(index: Path) -> list[str]:
    """The shard file names a ``model.safetensors.index.json`` lists (its ``weight_map``'s
    values, in first-use order); a malformed index is a one-line ConversionError."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ConversionError(f"{index}: unreadable shard index ({one_line(e)})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index}: no weight_map naming the shards")
    names = list(dict.fromkeys(str(v) for v in weight_map.values()))
    if bad := [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]:
        raise ConversionError(f"{index}: {bad[0]!r} is not a .safetensors file beside it")
    return names


def read_shards(index: Path) -> pth.Checkpoint:
    """One state_dict from the shards a ``model.safetensors.index.json`` names; each key must
    be in the shard the index says, and every shard must be there."""
    state_dict: dict[str, np.ndarray] = {}
    for name in shard_files(index):
        shard = read_weights_file(index.parent / name)
        if clash := sorted(set(shard.state_dict) & set(state_dict)):
            raise ConversionError(f"{index.parent / name}: {clash[0]} is in two shards")
        state_dict.update(shard.state_dict)
    return pth.Checkpoint(index, "safetensors", state_dict)


def read_weights_file(path: Path, *, allow_unsafe_pickle: bool = False) -> pth.Checkpoint:
    """A state_dict from a safetensors file (numpy, no torch) or a torch.save file."""
    if not is_safetensors(path):
        return pth.read_checkpoint(path, allow_unsafe_pickle=allow_unsafe_pickle)
    from safetensors import safe_open

    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            if metadata.get("format", "pt") != "pt":
                raise ConversionError(
                    f"{path}: not a PyTorch state_dict (safetensors metadata format "
                    f"{metadata.get('format')!r}); an eca_flax model file needs no conversion"
                )
            state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - SafetensorError for a bad header, OSError
        raise ConversionError(f"{path}: not a readable safetensors file ({one_line(e)})") from None
    return pth.Checkpoint(path, "safetensors", pth.strip_prefix(state_dict))


# --------------------------------------------------------------------------------------------
# Which timm ECA-ResNet the tensors are.

_BLOCK = re.compile(r"layer([1-4])\.(\d+)\.")
_ATTENTION = re.compile(r"layer([1-4])\.(\d+)\.se\.conv\.weight")


def is_timm_layout(sd: Mapping[str, Any]) -> bool:
    """timm's ResNet keys: a 3x3 stem ``conv1.0``, ECA in ``se.conv``, or an avg-down shortcut
    (a conv at ``downsample.1``; the original's ``downsample.1`` is a BN)."""
    return any(
        k == "conv1.0.weight"
        or re.fullmatch(r"layer[1-4]\.\d+\.se\.conv\.weight", k)
        or (re.fullmatch(r"layer[1-4]\.\d+\.downsample\.1\.weight", k) and np.ndim(v) == 4)
        for k, v in sd.items()
    )


def foreign_timm_model(sd: Mapping[str, Any]) -> str | None:
    """A one-line description of a timm state_dict with ``stem.*`` + ``stages.*`` keys that none
    of eca_flax's families (``weights.families``) recognised, else None."""
    if any(k.startswith("stages.") for k in sd) and any(k.startswith("stem.") for k in sd):
        return (
            f"a timm model with keys stem.*, stages.N.* ({', '.join(sorted(sd)[:2])}, ...) "
            "that is none of eca_flax's timm layouts (the ECA-ResNets of timm/models/resnet.py, "
            "ECA-VoVNet, the ECA ByobNets, the NF ECA networks)"
        )
    return None


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConversionError(f"missing key {key} of a timm ResNet block")
    return tuple(np.shape(sd[key]))


def _stem(sd: Mapping[str, Any]) -> str:
    if "conv1.weight" in sd:
        return "plain"
    first = _shape(sd, "conv1.0.weight")[0]
    stem = next((s for s, widths in resnet.STEMS.items() if widths[0] == first), None)
    if stem is None:
        raise ConversionError(
            f"conv1.0.weight has {first} filters: neither timm's deep (32) nor tiered (24) stem"
        )
    return stem


def infer_timm_arch(sd: Mapping[str, Any]) -> ArchSpec:
    """The ``ArchSpec`` of a timm ECA-ResNet state_dict, from its tensors alone: stem, blocks per
    stage, groups, every block's widths (pruned models), ECA kernel sizes per stage, classes."""
    stem = _stem(sd)
    counts = [0, 0, 0, 0]
    for key in sd:
        if m := _BLOCK.match(key):
            s = int(m.group(1)) - 1
            counts[s] = max(counts[s], int(m.group(2)) + 1)
    if not all(counts) or not any(re.fullmatch(r"layer1\.0\.conv3\.weight", k) for k in sd):
        raise ConversionError(
            f"a timm-layout ResNet with {','.join(map(str, counts))} blocks per stage and "
            "no Bottleneck conv3: not one of timm's ECA-ResNets"
        )
    widths = tuple(
        tuple(
            tuple(_shape(sd, f"layer{s + 1}.{b}.conv{c}.weight")[0] for c in (1, 2, 3))
            for b in range(n)
        )
        for s, n in enumerate(counts)
    )
    w1 = widths[0][0][0]
    groups = w1 // _shape(sd, "layer1.0.conv2.weight")[1]
    kinds: set[str] = set()
    per_stage: dict[int, set[int]] = {}
    for key, value in sd.items():
        if m := _ATTENTION.fullmatch(key):
            kind, k = eca_kernel(key, tuple(np.shape(value)))
            kinds.add(kind)
            per_stage.setdefault(int(m.group(1)) - 1, set()).add(k)
    if any(re.fullmatch(r"layer[1-4]\.\d+\.se\.fc1\.weight", k) for k in sd):
        kinds.add("se")
    if len(kinds) > 1:
        raise ConversionError(f"the state_dict mixes attention kinds {sorted(kinds)}")
    if mixed := {s: ks for s, ks in per_stage.items() if len(ks) > 1}:
        s, ks = next(iter(mixed.items()))
        raise ConversionError(f"layer{s + 1} mixes ECA kernel sizes {sorted(ks)}")
    arch = _match(stem, tuple(counts), groups, widths)
    release = model_info(arch).release_k_size
    k_size = tuple(min(per_stage.get(s, {k})) for s, k in enumerate(release))
    attention = kinds.pop() if kinds else None
    return ArchSpec(arch, k_size, head_classes(sd, "fc"), attention)


def _match(stem: str, counts: tuple[int, ...], groups: int, widths: tuple) -> str:
    """The timm model with this stem, blocks, groups and widths; else what the file holds."""
    for name in list_models(TIMM):
        info = model_info(name)
        design = info.design
        if (stem, counts, groups) != (design.stem, info.layers, design.groups):
            continue
        regular = tuple(
            ((p * design.base_width // 64 * groups,) * 2 + (p * 4,),) * n
            for p, n in zip(resnet.STAGE_WIDTHS, counts)
        )
        if widths == (design.widths or regular):
            return name
    outs = ",".join(str(stage[-1][2]) for stage in widths)
    raise ConversionError(
        f"a timm-layout ResNet ({stem} stem, {','.join(map(str, counts))} Bottleneck blocks, "
        f"{groups} groups, stage widths {outs}) that is none of timm's ECA-ResNets "
        f"({', '.join(list_models(TIMM))})"
    )


# --------------------------------------------------------------------------------------------
# config.json: checks, confirmation and eval preprocessing.


def check_config(config: Mapping, where: str | Path) -> None:
    """ConversionError naming ``where``, the key and the value for a config.json value eca_flax
    cannot use: num_classes, and pretrained_cfg's sizes, crop_pct (a crop of 0 divided by zero),
    interpolation, mean and std; absent or null values take their defaults."""

    def bad(key: str, rule: str, value: Any) -> ConversionError:
        return ConversionError(f"{where}: {key} must be {rule}, got {json.dumps(value)}")

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)

    classes = config.get("num_classes")
    if classes is not None and not (number(classes) and classes == int(classes) >= 0):
        raise bad("num_classes", "an integer >= 0", classes)
    cfg = config.get("pretrained_cfg")
    if cfg is None:
        return
    if not isinstance(cfg, Mapping):
        raise bad("pretrained_cfg", "an object", cfg)
    for key in ("input_size", "test_input_size"):
        size = cfg.get(key)
        last = size[-1] if isinstance(size, list) and size else size
        if size is not None and not (number(last) and last == int(last) >= 1):
            raise bad(f"pretrained_cfg.{key}", "a positive size or [3, H, W]", size)
    for key in ("crop_pct", "test_crop_pct"):
        crop = cfg.get(key)
        if crop is not None and not (number(crop) and 0 < crop <= 1):
            raise bad(f"pretrained_cfg.{key}", "a number in (0, 1]", crop)
    interpolation = cfg.get("interpolation")
    if interpolation is not None and interpolation not in ("bilinear", "bicubic"):
        raise bad("pretrained_cfg.interpolation", "'bilinear' or 'bicubic'", interpolation)
    for key in ("mean", "std"):
        v = cfg.get(key)
        ok = isinstance(v, list) and len(v) == 3 and all(number(x) for x in v)
        if v is not None and not (ok and (key == "mean" or min(v) > 0)):
            rule = "3 numbers" if key == "mean" else "3 numbers > 0"
            raise bad(f"pretrained_cfg.{key}", rule, v)


def confirm_config(spec: ArchSpec, config: Mapping | None, where: str) -> None:
    """config.json only confirms the tensors: a different architecture or num_classes is a
    one-line ConversionError saying what the file holds."""
    if config is None:
        return
    arch = config.get("architecture")
    if arch is not None and arch != spec.arch:
        known = "" if arch in list_models(TIMM) else " (not a model eca_flax knows)"
        raise ConversionError(
            f"{where}: {CONFIG} says architecture {arch!r}{known}, but the weights hold "
            f"{spec.describe()}"
        )
    classes = config.get("num_classes")
    if classes is not None and int(classes) != spec.num_classes:
        raise ConversionError(
            f"{where}: {CONFIG} says num_classes {classes}, but the weights hold {spec.describe()}"
        )


def _size(value: Any) -> int:
    """224 from [3, 224, 224] or 224."""
    return int(value[-1] if isinstance(value, list | tuple) else value)


def eval_preprocessing(arch: str, config: Mapping | None) -> dict:
    """What model.json records for a timm model: config.json's ``pretrained_cfg`` (a Hub
    folder) or, for a bare file, the registry's first tag (timm's defaults for an untrained
    model). ``eval_size`` / ``eval_crop_pct`` are the test size and crop the published top-1
    uses; eval preprocessing defaults to them."""
    cfg = (config or {}).get("pretrained_cfg") or {}
    info = model_info(arch)
    if cfg:
        input_size, crop = _size(cfg.get("input_size", 224)), float(cfg.get("crop_pct", 0.875))
        origin, tag = CONFIG, cfg.get("tag")
        test_size = _size(cfg.get("test_input_size") or input_size)
        test_crop = float(cfg.get("test_crop_pct") or crop)
        interpolation = cfg.get("interpolation", "bicubic")
        mean, std = cfg.get("mean", EVAL_MEAN_STD[0]), cfg.get("std", EVAL_MEAN_STD[1])
    else:
        t = info.tags[0] if info.tags else None
        tag = t.tag if t else None
        origin = f"eca_flax's registry ({arch}.{tag})" if t else "timm's defaults"
        input_size = t.input_size if t else info.default_size  # timm's cfg (224 by default)
        crop = t.crop_pct if t else info.default_crop_pct
        test_size, test_crop = (t.test_size, t.test_crop_pct) if t else (input_size, crop)
        interpolation = t.interpolation if t else DEFAULT_EVAL["interpolation"]
        mean, std = EVAL_MEAN_STD
    return {
        "origin": origin,
        "tag": tag,
        "input_size": input_size,
        "crop_pct": crop,
        "test_input_size": test_size,
        "test_crop_pct": test_crop,
        "interpolation": interpolation,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "crop_mode": "center",
    }


def resize_for_crop(size: int, crop_pct: float) -> int:
    """timm's eval resize: floor(size / crop_pct) for the shorter side."""
    return int(math.floor(size / crop_pct))
