"""Checking a converted model against the PyTorch original: the same logits (a detector's
backbone: the same C2-C5 features) on the same images, within ``VERIFY_TOLERANCE``
(``convert_torch_weights.py --verify`` and the tests)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import jax.numpy as jnp
import numpy as np
from flax import nnx

from eca_flax.errors import ConversionError
from eca_flax.weights.pth import strip_prefix

VERIFY_TOLERANCE = 1e-4  # max |delta logit| relative to max |logit|


class ReferenceSpec(Protocol):
    """The PyTorch network to build (``convert.ArchSpec`` is one; verify sits below convert)."""

    arch: str
    k_size: tuple[int, ...]
    num_classes: int
    attention: str | None


@dataclasses.dataclass(frozen=True)
class LogitComparison:
    """How closely two sets of logits (reference, converted) agree."""

    images: int
    max_abs: float
    relative: float  # max |delta| / max |reference logit|
    top1_agree: int
    top5_agree: int  # images whose top-5 classes are the same set

    @property
    def ok(self) -> bool:
        """Within VERIFY_TOLERANCE relative and the same top-1 class on every image."""
        return self.relative <= VERIFY_TOLERANCE and self.top1_agree == self.images

    def describe(self) -> str:
        """One line with the figures and the verdict."""
        verdict = "OK" if self.ok else f"FAILED (tolerance {VERIFY_TOLERANCE:g} relative)"
        return (
            f"max |Δlogit| {self.max_abs:.2e} ({self.relative:.2e} relative), top-1 "
            f"{self.top1_agree}/{self.images} and top-5 {self.top5_agree}/{self.images} agree: "
            f"{verdict}"
        )


def compare_logits(reference: np.ndarray, converted: np.ndarray) -> LogitComparison:
    """Compare (N, classes) logits: max absolute / relative difference, top-1/top-5 agreement."""
    ref = np.asarray(reference, np.float64)
    got = np.asarray(converted, np.float64)
    if ref.shape != got.shape or ref.ndim != 2:
        raise ValueError(f"logits must both be (N, classes), got {ref.shape} and {got.shape}")
    max_abs = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).max())
    k = min(5, ref.shape[1])
    top_ref = np.argsort(-ref, axis=1)[:, :k]
    top_got = np.argsort(-got, axis=1)[:, :k]
    return LogitComparison(
        images=ref.shape[0],
        max_abs=max_abs,
        relative=max_abs / scale if scale > 0 else max_abs,
        top1_agree=int((top_ref[:, 0] == top_got[:, 0]).sum()),
        top5_agree=sum(set(a) == set(b) for a, b in zip(top_ref, top_got)),
    )


@dataclasses.dataclass(frozen=True)
class FeatureComparison:
    """How closely two backbones' C2-C5 features (reference, converted) agree."""

    images: int
    relative: tuple[float, ...]  # per stage: max |delta| / max |reference feature|

    @property
    def ok(self) -> bool:
        """Every stage within VERIFY_TOLERANCE relative."""
        return all(r <= VERIFY_TOLERANCE for r in self.relative)

    def describe(self) -> str:
        """One line with the figures and the verdict."""
        verdict = "OK" if self.ok else f"FAILED (tolerance {VERIFY_TOLERANCE:g} relative)"
        figures = ", ".join(f"C{i + 2} {r:.2e}" for i, r in enumerate(self.relative))
        return f"max |Δfeature| relative to max |feature|: {figures}: {verdict}"


def compare_features(
    reference: Sequence[np.ndarray], converted: Sequence[np.ndarray]
) -> FeatureComparison:
    """Compare per-stage (N, H, W, C) features by max |delta| / max |reference|."""
    relative = []
    for i, (ref, got) in enumerate(zip(reference, converted, strict=True)):
        ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        if ref.shape != got.shape:
            raise ValueError(f"C{i + 2}: shapes {ref.shape} and {got.shape} differ")
        scale = float(np.abs(ref).max())
        delta = float(np.abs(ref - got).max())
        relative.append(delta / scale if scale > 0 else delta)
    return FeatureComparison(images=len(reference[0]), relative=tuple(relative))


def verification_images(image_size: int = 224, random_images: int = 2) -> tuple[np.ndarray, str]:
    """scikit-learn's two sample photos (original eval preprocessing) and random images."""
    try:
        from sklearn.datasets import load_sample_images

        from eca_flax.data import preprocess_for_eval
    except ImportError as e:
        raise ConversionError(f"--verify needs scikit-learn ({e})") from None
    photos = [
        preprocess_for_eval(Path(f).read_bytes(), image_size)
        for f in load_sample_images().filenames
    ]
    noise = np.random.default_rng(0).standard_normal((random_images, image_size, image_size, 3))
    images = np.concatenate([np.stack(photos), noise.astype(np.float32)])
    what = f"{len(photos)} photos + {random_images} random images, {image_size}x{image_size}"
    return images, what


def verify_with_torch(
    model: nnx.Module, spec: ReferenceSpec, state_dict: Mapping[str, np.ndarray], images: np.ndarray
) -> LogitComparison:
    """Run the PyTorch reference holding ``state_dict`` and ``model`` on NHWC ``images``."""
    from eca_flax.models import torch_reference

    want = torch_reference.logits(
        spec.arch,
        strip_prefix(state_dict),
        images,
        k_size=spec.k_size,
        num_classes=spec.num_classes,
        attention=spec.attention,
    )
    model.eval()
    got = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images)))
    return compare_logits(want, got)


def verify_backbone_with_torch(
    model: nnx.Module, spec: ReferenceSpec, state_dict: Mapping[str, np.ndarray], images: np.ndarray
) -> FeatureComparison:
    """C2-C5 of the PyTorch reference holding a backbone ``state_dict`` (no fc) and of
    ``model.stage_features`` on NHWC ``images``."""
    import torch

    from eca_flax.models import torch_reference

    reference = torch_reference.build(spec.arch, k_size=spec.k_size, attention=spec.attention)
    weights = {k: torch.from_numpy(np.asarray(v)) for k, v in strip_prefix(state_dict).items()}
    reference.load_state_dict(weights, strict=False)  # the converter has checked every key
    want = torch_reference.stage_features(reference.eval(), images)
    model.eval()
    got = nnx.jit(lambda m, x: m.stage_features(x))(model, jnp.asarray(images))
    return compare_features(want, [np.asarray(g) for g in got])
