"""RandAugment on PIL images, in timm's variant (the one "ResNet strikes back" trains with).

A spec string as timm writes it, ``rand-m6-mstd0.5-inc1`` (A3; A1/A2 use ``rand-m7-mstd0.5-inc1``):
``m`` magnitude (0-10, default 10), ``n`` operations per image (default 2), ``mstd`` standard
deviation of the magnitude noise (default 0), ``inc1`` the "increasing" op list (severity grows
with the magnitude for every op). Per image: ``n`` ops drawn uniformly, with replacement; each is
applied with probability 0.5, at magnitude N(m, mstd) clipped to [0, 10] drawn anew per op;
signed ops (rotate, shear, translate, the increasing enhancements) take either sign with
probability 1/2. Magnitude -> argument, at level L = magnitude / 10:

    AutoContrast, Equalize, Invert      no argument
    Rotate                              +-30 L degrees (counter-clockwise for +)
    Posterize / PosterizeIncreasing     keep int(4 L) / 4 - int(4 L) most significant bits
    Solarize / SolarizeIncreasing       invert pixels >= int(256 L) / 256 - int(256 L)
    SolarizeAdd                         add int(110 L) to pixels < 128 (saturating)
    Color, Contrast, Brightness,        factor 0.1 + 1.8 L; Increasing: max(0.1, 1 +- 0.9 L)
      Sharpness (+ Increasing)            (PIL ImageEnhance: 1 = unchanged)
    ShearX, ShearY                      +-0.3 L (affine shear)
    TranslateXRel, TranslateYRel        +-0.45 L of the width / height

Geometric ops fill with the ImageNet mean colour (124, 116, 104) and resample bilinearly (timm
draws bilinear or bicubic per op when its train interpolation is "random"). All randomness comes
from the numpy Generator the pipeline seeds per (seed, epoch, index), so a resumed run sees the
same augmented images. Our own implementation on PIL's ImageOps / ImageEnhance / transform.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_MAX = 10.0  # magnitudes are on timm's 0..10 scale
OP_PROB = 0.5  # each drawn op is applied with this probability
FILL = (124, 116, 104)  # round(255 * transforms.MEAN_RGB), timm's img_mean
RESAMPLE = Image.BILINEAR

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS ("inc1"), in timm's order.
OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """A parsed spec: ``num_ops`` ops per image at ``magnitude`` +- ``magnitude_std``."""

    magnitude: float = LEVEL_MAX
    num_ops: int = 2
    magnitude_std: float = 0.0
    increasing: bool = False

    @property
    def ops(self) -> tuple[str, ...]:
        return INCREASING_OPS if self.increasing else OPS


def parse(spec: str) -> RandAugment | None:
    """``"rand-m6-mstd0.5-inc1"`` -> RandAugment(6, 2, 0.5, True); ``""`` -> None.

    ValueError naming the bad section otherwise.
    """
    if not spec:
        return None
    head, *sections = spec.split("-")
    if head != "rand":
        raise ValueError(
            f"randaugment={spec!r}: must start with 'rand' (e.g. 'rand-m6-mstd0.5-inc1')"
        )
    fields: dict[str, float] = {}
    for section in sections:
        m = re.fullmatch(r"(m|n|mstd|inc)(\d+(?:\.\d+)?)", section)
        if not m:
            raise ValueError(
                f"randaugment={spec!r}: unknown section {section!r}; use mM, nN, mstdS, inc0/inc1"
            )
        fields[m[1]] = float(m[2])
    out = RandAugment(
        magnitude=fields.get("m", LEVEL_MAX),
        num_ops=int(fields.get("n", 2)),
        magnitude_std=fields.get("mstd", 0.0),
        increasing=bool(fields.get("inc", 0)),
    )
    if not 0 <= out.magnitude <= LEVEL_MAX or out.num_ops < 1:
        raise ValueError(f"randaugment={spec!r}: needs 0 <= m <= 10 and n >= 1")
    return out


# ------------------------------------------------------------------------------------------
# The operations: op(image, argument, resample) -> image.


def _affine(image: Image.Image, coeffs: tuple, resample: int) -> Image.Image:
    """PIL's inverse map: output pixel (x, y) samples input (a x + b y + c, d x + e y + f)."""
    return image.transform(image.size, Image.AFFINE, coeffs, resample=resample, fillcolor=FILL)


def rotate(image: Image.Image, degrees: float, resample: int = RESAMPLE) -> Image.Image:
    return image.rotate(degrees, resample=resample, fillcolor=FILL)


def shear_x(image: Image.Image, factor: float, resample: int = RESAMPLE) -> Image.Image:
    return _affine(image, (1, factor, 0, 0, 1, 0), resample)


def shear_y(image: Image.Image, factor: float, resample: int = RESAMPLE) -> Image.Image:
    return _affine(image, (1, 0, 0, factor, 1, 0), resample)


def translate_x(image: Image.Image, fraction: float, resample: int = RESAMPLE) -> Image.Image:
    return _affine(image, (1, 0, fraction * image.size[0], 0, 1, 0), resample)


def translate_y(image: Image.Image, fraction: float, resample: int = RESAMPLE) -> Image.Image:
    return _affine(image, (1, 0, 0, 0, 1, fraction * image.size[1]), resample)


def posterize(image: Image.Image, bits: int, resample: int = RESAMPLE) -> Image.Image:
    return image if bits >= 8 else ImageOps.posterize(image, bits)


def solarize(image: Image.Image, threshold: int, resample: int = RESAMPLE) -> Image.Image:
    return ImageOps.solarize(image, threshold)


def solarize_add(image: Image.Image, add: int, resample: int = RESAMPLE) -> Image.Image:
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def _enhance(kind: type) -> Callable[..., Image.Image]:
    return lambda image, factor, resample=RESAMPLE: kind(image).enhance(factor)


def _plain(fn: Callable[[Image.Image], Image.Image]) -> Callable[..., Image.Image]:
    return lambda image, arg=None, resample=RESAMPLE: fn(image)


# ------------------------------------------------------------------------------------------
# Magnitude (0..10) -> argument; ``rng`` draws the sign of the signed ones.


def _signed(scale: float) -> Callable[[float, np.random.Generator], float]:
    return lambda m, rng: (m / LEVEL_MAX) * scale * (-1.0 if rng.random() < 0.5 else 1.0)


def _enhance_increasing(m: float, rng: np.random.Generator) -> float:
    return max(0.1, 1.0 + _signed(0.9)(m, rng))


_POSTERIZE = lambda m, rng: int(m / LEVEL_MAX * 4)  # noqa: E731
_SOLARIZE = lambda m, rng: int(m / LEVEL_MAX * 256)  # noqa: E731
_ENHANCE = lambda m, rng: m / LEVEL_MAX * 1.8 + 0.1  # noqa: E731
_NONE = lambda m, rng: None  # noqa: E731

# name -> (operation, magnitude -> argument)
OPERATIONS: dict[str, tuple[Callable[..., Image.Image], Callable]] = {
    "AutoContrast": (_plain(ImageOps.autocontrast), _NONE),
    "Equalize": (_plain(ImageOps.equalize), _NONE),
    "Invert": (_plain(ImageOps.invert), _NONE),
    "Rotate": (rotate, _signed(30.0)),
    "Posterize": (posterize, _POSTERIZE),
    "PosterizeIncreasing": (posterize, lambda m, rng: 4 - _POSTERIZE(m, rng)),
    "Solarize": (solarize, _SOLARIZE),
    "SolarizeIncreasing": (solarize, lambda m, rng: 256 - _SOLARIZE(m, rng)),
    "SolarizeAdd": (solarize_add, lambda m, rng: int(m / LEVEL_MAX * 110)),
    "Color": (_enhance(ImageEnhance.Color), _ENHANCE),
    "ColorIncreasing": (_enhance(ImageEnhance.Color), _enhance_increasing),
    "Contrast": (_enhance(ImageEnhance.Contrast), _ENHANCE),
    "ContrastIncreasing": (_enhance(ImageEnhance.Contrast), _enhance_increasing),
    "Brightness": (_enhance(ImageEnhance.Brightness), _ENHANCE),
    "BrightnessIncreasing": (_enhance(ImageEnhance.Brightness), _enhance_increasing),
    "Sharpness": (_enhance(ImageEnhance.Sharpness), _ENHANCE),
    "SharpnessIncreasing": (_enhance(ImageEnhance.Sharpness), _enhance_increasing),
    "ShearX": (shear_x, _signed(0.3)),
    "ShearY": (shear_y, _signed(0.3)),
    "TranslateXRel": (translate_x, _signed(0.45)),
    "TranslateYRel": (translate_y, _signed(0.45)),
}


def sample_magnitude(ra: RandAugment, rng: np.random.Generator) -> float:
    """The magnitude of one applied op: N(m, mstd) clipped to [0, 10] (m itself if mstd = 0)."""
    m = rng.normal(ra.magnitude, ra.magnitude_std) if ra.magnitude_std > 0 else ra.magnitude
    return min(max(float(m), 0.0), LEVEL_MAX)


def plan(ra: RandAugment, rng: np.random.Generator) -> list[tuple[str, object]]:
    """The ops one image gets, with their arguments: [(name, argument), ...] (skipped ops left out).

    Draw order: the ``num_ops`` op indices, then per op: apply?, magnitude, sign.
    """
    names = [ra.ops[int(i)] for i in rng.integers(0, len(ra.ops), size=ra.num_ops)]
    chosen = []
    for name in names:
        if rng.random() >= OP_PROB:
            continue
        chosen.append((name, OPERATIONS[name][1](sample_magnitude(ra, rng), rng)))
    return chosen


def apply(image: Image.Image, ra: RandAugment, rng: np.random.Generator) -> Image.Image:
    """RandAugment of one RGB image (same size, uint8)."""
    for name, arg in plan(ra, rng):
        image = OPERATIONS[name][0](image, arg)
    return image
