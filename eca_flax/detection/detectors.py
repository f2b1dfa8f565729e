"""The three detectors of the ECA-Net COCO releases as one NNX module (facts file): RetinaNet,
Faster R-CNN and Mask R-CNN on eca_flax's ECA-ResNet, with v1's test-time post-processing.

``detect(rgb)`` runs three stages: the dense part (backbone, FPN, dense heads and their top
anchors per level) as one jitted program per shape bucket, the proposals / NMS on the host in
float32 numpy, then (two-stage) RoIAlign + the box head and (Mask R-CNN) RoIAlign + the mask
head as jitted programs of fixed size, and the mask paste with OpenCV.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eca_flax.detection import backbone as backbone_lib
from eca_flax.detection import boxes as B
from eca_flax.detection.dense_heads import RetinaHead, RPNHead
from eca_flax.detection.necks import FPN
from eca_flax.detection.pipeline import ImageMeta, preprocess
from eca_flax.detection.roi_align import roi_align
from eca_flax.detection.roi_heads import BBoxHead, MaskHead
from eca_flax.detection.settings import KINDS, TestSettings
from eca_flax.models.registry import create_model

Array = jax.Array
ROI_STRIDES = (4, 8, 16, 32)  # RoIAlign pools P2..P5


@dataclasses.dataclass
class Detections:
    """One image's detections in original-image pixels (x2, y2 inclusive, v1's convention).

    ``labels`` are 0..79 in v1's class order (``settings.CLASSES``; ``category_ids()`` maps them
    to COCO ids); ``masks`` (N, H, W) bool for Mask R-CNN, else None; ``proposals`` (two-stage)
    the RPN's boxes at the test scale, with ``proposal_scores``; ``meta`` the image's shapes.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    meta: ImageMeta
    proposals: np.ndarray | None = None
    proposal_scores: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.scores)


class Detector(nnx.Module):
    """A v1 detector: ``kind`` "faster_rcnn", "mask_rcnn" or "retinanet" on ECA-ResNet ``arch``
    (eca_resnet50 / eca_resnet101) with ECA kernel sizes ``k_size``. Attributes follow v1's
    state_dict (``backbone``, ``neck``, ``rpn_head``, ``bbox_head``, ``mask_head``)."""

    def __init__(
        self,
        kind: str,
        arch: str = "eca_resnet50",
        k_size: Any = None,
        *,
        attention: str | None = "eca",
        settings: TestSettings | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        if kind not in KINDS:
            raise ValueError(f"unknown detector kind {kind!r}; choices: {', '.join(KINDS)}")
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.kind = kind
        self.settings = settings or TestSettings()
        self.backbone = create_model(
            arch, k_size=k_size, num_classes=0, attention=attention, rngs=rngs
        )
        if kind == "retinanet":
            self.neck = FPN(1, True, rngs=rngs)
            self.bbox_head = RetinaHead(rngs=rngs)
        else:
            self.neck = FPN(0, False, rngs=rngs)
            self.rpn_head = RPNHead(rngs=rngs)
            self.bbox_head = BBoxHead(rngs=rngs)
            if kind == "mask_rcnn":
                self.mask_head = MaskHead(rngs=rngs)
        self.eval()

    # ---- device stages ------------------------------------------------------------------

    def fpn(self, image: Array, valid: Array) -> list[Array]:
        """FPN levels (P2..P6 or P3..P7, (1, H, W, 256)) of a bucket-shaped normalized image
        whose padded area is ``valid`` (height, width)."""
        features = backbone_lib.stage_features(self.backbone, image, valid)
        return self.neck(features, valid)

    def dense(self, image: Array, valid: Array) -> tuple[list[Array], list[tuple[Array, ...]]]:
        """(FPN levels, per level the top anchors: index, scores, deltas, inside)."""
        levels = self.fpn(image, valid)
        strides = self.neck.strides()
        if self.kind == "retinanet":
            return levels, self.bbox_head.select(levels, strides, valid, self.settings.nms_pre)
        return levels, self.rpn_head.select(levels, strides, valid, self.settings.rpn_nms_pre)

    def box_stage(self, levels: list[Array], rois: Array, valid: Array) -> tuple[Array, Array]:
        """(softmax scores (R, 81), deltas (R, 324)) of proposals ``rois`` (R, 4)."""
        feats = roi_align(_roi_levels(levels), rois, ROI_STRIDES, _valid(valid), 7)
        return self.bbox_head(feats)

    def mask_stage(self, levels: list[Array], rois: Array, labels: Array, valid: Array) -> Array:
        """(R, 28, 28) mask probabilities of detections ``rois`` (test scale) and ``labels``."""
        feats = roi_align(_roi_levels(levels), rois, ROI_STRIDES, _valid(valid), 14)
        return self.mask_head(feats, labels)

    # ---- the whole test time -------------------------------------------------------------

    def detect(self, rgb: np.ndarray) -> Detections:
        """Detections of one H x W x 3 uint8 RGB image, exactly as v1 at test time."""
        image, meta = preprocess(rgb, self.settings)
        graphdef, state = nnx.split(self)
        valid = jnp.asarray(meta.pad_shape, jnp.int32)
        levels, picked = _dense(graphdef, state, image, valid)
        picked = jax.device_get(picked)
        strides = self.neck.strides()
        widths = [lv.shape[2] for lv in levels]
        if self.kind == "retinanet":
            return self._retina_post(picked, strides, widths, meta)
        proposals, p_scores = self._proposals(picked, strides, widths, meta)
        s = self.settings
        rois = np.zeros((s.rpn_max_num, 4), np.float32)
        rois[: len(proposals)] = proposals
        scores, deltas = jax.device_get(_boxes(graphdef, state, levels, rois, valid))
        n = len(proposals)
        boxes = B.delta2bbox(proposals, deltas[:n], B.RCNN_STDS, meta.img_shape)
        boxes = boxes / np.float32(meta.scale)
        det_boxes, det_scores, labels = B.multiclass_nms(
            boxes, scores[:n], s.score_thr, s.nms_thr, s.max_per_img
        )
        masks = None
        if self.kind == "mask_rcnn":
            masks = self._masks(graphdef, state, levels, valid, det_boxes, labels, meta)
        return Detections(det_boxes, det_scores, labels, masks, meta, proposals, p_scores)

    def _proposals(self, picked, strides, widths, meta) -> tuple[np.ndarray, np.ndarray]:
        s = self.settings
        all_boxes, all_scores = [], []
        for (index, scores, deltas, inside), stride, width in zip(picked, strides, widths):
            index, scores, deltas = index[inside], scores[inside], deltas[inside]
            anchors = B.anchors_at(B.rpn_anchor_base(stride), stride, index, width)
            boxes = B.delta2bbox(anchors, deltas, B.RPN_STDS, meta.img_shape)
            keep = B.nms(boxes, scores, s.rpn_nms_thr)[: s.rpn_nms_post]
            all_boxes.append(boxes[keep])
            all_scores.append(scores[keep])
        boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
        top = np.argsort(-scores, kind="stable")[: s.rpn_max_num]
        return boxes[top], scores[top]

    def _retina_post(self, picked, strides, widths, meta) -> Detections:
        s = self.settings
        all_boxes, all_scores = [], []
        for (index, scores, deltas, inside), stride, width in zip(picked, strides, widths):
            index, scores, deltas = index[inside], scores[inside], deltas[inside]
            anchors = B.anchors_at(B.retina_anchor_base(stride), stride, index, width)
            all_boxes.append(B.delta2bbox(anchors, deltas, B.RPN_STDS, meta.img_shape))
            all_scores.append(scores)
        boxes = np.concatenate(all_boxes) / np.float32(meta.scale)
        scores = np.concatenate(all_scores)
        scores = np.concatenate([np.zeros((len(scores), 1), np.float32), scores], axis=1)
        det = B.multiclass_nms(boxes, scores, s.score_thr, s.nms_thr, s.max_per_img)
        return Detections(*det, None, meta)

    def _masks(self, graphdef, state, levels, valid, boxes, labels, meta) -> np.ndarray:
        from eca_flax.detection.paste import paste_masks

        s = self.settings
        scaled = (boxes * np.float32(meta.scale)).astype(np.float32)
        rois = np.zeros((s.max_per_img, 4), np.float32)
        rois[: len(boxes)] = scaled
        lab = np.zeros(s.max_per_img, np.int32)
        lab[: len(labels)] = labels
        probs = jax.device_get(_mask_probs(graphdef, state, levels, rois, lab, valid))
        return paste_masks(probs[: len(boxes)], scaled, meta, s.mask_thr)


def _roi_levels(levels: list[Array]) -> list[Array]:
    return [lv[0] for lv in levels[:4]]


def _valid(valid: Array) -> list[tuple[Array, Array]]:
    return [(valid[0] // st, valid[1] // st) for st in ROI_STRIDES]


@functools.partial(jax.jit, static_argnums=0)
def _dense(graphdef, state, image, valid):
    return nnx.merge(graphdef, state).dense(image, valid)


@functools.partial(jax.jit, static_argnums=0)
def _boxes(graphdef, state, levels, rois, valid):
    return nnx.merge(graphdef, state).box_stage(levels, rois, valid)


@functools.partial(jax.jit, static_argnums=0)
def _mask_probs(graphdef, state, levels, rois, labels, valid):
    return nnx.merge(graphdef, state).mask_stage(levels, rois, labels, valid)


def compiled_programs() -> int:
    """How many programs the detectors' jitted stages have compiled in this process."""
    return sum(f._cache_size() for f in (_dense, _boxes, _mask_probs))


def build_detector(
    kind: str,
    arch: str = "eca_resnet50",
    k_size: Any = None,
    *,
    settings: TestSettings | None = None,
    seed: int = 0,
) -> Detector:
    """A detector with random weights (PyTorch's default init), in eval mode: for research
    or as the start of fine-tuning. ``k_size`` as ``create_model`` takes it."""
    return Detector(kind, arch, k_size, settings=settings, rngs=nnx.Rngs(seed))


def export_stages(
    detector: Detector, platform: str, bucket: tuple[int, int] = (800, 1344)
) -> dict[str, Any]:
    """The detector's jitted stages exported with ``jax.export`` for ``platform`` ("cuda",
    "tpu", "cpu") from abstract shapes at ``bucket``: {"dense", "boxes"[, "masks"]}. Nothing
    runs; ``detector`` may be abstract (``nnx.eval_shape``)."""
    graphdef, state = nnx.split(detector)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    image = jax.ShapeDtypeStruct((1, *bucket, 3), jnp.float32)
    valid = jax.ShapeDtypeStruct((2,), jnp.int32)
    export = functools.partial(jax.export.export, platforms=[platform])
    dense = export(_dense)(graphdef, state, image, valid)
    out = {"dense": dense}
    if detector.kind == "retinanet":
        return out
    levels = dense.out_avals[: len(detector.neck.strides())]
    rois = jax.ShapeDtypeStruct((detector.settings.rpn_max_num, 4), jnp.float32)
    out["boxes"] = export(_boxes)(graphdef, state, levels, rois, valid)
    if detector.kind == "mask_rcnn":
        n = detector.settings.max_per_img
        det_rois = jax.ShapeDtypeStruct((n, 4), jnp.float32)
        labels = jax.ShapeDtypeStruct((n,), jnp.int32)
        out["masks"] = export(_mask_probs)(graphdef, state, levels, det_rois, labels, valid)
    return out
