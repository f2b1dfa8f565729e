"""Mixup and CutMix of a training batch, on the device, inside the jitted train step.

As timm's batch mode (what "ResNet strikes back" uses): per batch, with probability ``prob`` the
batch is mixed with itself reversed (sample i with sample B-1-i); when both are on, CutMix is
chosen with probability ``switch_prob``, else Mixup. Mixup: lam ~ Beta(mixup_alpha, mixup_alpha),
images lam x + (1 - lam) x_reversed. CutMix (Yun et al. 2019): lam ~ Beta(cutmix_alpha,
cutmix_alpha), a box of floor(H sqrt(1 - lam)) x floor(W sqrt(1 - lam)) pixels (each side halved
around a centre drawn uniformly over the image, then clipped to it) is pasted from the reversed
batch, and lam becomes the uncovered fraction, 1 - box area / (H W). Targets are the one-hot
labels mixed with the same lam, so each row sums to 1.

Why on the device: the mixing is a batch-level blend, a few elementwise passes over a batch the
accelerator holds anyway, while the host pipeline stays per-example and sends uint8. The
randomness is a key folded from the run's seed and the step, and the step is the data position,
so a resumed run mixes exactly as an uninterrupted one. (timm mixes each process's local batch;
here the global batch is mixed as one, the same distribution.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections


@dataclasses.dataclass(frozen=True)
class Mixing:
    """Mixup / CutMix settings (alpha 0: that one is off)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    switch_prob: float = 0.5
    prob: float = 1.0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Mixing | None:
        """The config's mixing, or None when both alphas are 0 (no mixing)."""
        mixing = cls(
            config.mixup_alpha, config.cutmix_alpha, config.mixup_switch_prob, config.mixup_prob
        )
        return mixing if mixing.mixup_alpha > 0 or mixing.cutmix_alpha > 0 else None


def sample(key: jax.Array, mixing: Mixing) -> tuple[jax.Array, jax.Array]:
    """(use_cutmix, lam) of one batch; lam = 1 (and no CutMix) when the batch is not mixed."""
    k_apply, k_switch, k_mixup, k_cutmix = jax.random.split(key, 4)
    if mixing.mixup_alpha > 0 and mixing.cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < mixing.switch_prob
    else:
        use_cutmix = jnp.asarray(mixing.cutmix_alpha > 0)
    lam_mixup = lam_cutmix = jnp.float32(1.0)
    if mixing.mixup_alpha > 0:
        lam_mixup = jax.random.beta(k_mixup, mixing.mixup_alpha, mixing.mixup_alpha)
    if mixing.cutmix_alpha > 0:
        lam_cutmix = jax.random.beta(k_cutmix, mixing.cutmix_alpha, mixing.cutmix_alpha)
    apply = jax.random.uniform(k_apply) < mixing.prob
    lam = jnp.where(use_cutmix, lam_cutmix, lam_mixup)
    return use_cutmix & apply, jnp.where(apply, lam, 1.0).astype(jnp.float32)


def cutmix_box(
    key: jax.Array, lam: jax.Array, height: int, width: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(top, bottom, left, right) of the pasted box, rows [top, bottom), columns [left, right)."""
    k_y, k_x = jax.random.split(key)
    ratio = jnp.sqrt(1.0 - lam)
    half_h = jnp.floor(height * ratio).astype(jnp.int32) // 2
    half_w = jnp.floor(width * ratio).astype(jnp.int32) // 2
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    return (
        jnp.clip(cy - half_h, 0, height),
        jnp.clip(cy + half_h, 0, height),
        jnp.clip(cx - half_w, 0, width),
        jnp.clip(cx + half_w, 0, width),
    )


def mix_batch(
    key: jax.Array, images: jax.Array, targets: jax.Array, mixing: Mixing
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Mixed (images (B, H, W, C) float, targets (B, K)) and the lam used.

    ``targets`` are the batch's one-hot (or smoothed) labels; the result's rows are
    lam * targets + (1 - lam) * targets reversed.
    """
    k_sample, k_box = jax.random.split(key)
    use_cutmix, lam = sample(k_sample, mixing)
    height, width = images.shape[1:3]
    top, bottom, left, right = cutmix_box(k_box, lam, height, width)
    rows, cols = jnp.arange(height), jnp.arange(width)
    inside = ((rows >= top) & (rows < bottom))[:, None] & ((cols >= left) & (cols < right))[None]
    reversed_images = images[::-1]
    pasted = jnp.where(inside[None, :, :, None], reversed_images, images)
    blended = lam * images + (1.0 - lam) * reversed_images
    box_lam = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    lam = jnp.where(use_cutmix, box_lam, lam)
    images = jnp.where(use_cutmix, pasted, blended)
    return images, lam * targets + (1.0 - lam) * targets[::-1], lam
