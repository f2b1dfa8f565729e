"""mmdetection v1's COCO detectors in JAX / Flax NNX: RetinaNet, Faster R-CNN and Mask R-CNN
on ECA-ResNet, exactly as v1 ran them at test time (the ECA-Net COCO releases).

``load_detector(DST)`` (DST from ``convert_torch_weights.py DETECTOR.pth DST``) gives a
``Detector``; ``det.detect(rgb)`` the boxes, scores, labels (0..79, ``CLASSES``;
``category_ids()`` maps them to COCO ids) and masks of one image. ``build_detector(kind)``
builds one with random weights. Stages: ``backbone`` (eca_flax's ECA-ResNet), ``necks`` (FPN),
``dense_heads`` (RPN, RetinaNet), ``roi_align``, ``roi_heads`` (box, mask), ``boxes``
(anchors, coder, NMS), ``paste``, ``pipeline`` (resize, normalize, pad, shape buckets).
Names load on first use: importing this package imports neither OpenCV nor pycocotools.
"""

from __future__ import annotations

from eca_flax.lazy import module_getattr

_HOMES = {
    "Detector": "eca_flax.detection.detectors",
    "Detections": "eca_flax.detection.detectors",
    "build_detector": "eca_flax.detection.detectors",
    "compiled_programs": "eca_flax.detection.detectors",
    "load_detector": "eca_flax.detection.io",
    "TestSettings": "eca_flax.detection.settings",
    "CLASSES": "eca_flax.detection.settings",
    "category_ids": "eca_flax.detection.settings",
}


__getattr__ = module_getattr(__name__, _HOMES)
