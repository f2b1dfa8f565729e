"""Whole v1 detectors from mmdetection checkpoints, and the converted directory.

A converted detector is a directory: ``model.json`` (format, kind, backbone arch and kernel
sizes, the test settings, classes, source file) and ``weights.safetensors`` (v1's state_dict
keys and PyTorch layouts, so the file is also what a v1 detector loads). ``load_detector(DST)``
builds the Detector and copies the weights in by the converter's key rule.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from eca_flax.detection.settings import CLASSES, TestSettings
from eca_flax.errors import ConversionError
from eca_flax.weights.pth import detector_kind

FORMAT = "eca_flax.detector/1"
WEIGHTS = "weights.safetensors"
MODEL_JSON = "model.json"


def detector_from_state_dict(
    state_dict: Mapping[str, np.ndarray],
    kind: str,
    arch: str,
    k_size: tuple[int, ...],
    attention: str | None = "eca",
    settings: TestSettings | None = None,
):
    """A Detector holding a v1 state_dict (numpy, v1 keys); ConversionError names missing,
    unexpected or mis-shaped keys (GN heads, another head size, ...)."""
    from flax import nnx

    from eca_flax.detection.detectors import Detector
    from eca_flax.weights.convert import load_state_dict

    # no random initialisation: every variable is then set from the state_dict (strict)
    detector = nnx.eval_shape(
        lambda: Detector(kind, arch, k_size, attention=attention, settings=settings)
    )
    load_state_dict(detector, state_dict)
    detector.eval()
    return detector


def save_detector(
    state_dict: Mapping[str, np.ndarray], dst: str | os.PathLike[str], description: dict
) -> None:
    """Write DST (model.json + weights.safetensors) atomically: never half-written."""
    from eca_flax import files
    from eca_flax.weights import safetensors_io

    dst = Path(dst).expanduser()

    def fill(tmp: Path) -> None:
        (tmp / MODEL_JSON).write_text(json.dumps(description, indent=2) + "\n")
        arrays = {k: np.asarray(v) for k, v in state_dict.items()}
        safetensors_io.write_tensors(tmp / WEIGHTS, arrays, {"format": "pt"}, ConversionError)

    files.write_directory(dst, fill, ConversionError)


def describe(kind: str, spec: Any, settings: TestSettings, source: dict, meta: dict) -> dict:
    """model.json of a converted detector."""
    return {
        "format": FORMAT,
        "kind": kind,
        "arch": spec.arch,
        "k_size": list(spec.k_size),
        "attention": spec.attention,
        "num_classes": len(CLASSES),
        "classes": list(CLASSES),
        "test": settings.to_json(),
        "source": source,
        "mmdet_meta": meta,
    }


def load_detector(
    path: str | os.PathLike[str],
    *,
    settings: TestSettings | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    force_download: bool = False,
):
    """The Detector converted to ``path`` (``convert_torch_weights.py SRC DST``), or one of the
    six releases by name (``mask_rcnn_ecanet50_k3377``, ``python -m eca_flax.weights list``):
    the authors' file downloaded from Google Drive, checked, converted and cached on first use
    (``eca_flax.weights.download``; offline, a cached one loads with no request). ``settings``
    replaces the test settings of its model.json."""
    from safetensors.numpy import load_file

    from eca_flax.detection.settings import RELEASES, release

    path = Path(path).expanduser()
    if not path.exists():
        if not release(os.fspath(path)):
            close = difflib.get_close_matches(os.fspath(path), RELEASES, n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ConversionError(
                f"{path}: no such converted detector and not a released one; {hint}python -m "
                "eca_flax.weights list shows the six releases"
            )
        from eca_flax.weights.download import resolve

        path = resolve(
            os.fspath(path),
            cache_dir=cache_dir,
            force_download=force_download,
            detector=convert_detector,
        )
    meta_path = path / MODEL_JSON
    if not meta_path.is_file() or not (path / WEIGHTS).is_file():
        raise ConversionError(
            f"{path}: not a converted detector (no {MODEL_JSON} and {WEIGHTS}); convert one "
            "with python convert_torch_weights.py DETECTOR.pth DST"
        )
    try:
        description = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{meta_path}: unreadable ({e})") from None
    if description.get("format") != FORMAT:
        raise ConversionError(f"{meta_path}: format {description.get('format')!r}, not {FORMAT}")
    if settings is None:
        settings = TestSettings.from_json(description.get("test"))
    state = load_file(str(path / WEIGHTS))
    return detector_from_state_dict(
        state,
        description["kind"],
        description["arch"],
        tuple(description["k_size"]),
        description.get("attention", "eca"),
        settings,
    )


def convert_detector(
    checkpoint: Any, spec: Any, dst: str | os.PathLike[str], *, verify: bool, log: Any
) -> Any:
    """The whole v1 detector of ``checkpoint`` (pth.Checkpoint of an mmdetection file, its
    backbone read as ``spec``) to ``dst``; returns the Detector. Nothing is written on error."""
    from eca_flax.models.registry import count_params

    detection = checkpoint.detection
    whole = checkpoint.whole
    kind = detector_kind(checkpoint.path, whole, detection.meta)
    try:
        detector = detector_from_state_dict(whole, kind, spec.arch, spec.k_size, spec.attention)
    except ConversionError as e:
        raise ConversionError(
            f"{checkpoint.path}: {e} (read as a v1 {kind} on {spec.describe()})"
        ) from None
    version = detection.meta.get("mmdet_version")
    parts = [
        f"{kind} on {spec.arch}",
        f"k={','.join(map(str, spec.k_size))}",
        f"{count_params(detector):,} params",
    ]
    if checkpoint.epoch is not None:
        parts.append(f"epoch {checkpoint.epoch}")
    if version:
        parts.append(f"mmdet {version}")
    log(", ".join(parts))
    if verify:
        from eca_flax.weights.verify import verification_images, verify_backbone_with_torch

        images, what = verification_images(224)
        result = verify_backbone_with_torch(detector.backbone, spec, checkpoint.state_dict, images)
        log(f"verify backbone ({what}): {result.describe()}")
        if not result.ok:
            raise ConversionError(f"verification failed: {result.describe()}; nothing written")
    source = {"file": checkpoint.path.name, "sha256": checkpoint.sha256()}
    description = describe(kind, spec, detector.settings, source, detection.meta)
    tensors = {
        k: np.asarray(v, np.float32) if np.asarray(v).dtype.kind == "f" else np.asarray(v)
        for k, v in whole.items()
    }
    save_detector(tensors, dst, description)
    log(f"wrote {dst}")
    return detector
