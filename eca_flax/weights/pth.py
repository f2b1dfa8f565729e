"""PyTorch checkpoint files: reading them safely, writing state_dicts back.

``read_checkpoint`` reads what the original training script saved (torch.save's zip and legacy
formats, storages of any device, the training dict or a bare state_dict, with or without
'module.', or an mmdetection checkpoint's backbone), refusing pickles that would run code.
``save_state_dict`` writes a state_dict atomically. torch is imported inside the functions, so
importing this module needs no torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pickle
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from eca_flax.errors import ConversionError
from eca_flax.files import write_file

PREFIX = "module."
BACKBONE = "backbone."  # where mmdetection's detectors keep their backbone's keys
# Top-level modules of mmdetection detectors (two-stage, single-stage, mask heads): a state_dict
# with any of them (or with backbone.* keys, or an mmdet 'meta') is a detection checkpoint.
DETECTOR_PARTS = (
    "neck", "rpn_head", "roi_head", "bbox_head", "mask_head", "semantic_head", "mask_iou_head",
    "shared_head", "bbox_roi_extractor", "mask_roi_extractor", "panoptic_head",
)  # fmt: skip
SUPPORTED_DETECTORS = (
    "supported: mmdetection v1.x Faster R-CNN, Mask R-CNN and RetinaNet with FPN on an "
    "ECA-ResNet (the six ECA-Net COCO releases)"
)
_V1_TOPS = ("backbone", "neck", "rpn_head", "bbox_head", "mask_head")  # the keys of v1's detectors
MAX_LISTED_KEYS = 10  # error messages list this many keys, then say how many more


def strip_prefix(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the 'module.' prefix that nn.DataParallel / DDP put on every key."""
    return {k.removeprefix(PREFIX): v for k, v in state_dict.items()}


def list_keys(keys: Sequence[str]) -> str:
    """'a, b, c' -- at most MAX_LISTED_KEYS of them, then how many more."""
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return f"{shown} and {more} more" if more > 0 else shown


@dataclasses.dataclass
class Checkpoint:
    """What a .pth file holds: the state_dict (numpy, 'module.' stripped) and its metadata."""

    path: Path
    serialization: str  # "zip" or "legacy" (torch.save before PyTorch 1.6)
    state_dict: dict[str, np.ndarray]
    epoch: int | None = None
    best_prec1: float | None = None
    arch_field: str | None = None  # the file's own 'arch' entry: informative only, never trusted
    detection: Detection | None = None  # a detector's file: state_dict is its backbone's
    whole: dict[str, np.ndarray] | None = None  # a detector's file: all its tensors

    def sha256(self) -> str:
        """The hex SHA-256 of the file (recorded in model.json)."""
        return file_sha256(self.path)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass
class Detection:
    """What a detection checkpoint (mmdetection's ``{"meta", "state_dict"}``) held besides the
    backbone that ``Checkpoint.state_dict`` gets (its ``backbone.`` prefix removed)."""

    left_out: dict[str, int]  # top-level part (neck, rpn_head, ...) -> its tensors, in file order
    meta: dict[str, Any]  # mmdetection's 'meta' (mmdet_version, epoch, config, ...), JSON-safe

    def describe_left_out(self) -> str:
        """'neck, rpn_head, roi_head: 212 tensors not converted (detector parts)'."""
        if not self.left_out:
            return "no detector parts besides the backbone"
        n = sum(self.left_out.values())
        return f"{', '.join(self.left_out)}: {n} tensors not converted (detector parts)"


def _json_safe(value: Any) -> Any:
    """``value`` when JSON can hold it (tuples become lists), else None."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, list | tuple) and all(
        v is None or isinstance(v, str | bool | int | float) for v in value
    ):
        return list(value)
    return _as_number(value, float) if hasattr(value, "numel") else None


def split_detector(
    path: Path, container: Mapping[str, Any], state_dict: dict[str, np.ndarray]
) -> tuple[dict[str, np.ndarray], Detection | None]:
    """(backbone state_dict, Detection) for an mmdetection checkpoint, (state_dict, None) for
    anything else. mmdetection saves ``{"meta": {mmdet_version, config, epoch, ...},
    "state_dict": {"backbone.conv1.weight", ..., "neck.*", "rpn_head.*", "roi_head.*"}}``;
    one with no ``backbone.`` keys is a ConversionError naming what it holds."""
    meta = container.get("meta")
    meta = meta if isinstance(meta, Mapping) else {}
    tops = [key.split(".", 1)[0] for key in state_dict]
    mmdet = any(str(k).startswith("mmdet") for k in meta)
    if not (mmdet or "backbone" in tops or set(tops) & set(DETECTOR_PARTS)):
        return state_dict, None
    left_out: dict[str, int] = {}
    for top in tops:
        if top != "backbone":
            left_out[top] = left_out.get(top, 0) + 1
    detection = Detection(
        left_out=left_out,
        meta={str(k): safe for k, v in meta.items() if (safe := _json_safe(v)) is not None},
    )
    if "backbone" not in tops:
        parts = ", ".join(f"{part} ({n} tensors)" for part, n in left_out.items())
        raise ConversionError(
            f"{path}: a detection checkpoint with no {BACKBONE}* keys, so no backbone to "
            f"convert; it holds {parts}"
        )
    backbone = {
        k.removeprefix(BACKBONE): v for k, v in state_dict.items() if k.startswith(BACKBONE)
    }
    return backbone, detection


def detector_kind(path: Any, state_dict: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """'faster_rcnn', 'mask_rcnn' or 'retinanet' from a v1 state_dict's keys, or a one-line
    ConversionError saying what the file is and what is supported."""
    version = str(meta.get("mmdet_version", ""))
    major = re.match(r"(\d+)\.", version)
    roi_head = any(k.startswith("roi_head.") for k in state_dict)
    if roi_head or (major and int(major[1]) >= 2):
        what = "roi_head.* keys" if roi_head else f"mmdet_version {version}"
        raise ConversionError(
            f"{path}: an mmdetection 2.x/3.x checkpoint ({what}), not v1; {SUPPORTED_DETECTORS} "
            "(or convert its backbone with --backbone-only)"
        )
    tops = sorted({k.split(".", 1)[0] for k in state_dict} - set(_V1_TOPS))
    cascade = [k for k in state_dict if re.match(r"(bbox|mask)_head\.\d+\.", k)]
    if tops or cascade:
        found = ", ".join(tops) if tops else "several bbox_head stages (Cascade R-CNN)"
        raise ConversionError(
            f"{path}: a v1 detector with parts this converter does not know ({found}); "
            f"{SUPPORTED_DETECTORS} (or convert its backbone with --backbone-only)"
        )
    if "bbox_head.retina_cls.weight" in state_dict:
        return "retinanet"
    if "rpn_head.rpn_conv.weight" in state_dict and "bbox_head.fc_cls.weight" in state_dict:
        return "mask_rcnn" if "mask_head.conv_logits.weight" in state_dict else "faster_rcnn"
    raise ConversionError(
        f"{path}: a detector with neither RetinaNet's bbox_head.retina_cls nor the R-CNNs' "
        f"rpn_head + bbox_head.fc_cls; {SUPPORTED_DETECTORS} (or convert its backbone with "
        "--backbone-only)"
    )


def _serialization(path: Path) -> str | None:
    """'zip' or 'legacy' when the file starts like a torch.save file, else None."""
    import torch

    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    magic = torch.serialization.MAGIC_NUMBER
    if any(head.startswith(pickle.dumps(magic, protocol=p)) for p in range(2, 6)):
        return "legacy"
    return None


def _first_sentence(error: BaseException) -> str:
    """A short reason from a (possibly very long) PyTorch error message."""
    text = " ".join(str(error).split())
    text = text.split(". ")[0].rstrip(".")[:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _as_number(value: Any, kind: type) -> Any:
    """A Python int/float from a tensor, numpy or Python scalar; None when it is not one."""
    if hasattr(value, "numel") and value.numel() == 1:
        value = value.item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return kind(value)
    return None


def read_checkpoint(
    path: str | os.PathLike[str], *, allow_unsafe_pickle: bool = False
) -> Checkpoint:
    """Read a .pth / .pth.tar file the way the original saved it, refusing code-running pickles.

    Accepts torch.save's zip and legacy formats, storages tagged for any device (loaded on the
    CPU), a dict with 'state_dict' (plus 'epoch', 'arch', 'best_prec1', 'optimizer') or a bare
    state_dict, keys with or without 'module.'; an mmdetection detector's checkpoint gives its
    backbone (``split_detector``). Loads with ``weights_only=True`` unless
    ``allow_unsafe_pickle`` (trusted files only: their pickle can run arbitrary code).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConversionError(f"{path}: no such file")
    if path.is_dir():
        raise ConversionError(f"{path}: is a directory, not a .pth file")
    try:
        import torch
    except ImportError:
        raise ConversionError(
            "reading .pth files needs PyTorch: pip install torch (CPU wheels suffice)"
        ) from None
    kind = _serialization(path)
    if kind is None:
        raise ConversionError(
            f"{path}: not a PyTorch checkpoint (neither torch.save's zip nor its legacy format)"
        )
    meta, obj = _unwrap(path, _load(path, kind, allow_unsafe_pickle))
    arrays = {}
    for key, tensor in obj.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype != torch.float32:
            tensor = tensor.float()
        try:
            arrays[str(key)] = tensor.numpy()
        except (TypeError, RuntimeError):  # quantized, sparse, ...
            raise ConversionError(
                f"{path}: {key} is a {tensor.dtype} {tensor.layout} tensor, not a plain one"
            ) from None
    arch = meta.get("arch")
    whole = strip_prefix(arrays)
    state_dict, detection = split_detector(path, meta, whole)
    epoch = meta.get("epoch", detection.meta.get("epoch") if detection else None)
    return Checkpoint(
        path=path,
        serialization=kind,
        state_dict=state_dict,
        epoch=_as_number(epoch, int),
        best_prec1=_as_number(meta.get("best_prec1"), float),
        arch_field=arch if isinstance(arch, str) else None,
        detection=detection,
        whole=whole if detection else None,
    )


def _load(path: Path, kind: str, allow_unsafe_pickle: bool) -> Any:
    """torch.load on the CPU; a refused or damaged pickle becomes a ConversionError."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except MemoryError:
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            name = found.group(1).rstrip(".")
            raise ConversionError(
                f"{path}: refused: its pickle would import {name}, which can run code "
                "(a weights file holds only tensors and plain containers); if you trust the "
                "file, rerun with --allow-unsafe-pickle"
            ) from None
        raise ConversionError(
            f"{path}: truncated or corrupt {kind} PyTorch file ({_first_sentence(e)})"
        ) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise ConversionError(
            f"{path}: truncated or corrupt {kind} PyTorch file ({_first_sentence(e)})"
        ) from None


def _unwrap(path: Path, obj: Any) -> tuple[Mapping[str, Any], Mapping[str, Any]]:
    """(training metadata, state_dict of tensors) from what torch.load returned: a training
    dict with 'state_dict', a bare state_dict, or a pickled module."""
    import torch

    if isinstance(obj, torch.nn.Module):  # a whole pickled model (--allow-unsafe-pickle only)
        obj = obj.state_dict()
    meta: Mapping[str, Any] = {}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        meta, obj = obj, obj["state_dict"]
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not obj:
        what = type(obj).__name__ if not isinstance(obj, Mapping) else "an empty dict"
        raise ConversionError(f"{path}: holds {what}, not a state_dict")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if not meta and all(isinstance(k, str) for k in obj):  # a dict of something else
            raise ConversionError(
                f"{path}: holds a dict with keys {list_keys(sorted(obj))} and no 'state_dict'"
            )
        bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise ConversionError(f"{path}: state_dict entries are not tensors: {list_keys(bad)}")
    return meta, obj


def check_output(out: Path, overwrite: bool) -> None:
    """An output file path: not a directory, and not an existing file unless ``overwrite``."""
    if out.is_dir():
        raise ConversionError(f"{out}: is a directory; give a file name such as model.pth")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} already exists; pass --overwrite to replace it")


def save_state_dict(state_dict: Mapping[str, np.ndarray], out: Path) -> None:
    """Write a state_dict of numpy arrays to ``out`` with torch.save (zip format) or, for a name
    ending in .safetensors, as a safetensors file with metadata {"format": "pt"}; atomically:
    written to a temporary file beside it and renamed, so there is never a partial ``out`` (a
    full disk or Ctrl-C leave the old one, if any, and nothing else)."""
    if out.suffix.lower() == ".safetensors":
        from eca_flax.weights import safetensors_io

        metadata = {"format": safetensors_io.TORCH_FORMAT}
        safetensors_io.write_tensors(out, state_dict, metadata, ConversionError)
        return
    import torch

    tensors = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: a full disk stays an OSError (cause)
            torch.save(tensors, f)

    write_file(out, save, ConversionError)
