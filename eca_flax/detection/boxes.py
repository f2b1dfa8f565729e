"""The sparse, host-side part of v1's test time in float32 numpy (facts file sections 3-7):
anchors, the box coder, NMS with the +1 IoU and multi-class NMS. Boxes are (x1, y1, x2, y2)
covering pixels x1..x2 inclusive (width x2 - x1 + 1)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

F32 = np.float32
RPN_STDS = (1.0, 1.0, 1.0, 1.0)
RCNN_STDS = (0.1, 0.1, 0.2, 0.2)
MAX_RATIO = abs(math.log(16 / 1000))  # dw, dh clamp


def base_anchors(base: int, scales: Sequence[float], ratios: Sequence[float]) -> np.ndarray:
    """(A, 4) float32 anchors of one level, ratio-major, rounded half to even (v1 / torch.round).

    Ratio is h / w; centre (base - 1) / 2; corners centre -+ (size - 1) / 2.
    """
    w = h = F32(base)
    ctr = F32(0.5) * (w - F32(1))
    h_ratios = np.sqrt(np.asarray(ratios, F32))
    w_ratios = F32(1) / h_ratios
    scales = np.asarray(scales, F32)
    ws = (w * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h * h_ratios[:, None] * scales[None, :]).reshape(-1)
    half_w, half_h = F32(0.5) * (ws - F32(1)), F32(0.5) * (hs - F32(1))
    corners = np.stack([ctr - half_w, ctr - half_h, ctr + half_w, ctr + half_h], axis=-1)
    return np.round(corners).astype(F32)


def rpn_anchor_base(stride: int) -> np.ndarray:
    """The two-stage RPN's 3 anchors of a level (scale 8, ratios 0.5, 1, 2)."""
    return base_anchors(stride, [8.0], [0.5, 1.0, 2.0])


def retina_anchor_base(stride: int) -> np.ndarray:
    """RetinaNet's 9 anchors of a level (scales 4 * 2^(i/3), ratios 0.5, 1, 2)."""
    return base_anchors(stride, [4 * 2 ** (i / 3) for i in range(3)], [0.5, 1.0, 2.0])


def anchors_at(base: np.ndarray, stride: int, index: np.ndarray, width: int) -> np.ndarray:
    """Anchors of flat indices ``index`` into a (height, ``width``, A) grid, row-major."""
    a = len(base)
    cell, k = np.divmod(index, a)
    y, x = np.divmod(cell, width)
    shift = np.stack([x, y, x, y], axis=-1).astype(F32) * F32(stride)
    return base[k] + shift


def delta2bbox(
    rois: np.ndarray,
    deltas: np.ndarray,
    stds: Sequence[float],
    max_shape: tuple[int, int],
) -> np.ndarray:
    """v1's delta2bbox: rois (N, 4), deltas (N, 4k) -> boxes (N, 4k), clipped to max_shape (h, w).

    Means are 0. pw = x2 - x1 + 1; x1' = gx - gw/2 + 0.5, x2' = gx + gw/2 - 0.5.
    """
    d = deltas.astype(F32).reshape(len(deltas), -1, 4) * np.asarray(stds, F32)
    dx, dy, dw, dh = d[..., 0], d[..., 1], d[..., 2], d[..., 3]
    dw = np.clip(dw, -MAX_RATIO, MAX_RATIO).astype(F32)
    dh = np.clip(dh, -MAX_RATIO, MAX_RATIO).astype(F32)
    r = rois.astype(F32)
    px = ((r[:, 0] + r[:, 2]) * F32(0.5))[:, None]
    py = ((r[:, 1] + r[:, 3]) * F32(0.5))[:, None]
    pw = (r[:, 2] - r[:, 0] + F32(1))[:, None]
    ph = (r[:, 3] - r[:, 1] + F32(1))[:, None]
    gw = pw * np.exp(dw)
    gh = ph * np.exp(dh)
    gx = px + pw * dx
    gy = py + ph * dy
    x1 = gx - gw * F32(0.5) + F32(0.5)
    y1 = gy - gh * F32(0.5) + F32(0.5)
    x2 = gx + gw * F32(0.5) - F32(0.5)
    y2 = gy + gh * F32(0.5) - F32(0.5)
    h, w = max_shape
    x1, x2 = (np.clip(v, 0, w - 1) for v in (x1, x2))
    y1, y2 = (np.clip(v, 0, h - 1) for v in (y1, y2))
    return np.stack([x1, y1, x2, y2], axis=-1).astype(F32).reshape(len(deltas), -1)


def iou_one(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU (float32, +1 widths) of one box with each of ``boxes``."""
    left = np.maximum(box[0], boxes[:, 0])
    top = np.maximum(box[1], boxes[:, 1])
    right = np.minimum(box[2], boxes[:, 2])
    bottom = np.minimum(box[3], boxes[:, 3])
    iw = np.maximum(right - left + F32(1), F32(0))
    ih = np.maximum(bottom - top + F32(1), F32(0))
    inter = iw * ih
    area = (box[2] - box[0] + F32(1)) * (box[3] - box[1] + F32(1))
    areas = (boxes[:, 2] - boxes[:, 0] + F32(1)) * (boxes[:, 3] - boxes[:, 1] + F32(1))
    return inter / (area + areas - inter)


def nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    """Greedy NMS by decreasing score (stable), suppressing IoU > thr; kept indices ascending."""
    boxes = boxes.astype(F32)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(boxes), bool)
    keep = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou_one(boxes[i], boxes) > F32(thr)
    return np.sort(np.asarray(keep, np.int64))


def multiclass_nms(
    boxes: np.ndarray, scores: np.ndarray, score_thr: float, nms_thr: float, max_num: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """v1's multiclass_nms: scores (N, 81) with background in column 0, boxes (N, 4) shared or
    (N, 324) per class. -> boxes (M, 4), scores (M,), labels (M,) 0..79, at most max_num."""
    n_cls = scores.shape[1]
    out_boxes, out_scores, out_labels = [], [], []
    for i in range(1, n_cls):
        chosen = scores[:, i] > F32(score_thr)
        if not chosen.any():
            continue
        cls_boxes = boxes[chosen, :4] if boxes.shape[1] == 4 else boxes[chosen, 4 * i : 4 * i + 4]
        cls_scores = scores[chosen, i]
        keep = nms(cls_boxes, cls_scores, nms_thr)
        out_boxes.append(cls_boxes[keep])
        out_scores.append(cls_scores[keep])
        out_labels.append(np.full(len(keep), i - 1, np.int64))
    if not out_boxes:
        return np.zeros((0, 4), F32), np.zeros(0, F32), np.zeros(0, np.int64)
    b, s, lab = (np.concatenate(x) for x in (out_boxes, out_scores, out_labels))
    if len(s) > max_num:
        top = np.argsort(-s, kind="stable")[:max_num]
        b, s, lab = b[top], s[top], lab[top]
    return b.astype(F32), s.astype(F32), lab
