"""RandAugment (data/randaugment.py) and Mixup / CutMix (training/mixing.py) against their
definitions: each op on a small image against a numpy statement of it, the op list and the
magnitude mapping of timm's RandAugment, the label mass and box-area distribution of the mixing.

Statistical checks draw N samples and allow 4.5 standard errors (a false failure about once in
150,000 runs; the draws are seeded, so a given version passes or fails deterministically).
"""

from __future__ import annotations

import io
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from scipy import stats

from eca_flax.data import randaugment as ra
from eca_flax.data import transforms
from eca_flax.training import mixing

Z = 4.5  # standard errors allowed in the statistical checks

# ------------------------------------------------------------------------------------------
# RandAugment.

# timm's _RAND_INCREASING_TRANSFORMS (timm/data/auto_augment.py), the "inc1" list of
# rand-m6-mstd0.5-inc1 ("ResNet strikes back", A3).
TIMM_INCREASING_OPS = (
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

# timm's level -> argument functions, at magnitudes 0, 6 and 10: {magnitude: set of arguments}
# (both signs for the signed ops).
LEVELS = {
    "Rotate": {0: {0.0}, 6: {-18.0, 18.0}, 10: {-30.0, 30.0}},
    "Posterize": {0: {0}, 6: {2}, 10: {4}},
    "PosterizeIncreasing": {0: {4}, 6: {2}, 10: {0}},
    "Solarize": {0: {0}, 6: {153}, 10: {256}},
    "SolarizeIncreasing": {0: {256}, 6: {103}, 10: {0}},
    "SolarizeAdd": {0: {0}, 6: {66}, 10: {110}},
    "Color": {0: {0.1}, 6: {1.18}, 10: {1.9}},
    "ColorIncreasing": {0: {1.0}, 6: {0.46, 1.54}, 10: {0.1, 1.9}},
    "ShearX": {0: {0.0}, 6: {-0.18, 0.18}, 10: {-0.3, 0.3}},
    "TranslateYRel": {0: {0.0}, 6: {-0.27, 0.27}, 10: {-0.45, 0.45}},
    "AutoContrast": {6: {None}},
}


def test_op_list_and_spec_parsing() -> None:
    assert ra.INCREASING_OPS == TIMM_INCREASING_OPS
    assert set(ra.OPS) == {n.replace("Increasing", "") for n in TIMM_INCREASING_OPS}
    a3 = ra.parse("rand-m6-mstd0.5-inc1")
    assert (a3.magnitude, a3.num_ops, a3.magnitude_std, a3.ops) == (6, 2, 0.5, TIMM_INCREASING_OPS)
    assert ra.parse("rand-m9-n3") == ra.RandAugment(9, 3, 0.0, False)
    assert ra.parse("") is None
    for bad in ("rand-m6-x1", "augmix-m3", "rand-m12"):
        with pytest.raises(ValueError, match="randaugment="):
            ra.parse(bad)


@pytest.mark.parametrize("name", sorted(LEVELS))
def test_magnitude_to_argument(name: str) -> None:
    level_fn = ra.OPERATIONS[name][1]
    for magnitude, want in LEVELS[name].items():
        got = {level_fn(magnitude, np.random.default_rng(seed)) for seed in range(40)}
        got = {round(v, 9) if isinstance(v, float) else v for v in got}
        assert got == want, (name, magnitude)
    for variant in ("Contrast", "Brightness", "Sharpness"):  # the same mappings as Color
        assert ra.OPERATIONS[variant][1] is ra.OPERATIONS["Color"][1]
        assert ra.OPERATIONS[variant + "Increasing"][1] is ra.OPERATIONS["ColorIncreasing"][1]


def test_magnitude_noise_and_op_draws() -> None:
    """Magnitude N(6, 0.5) clipped to [0, 10]; 2 ops drawn uniformly, each applied with p 0.5."""
    rng = np.random.default_rng(0)
    n = 20000
    a3 = ra.parse("rand-m6-mstd0.5-inc1")
    m = np.array([ra.sample_magnitude(a3, rng) for _ in range(n)])
    assert abs(m.mean() - 6.0) < Z * 0.5 / math.sqrt(n)
    assert abs(m.std() - 0.5) < Z * 0.5 / math.sqrt(2 * n)  # SE of a normal sample's std
    top = np.array([ra.sample_magnitude(ra.RandAugment(10, 2, 0.5), rng) for _ in range(n)])
    assert top.max() == 10.0 and abs((top == 10.0).mean() - 0.5) < Z * 0.5 / math.sqrt(n)
    plans = [ra.plan(a3, rng) for _ in range(n)]
    applied = np.array([len(p) for p in plans])
    assert applied.max() == 2 and abs(applied.mean() - 1.0) < Z * math.sqrt(0.5) / math.sqrt(n)
    counts = np.array([sum(name == op for p in plans for op, _ in p) for name in a3.ops])
    assert stats.chisquare(counts).pvalue > 1e-5  # uniform over the 15 ops


# The ops against numpy statements of them, on a random 13x17 RGB image.
H, W = 13, 17
X = np.random.default_rng(1).integers(0, 256, (H, W, 3)).astype(np.uint8)
XF = X.astype(np.float64)
FILL = np.asarray(ra.FILL)


def blend(degenerate: np.ndarray | float, factor: float) -> np.ndarray:
    """PIL ImageEnhance: degenerate + factor (image - degenerate), clipped, truncated to uint8."""
    return np.floor(np.clip(degenerate + factor * (XF - degenerate), 0, 255))


def luma() -> np.ndarray:
    """PIL's "L": ITU-R 601-2 luma, rounded."""
    return np.floor(XF @ np.array([0.299, 0.587, 0.114]) + 0.5)[..., None]


def smoothed() -> np.ndarray:
    """PIL's SMOOTH filter: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; border kept."""
    out = XF.copy()
    kernel = np.ones((3, 3)) + 4 * np.eye(3)[1][:, None] * np.eye(3)[1]
    for i in range(1, H - 1):
        for j in range(1, W - 1):
            out[i, j] = np.floor(
                (XF[i - 1 : i + 2, j - 1 : j + 2] * kernel[..., None]).sum((0, 1)) / 13 + 0.5
            )
    return out


def equalized() -> np.ndarray:
    """Histogram equalization per channel: step = (N - count of the top level) // 255,
    lut[v] = (step // 2 + #pixels below v) // step."""
    out = np.empty_like(X)
    for ch in range(3):
        hist = np.bincount(X[..., ch].ravel(), minlength=256)
        step = (hist.sum() - hist[np.nonzero(hist)[0][-1]]) // 255
        below = np.concatenate([[0], np.cumsum(hist)[:-1]])
        out[..., ch] = ((step // 2 + below) // step)[X[..., ch]] if step else X[..., ch]
    return out


def inverse_affine(coeffs: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-neighbour inverse affine map (PIL's convention: output pixel centre (x + 0.5,
    y + 0.5) samples input (a x + b y + c, d x + e y + f), floored); outside: the fill colour.
    Also the pixels whose sample point lies within 1e-9 of a pixel edge (either side is right)."""
    a, b, c, d, e, f = coeffs
    x, y = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    xs, ys = a * x + b * y + c, d * x + e * y + f
    xi, yi = np.floor(xs).astype(int), np.floor(ys).astype(int)
    inside = (xi >= 0) & (xi < W) & (yi >= 0) & (yi < H)
    out = np.broadcast_to(FILL, X.shape).copy()
    out[inside] = X[yi[inside], xi[inside]]
    tie = (np.abs(xs - np.round(xs)) < 1e-9) | (np.abs(ys - np.round(ys)) < 1e-9)
    return out, tie


def rotation(degrees: float) -> tuple[float, ...]:
    """Inverse map of a counter-clockwise rotation (y down) about the image centre."""
    t, cx, cy = math.radians(degrees), W / 2, H / 2
    a, b, d, e = math.cos(t), -math.sin(t), math.sin(t), math.cos(t)
    return a, b, cx - a * cx - b * cy, d, e, cy - d * cx - e * cy


PIXEL_OPS = {
    "Invert": (None, lambda: 255 - XF),
    "Posterize2": (2, lambda: XF.astype(int) & 0b11000000),
    "Solarize103": (103, lambda: np.where(XF >= 103, 255 - XF, XF)),
    "SolarizeAdd66": (66, lambda: np.where(XF < 128, np.minimum(XF + 66, 255), XF)),
    "Brightness1.54": (1.54, lambda: blend(0.0, 1.54)),
    "Contrast0.46": (0.46, lambda: blend(math.floor(luma().mean() + 0.5), 0.46)),
    "Color1.9": (1.9, lambda: blend(luma(), 1.9)),
    "Sharpness0.1": (0.1, lambda: blend(smoothed(), 0.1)),
    "Equalize": (None, equalized),
    "AutoContrast": (None, lambda: np.floor((XF - XF.min((0, 1))) * 255 / np.ptp(XF, (0, 1)))),
}


@pytest.mark.parametrize("case", sorted(PIXEL_OPS))
def test_pixel_op_definition(case: str) -> None:
    name = case.rstrip("0123456789.")
    arg, reference = PIXEL_OPS[case]
    got = np.asarray(ra.OPERATIONS[name][0](Image.fromarray(X), arg)).astype(np.float64)
    # PIL's 8-bit arithmetic is exact against these statements (truncating blend, rounded luma
    # and smoothing); autocontrast's float LUT may land a value exactly on an integer from
    # either side: one level allowed there.
    np.testing.assert_allclose(got, reference(), atol=1 if name == "AutoContrast" else 0)


GEOMETRIC = [
    ("ShearX", 0.18, (1, 0.18, 0, 0, 1, 0)),
    ("ShearX", -0.3, (1, -0.3, 0, 0, 1, 0)),
    ("ShearY", 0.3, (1, 0, 0, 0.3, 1, 0)),
    ("TranslateXRel", 0.27, (1, 0, 0.27 * W, 0, 1, 0)),
    ("TranslateYRel", -0.45, (1, 0, 0, 0, 1, -0.45 * H)),
    ("Rotate", 18.0, rotation(18.0)),
    ("Rotate", -30.0, rotation(-30.0)),
]


@pytest.mark.parametrize("name,arg,coeffs", GEOMETRIC)
def test_geometric_op_definition(name: str, arg: float, coeffs: tuple) -> None:
    """Nearest-neighbour resampling isolates the geometry (the pipeline resamples bilinearly)."""
    got = np.asarray(ra.OPERATIONS[name][0](Image.fromarray(X), arg, Image.NEAREST))
    want, tie = inverse_affine(coeffs)
    assert not ((got != want).any(-1) & ~tie).any()


def test_integer_translation_is_exact_with_bilinear() -> None:
    got = np.asarray(ra.translate_x(Image.fromarray(X), 3 / W))
    np.testing.assert_array_equal(got[:, : W - 3], X[:, 3:])
    np.testing.assert_array_equal(got[:, W - 3 :], np.broadcast_to(FILL, (H, 3, 3)))


def test_train_transform_randaugment_is_deterministic_per_example() -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 30, 3), np.uint8)).save(
        buf, "PNG"
    )
    a3 = ra.parse("rand-m6-mstd0.5-inc1")
    run = lambda key, spec: transforms.train_transform(  # noqa: E731
        buf.getvalue(), np.random.default_rng(key), 24, randaugment=spec
    )
    np.testing.assert_array_equal(run([0, 3, 7], a3), run([0, 3, 7], a3))
    changed = sum(not np.array_equal(run([0, 3, i], a3), run([0, 3, i], None)) for i in range(20))
    assert changed >= 10  # P(no op applied) = 1/4 per image


# ------------------------------------------------------------------------------------------
# Mixup and CutMix.

RSB = mixing.Mixing(mixup_alpha=0.1, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0)


def batch(b: int = 6, h: int = 8, w: int = 10, k: int = 7) -> tuple[jax.Array, jax.Array]:
    """Image i is constant i + 1 in every pixel; labels i mod k, one-hot."""
    images = jnp.broadcast_to(jnp.arange(1.0, b + 1)[:, None, None, None], (b, h, w, 3))
    return images, jax.nn.one_hot(jnp.arange(b) % k, k)


KINDS = {
    "mixup": mixing.Mixing(mixup_alpha=0.4),
    "cutmix": mixing.Mixing(cutmix_alpha=1.0),
    "off": mixing.Mixing(mixup_alpha=0.1, cutmix_alpha=1.0, prob=0.0),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_label_mass_equals_pixel_mass(kind: str) -> None:
    """Targets are lam e_i + (1 - lam) e_partner (rows sum to 1), and lam is image i's share of
    the mixed image: its blend weight (Mixup) or its uncovered pixel fraction (CutMix)."""
    images, onehot = batch()
    own = np.arange(1.0, images.shape[0] + 1)[:, None, None, None]
    mix = jax.jit(mixing.mix_batch, static_argnums=3)
    for seed in range(20):
        mixed, targets, lam = mix(jax.random.key(seed), images, onehot, KINDS[kind])
        np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
        np.testing.assert_allclose(targets, lam * onehot + (1 - lam) * onehot[::-1], rtol=1e-6)
        if kind == "cutmix":
            share = (np.asarray(mixed) == own).mean((1, 2, 3))
            np.testing.assert_allclose(share, float(lam), rtol=1e-6)  # every image, exactly
        else:
            want = np.broadcast_to(lam * own + (1 - lam) * own[::-1], mixed.shape)
            np.testing.assert_allclose(mixed, want, rtol=1e-6)
        if kind == "off":
            assert float(lam) == 1.0 and (np.asarray(mixed) == np.asarray(images)).all()


def test_lam_distributions_and_switch() -> None:
    """RSB's settings: CutMix in half the batches; Mixup lam ~ Beta(0.1, 0.1), CutMix's drawn
    lam ~ Beta(1, 1): P(lam < t) at several t within Z binomial standard errors. (Not a KS test:
    in float32, Beta(0.1, 0.1) puts ~10% of its draws within 6e-8 of 1, which round to 1.0.)"""
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    use_cutmix, lam = jax.jit(jax.vmap(lambda k: mixing.sample(k, RSB)))(keys)
    use_cutmix, lam = np.asarray(use_cutmix), np.asarray(lam, np.float64)
    assert abs(use_cutmix.mean() - 0.5) < Z * 0.5 / math.sqrt(n)
    for draws, dist in ((lam[~use_cutmix], stats.beta(0.1, 0.1)), (lam[use_cutmix], stats.uniform)):
        for t in (1e-6, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
            p = dist.cdf(t)
            assert abs((draws < t).mean() - p) < Z * math.sqrt(p * (1 - p) / len(draws)), t


def expected_box_fraction(height: int, width: int, grid: int = 200_000) -> tuple[float, float]:
    """Mean and std of the CutMix box's area fraction for lam ~ Beta(1, 1) = U(0, 1), from the
    definition: sides floor(S sqrt(1 - lam)), halved around a centre uniform over the pixels,
    clipped to the image; integrated over lam on a fine grid, exactly over the centres."""
    lam = (np.arange(grid) + 0.5) / grid

    def side(size: int) -> tuple[np.ndarray, np.ndarray]:  # E[length], E[length^2] given lam
        half = np.floor(size * np.sqrt(1 - lam)).astype(int)[:, None] // 2
        c = np.arange(size)[None]
        length = np.clip(c + half, 0, size) - np.clip(c - half, 0, size)
        return length.mean(1), (length.astype(np.float64) ** 2).mean(1)

    (mh, sh), (mw, sw) = side(height), side(width)
    mean = (mh * mw).mean() / (height * width)
    second = (sh * sw).mean() / (height * width) ** 2
    return mean, math.sqrt(second - mean**2)


def test_cutmix_box_area_distribution() -> None:
    height, width, n = 24, 32, 20000
    keys = jax.random.split(jax.random.key(1), n)
    lam_in = jax.random.uniform(jax.random.key(2), (n,))
    boxes = jax.jit(jax.vmap(lambda k, lam: mixing.cutmix_box(k, lam, height, width)))(keys, lam_in)
    top, bottom, left, right = (np.asarray(v) for v in boxes)
    assert (top >= 0).all() and (top <= bottom).all() and (bottom <= height).all()
    assert (left >= 0).all() and (left <= right).all() and (right <= width).all()
    area = (bottom - top) * (right - left) / (height * width)
    mean, std = expected_box_fraction(height, width)
    assert abs(area.mean() - mean) < Z * std / math.sqrt(n)
    # Unclipped (centre far enough inside), the box covers about 1 - lam.
    full = (bottom - top == 2 * (np.floor(height * np.sqrt(1 - lam_in)) // 2)) & (
        right - left == 2 * (np.floor(width * np.sqrt(1 - lam_in)) // 2)
    )
    assert full.mean() > 0.2
    np.testing.assert_allclose(
        area[full], 1 - np.asarray(lam_in)[full], atol=4 / min(height, width)
    )
