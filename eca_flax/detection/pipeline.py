"""v1's test pipeline (facts file section 1): keep-ratio resize with OpenCV, normalize, pad to
multiples of 32; and the shape buckets the padded images are run in."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from eca_flax.detection.settings import TestSettings


@dataclasses.dataclass(frozen=True)
class ImageMeta:
    """v1's img_meta: ori_shape (H, W), img_shape (h', w'), pad_shape, the single scale s, and
    the bucket (the array shape the dense part runs on; pad_shape's area is what counts)."""

    ori_shape: tuple[int, int]
    img_shape: tuple[int, int]
    pad_shape: tuple[int, int]
    scale: float
    bucket: tuple[int, int]


def rescale_size(height: int, width: int, img_scale: tuple[int, int]) -> tuple[int, int, float]:
    """(h', w', s) of mmcv0's keep-ratio rescale: s = min(long / max, short / min), sizes
    int(x * s + 0.5)."""
    long, short = max(img_scale), min(img_scale)
    s = min(long / max(height, width), short / min(height, width))
    return int(height * s + 0.5), int(width * s + 0.5), s


def check_rgb(rgb: Any) -> np.ndarray:
    """An H x W x 3 uint8 array, or a ValueError / TypeError saying what it is instead."""
    if not isinstance(rgb, np.ndarray):
        what = type(rgb).__name__
        raise TypeError(f"detect takes an H x W x 3 uint8 RGB numpy array, got {what}")
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"detect takes an H x W x 3 RGB image, got shape {rgb.shape}")
    if rgb.dtype != np.uint8:
        raise ValueError(f"detect takes a uint8 image, got {rgb.dtype}")
    if min(rgb.shape[:2]) < 1:
        raise ValueError(f"empty image of shape {rgb.shape}")
    return rgb


def bucket_shape(pad: tuple[int, int], settings: TestSettings) -> tuple[int, int]:
    """The array shape a padded image of shape ``pad`` runs in."""
    d = settings.size_divisor
    long = math.ceil(max(settings.img_scale) / d) * d
    short = math.ceil(min(settings.img_scale) / d) * d
    if settings.buckets == "exact":
        return pad
    options = [(long, long)] if settings.buckets == "square" else [(short, long), (long, short)]
    for h, w in options:
        if pad[0] <= h and pad[1] <= w:
            return h, w
    return pad  # outside the buckets (an img_scale smaller than the image's): its own shape


def preprocess(rgb: np.ndarray, settings: TestSettings) -> tuple[np.ndarray, ImageMeta]:
    """(1 x Hb x Wb x 3 float32 normalized RGB, zero beyond img_shape, ImageMeta)."""
    import cv2

    rgb = check_rgb(rgb)
    height, width = rgb.shape[:2]
    h, w, s = rescale_size(height, width, settings.img_scale)
    if min(h, w) < 1:
        raise ValueError(
            f"image of {height} x {width} pixels is too elongated: it rescales to {h} x {w}"
        )
    resized = cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
    mean = np.asarray(settings.mean, np.float64)
    stdinv = 1.0 / np.asarray(settings.std, np.float64)
    img = ((resized.astype(np.float32) - mean) * stdinv).astype(np.float32)
    d = settings.size_divisor
    pad = (math.ceil(h / d) * d, math.ceil(w / d) * d)
    bucket = bucket_shape(pad, settings)
    out = np.zeros((1, *bucket, 3), np.float32)
    out[0, :h, :w] = img
    meta = ImageMeta((height, width), (h, w), pad, s, bucket)
    return out, meta
