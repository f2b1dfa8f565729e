"""The original's image transforms, torchvision's semantics on PIL images, in uint8.

Train: RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3)) + RandomHorizontalFlip;
eval: Resize(round(size * 256 / 224)) + CenterCrop(size), bilinear (timm's models: their own
sizes, bicubic, recorded in model.json). Both decode with PIL (``convert("RGB")``
like torchvision's ImageFolder loader) and return uint8 HWC arrays; the normalization
(``x / 255 - mean) / std``) happens on the device, in the jitted steps. Randomness comes from a
numpy Generator the caller seeds per example, so a transform is a pure function of its inputs.
"""

from __future__ import annotations

import io
import math
import re
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from eca_flax.data import randaugment as ra
from eca_flax.weights.eval_resize import default_resize_size

MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)
RATIO_RANGE = (3 / 4, 4 / 3)
# torchvision's InterpolationMode names -> PIL filters (what Resize uses on PIL images).
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# What PIL raises for files it cannot decode (truncated, corrupt, not an image at all).
DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


def decode_problem(error: BaseException, data: bytes) -> str:
    """What one of DECODE_ERRORS says of an image, for the one line naming its file."""
    if isinstance(error, Image.DecompressionBombError):
        sizes = re.findall(r"\d+", str(error))
        pixels = f"{int(sizes[0]):,} pixels, " if len(sizes) >= 2 else ""
        limit = f" of {int(sizes[1]):,}" if len(sizes) >= 2 else ""
        return f"too large ({pixels}over PIL's limit{limit} against decompression bombs)"
    if isinstance(error, UnidentifiedImageError):  # its message is a BytesIO repr
        reason = "not an image, or a format PIL does not know" if len(data) else "empty file"
    else:
        reason = " ".join(str(error).split())[:160] or type(error).__name__
    return f"not a decodable image ({reason})"


def decode(data: bytes, exif_orientation: bool = False, allow_large: bool = False) -> Image.Image:
    """An encoded image (JPEG, PNG, ...; grayscale, CMYK, palette, 16-bit) as an RGB PIL image.

    ``exif_orientation``: turned as its EXIF Orientation tag says (a phone's "rotate 90"), as
    photo viewers and transformers' image loading show it; predict does. The datasets keep the
    stored pixels, as torchvision's ImageFolder loader reads them (the original's training).
    ``allow_large``: images over PIL's limit against decompression bombs are read too.
    Raises one of DECODE_ERRORS for data PIL cannot decode completely (or too large).
    """
    with _open(data, allow_large) as image:
        image.load()  # decode now: a truncated file raises here, not later
        if exif_orientation:
            image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):
            image = to_8_bits(image)
        elif image.mode == "P" and "transparency" in image.info:
            # The same RGB as convert("RGB"), without PIL's warning that such palette images
            # "should be converted to RGBA images" on stderr.
            image = image.convert("RGBA")
        # convert() of an RGB image is a full copy (PIL's): RGB JPEGs are returned as decoded.
        return image if image.mode == "RGB" else image.convert("RGB")


# PIL checks its limit against decompression bombs (Image.MAX_IMAGE_PIXELS, process-wide) when
# it opens a file; ``_open`` lifts it for one image without changing it for anyone else: every
# open in eca_flax holds this lock, so no other thread opens while the limit is lifted.
_OPENING = threading.Lock()


def _open(data: bytes, allow_large: bool) -> Image.Image:
    """Image.open of ``data``, over PIL's pixel limit too if ``allow_large`` (the limit as it
    was afterwards)."""
    with _OPENING:
        if not allow_large:
            return Image.open(io.BytesIO(data))
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = limit


def to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit grayscale image (PIL's "I;16*" modes, or "I" as PIL reads some 16-bit PNGs and
    TIFFs) as 8-bit "L", scaled by 255/65535 (0 -> 0, 65535 -> 255): PIL's convert() clips the
    values at 255 instead, which turned such images almost white."""
    x = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.round(np.clip(x, 0, 65535) / 257).astype(np.uint8), "L")


def interpolation_filter(name: str) -> int:
    """The PIL filter of "bilinear" or "bicubic"; ValueError naming the choices otherwise."""
    try:
        return INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"interpolation {name!r}; choices: {', '.join(INTERPOLATIONS)}") from None


def resize_shorter(image: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """torchvision Resize(size): the shorter side to ``size``, the longer to
    int(size * long / short), bilinear or bicubic (PIL antialiases when shrinking)."""
    resample = interpolation_filter(interpolation)
    w, h = image.size
    if min(w, h) == size:
        return image
    if w <= h:
        return image.resize((size, int(size * h / w)), resample)
    return image.resize((int(size * w / h), size), resample)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision CenterCrop(size): top = int(round((h - size) / 2.0)), round half to even."""
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def eval_transform(
    data: bytes,
    image_size: int,
    resize_size: int | None = None,
    interpolation: str = "bilinear",
    exif_orientation: bool = False,
    allow_large: bool = False,
) -> np.ndarray:
    """Decode (``decode``: ``exif_orientation`` turns the image as its EXIF tag says,
    ``allow_large`` reads images over PIL's pixel limit), Resize(resize_size) +
    CenterCrop(image_size): uint8 (S, S, 3), exactly PIL's."""
    resize_size = default_resize_size(image_size) if resize_size is None else resize_size
    if resize_size < image_size:
        raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size}")
    image = decode(data, exif_orientation, allow_large)
    resized = resize_shorter(image, resize_size, interpolation)
    return np.asarray(center_crop(resized, image_size))


# The original's eval preprocessing (``eval_settings`` of a pretrained model gives a model's own).
ORIGINAL_EVAL = {
    "image_size": 224,
    "resize_size": None,  # the 256/224 ratio
    "crop_pct": None,
    "interpolation": "bilinear",
    "mean": MEAN_RGB,
    "std": STD_RGB,
}


def eval_settings(meta: Mapping) -> dict[str, Any]:
    """The eval preprocessing a model.json records (``meta``), as ``ORIGINAL_EVAL``'s keys.
    timm's models record theirs under "preprocessing" (test size, crop_pct, bicubic, mean,
    std); the original's are their image_size / resize_size, bilinear, ImageNet mean/std."""
    size = int(meta.get("image_size") or 224)
    pre = meta.get("preprocessing") or {}
    return {
        "image_size": size,
        "resize_size": int(meta.get("resize_size") or default_resize_size(size)),
        "crop_pct": pre.get("test_crop_pct"),
        "interpolation": pre.get("interpolation", ORIGINAL_EVAL["interpolation"]),
        "mean": tuple(pre.get("mean", ORIGINAL_EVAL["mean"])),
        "std": tuple(pre.get("std", ORIGINAL_EVAL["std"])),
    }


def override_eval(
    settings: dict,
    image_size: int | None = None,
    resize_size: int | None = None,
    interpolation: str | None = None,
) -> dict:
    """``settings`` (like ORIGINAL_EVAL) with the given fields replaced. Another ``image_size``
    without ``resize_size`` resizes to floor(size / crop_pct) for a model with a crop_pct
    (timm's), else by the original's 256/224 ratio."""
    out = dict(settings)
    if image_size is not None:
        crop_pct = out.get("crop_pct")
        out["image_size"] = int(image_size)
        out["resize_size"] = int(math.floor(image_size / crop_pct)) if crop_pct else None
    if resize_size is not None:
        out["resize_size"] = int(resize_size)
    if interpolation is not None:
        interpolation_filter(interpolation)
        out["interpolation"] = interpolation
    return out


def normalize(
    images: Any,
    mean: tuple[float, ...] = MEAN_RGB,
    std: tuple[float, ...] = STD_RGB,
) -> Any:
    """uint8 RGB -> (x / 255 - mean) / std in float32: the one normalization. A numpy array (or
    an image) stays on the host; a jax array (the jitted steps normalize on the device, so the
    host sends a quarter of the bytes) stays a jax array."""
    x = images if hasattr(images, "astype") else np.asarray(images)
    x = x.astype(np.float32) / 255.0
    return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = RATIO_RANGE,
) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, h, w) of the crop.

    Ten draws of (area fraction uniform in ``scale``, log aspect uniform in log ``ratio``); the
    first that fits is placed uniformly. Else the central crop with the aspect clamped to
    ``ratio``. Python's round (half to even) as torchvision's ``int(round(...))``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def parse_augment(augment: str) -> int | None:
    """'inception_crop' -> None; 'pad_crop:N' -> N (pixels of random shift)."""
    if augment == "inception_crop":
        return None
    if augment.startswith("pad_crop:") and augment[9:].isdigit():
        return int(augment[9:])
    raise ValueError(f"augment={augment!r}: choose 'inception_crop' or 'pad_crop:N' (N pixels)")


def train_transform(
    data: bytes,
    rng: np.random.Generator,
    image_size: int,
    area_range: tuple[float, float] = (0.08, 1.0),
    augment: str = "inception_crop",
    hflip: bool = True,
    randaugment: ra.RandAugment | None = None,
    allow_large: bool = False,
) -> np.ndarray:
    """Train augmentation of one encoded image (``decode``; ``allow_large`` as there): uint8
    (S, S, 3).

    "inception_crop": RandomResizedCrop(image_size, scale=area_range) bilinear; "pad_crop:N":
    fit to image_size as eval does (no zoom), then a random shift of up to N px (zero fill),
    for small images. Then a horizontal flip with probability 0.5 if ``hflip``, then
    ``randaugment`` (data/randaugment.py) if given, as in timm's train transform.
    """
    pad = parse_augment(augment)
    image = decode(data, allow_large=allow_large)
    if pad is None:
        top, left, h, w = random_resized_crop_box(*image.size, rng, area_range)
        image = image.resize(
            (image_size, image_size), Image.BILINEAR, box=(left, top, left + w, top + h)
        )
        if hflip and rng.random() < 0.5:  # in PIL: no extra numpy copy (and no GIL held)
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        out = np.asarray(image)
    else:
        fitted = np.asarray(center_crop(resize_shorter(image, image_size), image_size))
        padded = np.pad(fitted, ((pad, pad), (pad, pad), (0, 0)))
        dy, dx = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
        out = padded[dy : dy + image_size, dx : dx + image_size]
        if hflip and rng.random() < 0.5:
            out = out[:, ::-1]
    if randaugment is not None:
        out = np.asarray(ra.apply(Image.fromarray(np.ascontiguousarray(out)), randaugment, rng))
    return np.ascontiguousarray(out)
