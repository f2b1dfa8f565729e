"""v1's mask paste (facts file section 9): each 28 x 28 probability map resized with OpenCV to
its box (int32-truncated, +1 widths) in the original image, thresholded > mask_thr."""

from __future__ import annotations

import numpy as np

from eca_flax.detection.pipeline import ImageMeta


def paste_masks(
    probs: np.ndarray, scaled_boxes: np.ndarray, meta: ImageMeta, thr: float
) -> np.ndarray:
    """(N, H, W) bool masks of ``probs`` (N, 28, 28) for boxes at the test scale."""
    import cv2

    height, width = meta.ori_shape
    masks = np.zeros((len(probs), height, width), bool)
    boxes = (scaled_boxes / meta.scale).astype(np.int32)
    for i, (prob, box) in enumerate(zip(probs, boxes)):
        x1, y1 = int(box[0]), int(box[1])
        w = max(int(box[2]) - x1 + 1, 1)
        h = max(int(box[3]) - y1 + 1, 1)
        resized = cv2.resize(prob.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
        on = resized > thr
        y0, x0 = max(y1, 0), max(x1, 0)
        on = on[y0 - y1 : height - y1, x0 - x1 : width - x1]
        masks[i, y0 : y0 + on.shape[0], x0 : x0 + on.shape[1]] = on
    return masks
