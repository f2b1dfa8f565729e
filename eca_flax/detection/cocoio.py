"""Images in and COCO results out: v1's OpenCV loader, the results json with v1's +1 widths and
pycocotools RLE, pictures of the detections. OpenCV and pycocotools are imported inside."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from eca_flax.detection.settings import CATEGORY_IDS, CLASSES
from eca_flax.errors import DataError


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """H x W x 3 uint8 RGB as v1 loaded it: OpenCV imread in colour (EXIF orientation applied,
    grayscale to 3 channels, alpha dropped, 16-bit scaled to 8), then BGR -> RGB."""
    import cv2

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such image file")
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(f"{path}: not an image OpenCV can read")
    return np.ascontiguousarray(bgr[:, :, ::-1])


def results(image_id: Any, det: Any, *, masks: bool = True) -> list[dict]:
    """COCO result entries of one image's detections: bbox [x1, y1, x2 - x1 + 1, y2 - y1 + 1]
    (v1), score, category_id; segmentation (RLE, counts as str) for masks."""
    out = []
    rles = None
    if masks and det.masks is not None and len(det.masks):
        from pycocotools import mask as mask_util

        rles = mask_util.encode(np.asfortranarray(det.masks.transpose(1, 2, 0).astype(np.uint8)))
    for i, (box, score, label) in enumerate(zip(det.boxes, det.scores, det.labels)):
        x1, y1, x2, y2 = (float(v) for v in box)
        entry = {
            "image_id": image_id,
            "bbox": [x1, y1, x2 - x1 + 1, y2 - y1 + 1],
            "score": float(score),
            "category_id": CATEGORY_IDS[int(label)],
        }
        if rles is not None:
            rle = dict(rles[i])
            rle["counts"] = rle["counts"].decode("ascii")
            entry["segmentation"] = rle
        out.append(entry)
    return out


def draw(rgb: np.ndarray, det: Any, score_thr: float) -> np.ndarray:
    """The image with the detections above ``score_thr``: translucent masks, boxes, class
    names and scores. Returns BGR uint8 (for cv2.imwrite)."""
    import cv2

    canvas = np.ascontiguousarray(rgb[:, :, ::-1]).copy()
    rng = np.random.default_rng(0)
    colours = rng.integers(64, 256, (len(CLASSES), 3))
    keep = det.scores > score_thr
    if det.masks is not None:
        for mask, label in zip(det.masks[keep], det.labels[keep]):
            colour = colours[label]
            canvas[mask] = (0.5 * canvas[mask] + 0.5 * colour).astype(np.uint8)
    for box, score, label in zip(det.boxes[keep], det.scores[keep], det.labels[keep]):
        colour = tuple(int(c) for c in colours[label])
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, 2)
        text = f"{CLASSES[label]} {score:.2f}"
        cv2.putText(canvas, text, (x1, max(y1 - 4, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    colour, 1, cv2.LINE_AA)  # fmt: skip
    return canvas
