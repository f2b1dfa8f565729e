"""What mmdetection v1 fixed at test time: COCO's classes in v1's order, their category ids, and
the test settings of the v1 "r50 fpn 1x" configs (test_pipeline and test_cfg)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

KINDS = ("faster_rcnn", "mask_rcnn", "retinanet")

CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic_light", "fire_hydrant", "stop_sign", "parking_meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports_ball", "kite",
    "baseball_bat", "baseball_glove", "skateboard", "surfboard", "tennis_racket", "bottle",
    "wine_glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot_dog", "pizza", "donut", "cake", "chair", "couch", "potted_plant",
    "bed", "dining_table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell_phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy_bear", "hair_drier", "toothbrush",
)  # fmt: skip

# COCO's category id of label l (0..79): the sorted ids of instances_*2017.json.
CATEGORY_IDS = (
    *range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
    *range(72, 83), *range(84, 91),
)  # fmt: skip
assert len(CLASSES) == len(CATEGORY_IDS) == 80


@dataclasses.dataclass(frozen=True)
class Release:
    """One of the authors' six COCO detectors: its published file on Google Drive, what it is,
    and its published COCO 2017 val AP (mask AP for Mask R-CNN only)."""

    published: str  # the file name as published, without .pth
    drive_id: str
    kind: str
    arch: str
    k_size: tuple[int, int, int, int]
    params: int  # count_params of the Detector (BN statistics included)
    box_ap: float
    mask_ap: float | None = None

    @property
    def name(self) -> str:
        """What ``load_detector`` takes: the published name without ``_bs8_lr0.01``."""
        return self.published.removesuffix("_bs8_lr0.01")

    @property
    def checkpoint(self) -> str:
        return f"{self.published}.pth"


RELEASES = {
    r.name: r
    for r in (
        Release("faster_rcnn_ecanet50_k5_bs8_lr0.01", "1myjDQIHRiYdTXm7DJjlFe_oyALhHXkrS",
                "faster_rcnn", "eca_resnet50", (5, 5, 5, 5), 41_757_236, 38.0),
        Release("faster_rcnn_ecanet101_3357_bs8_lr0.01", "1otCeuTSs4DRLTBIO6cYjm7e-5dQK1dMX",
                "faster_rcnn", "eca_resnet101", (3, 3, 5, 7), 60_749_441, 40.3),
        Release("mask_rcnn_ecanet50_k3377_bs8_lr0.01", "1z5sAqOD6zZzoVOyAd2VmBztmMXUKy-Nv",
                "mask_rcnn", "eca_resnet50", (3, 3, 7, 7), 44_400_777, 39.0, 35.6),
        Release("mask_rcnn_ecanet101_k3357_bs8_lr0.01", "1Rv-VjdfWOt5mE45M0lihgv59fqnCAHQq",
                "mask_rcnn", "eca_resnet101", (3, 3, 5, 7), 63_392_978, 41.3, 37.4),
        Release("RetinaNet_ecanet50_k3377_bs8_lr0.01", "1Pp6gndZFiZZo2BdbVmzUKQUtQ1m4kIbW",
                "retinanet", "eca_resnet50", (3, 3, 7, 7), 37_968_776, 37.3),
        Release("RetinaNet_ecanet101_k3357_bs8_lr0.01", "1290duDtOGMpp3QrL47CRAq24oGPgbtct",
                "retinanet", "eca_resnet101", (3, 3, 5, 7), 56_960_977, 39.1),
    )
}  # fmt: skip


def release(name: str) -> Release | None:
    """The release a name means (as in RELEASES, or the published file name with or without
    .pth; any case), or None."""
    key = name.removesuffix(".pth").removesuffix("_bs8_lr0.01").lower()
    return next((r for n, r in RELEASES.items() if n.lower() == key), None)


def category_ids() -> tuple[int, ...]:
    """COCO category id of each label 0..79 (v1's cat_ids = sorted getCatIds())."""
    return CATEGORY_IDS


@dataclasses.dataclass(frozen=True)
class TestSettings:
    """v1's test-time settings (config test_pipeline and test_cfg; facts file sections 1, 5-9).

    ``img_scale`` is (long, short): s = min(long / max(H, W), short / min(H, W)). ``buckets``:
    "orientation" compiles one program per orientation at the largest padded size (the padded
    area masked, results exactly v1's), "square" one program for both, "exact" one per padded
    shape (no masking).
    """

    img_scale: tuple[int, int] = (1333, 800)
    size_divisor: int = 32
    mean: tuple[float, float, float] = (123.675, 116.28, 103.53)
    std: tuple[float, float, float] = (58.395, 57.12, 57.375)
    rpn_nms_pre: int = 1000
    rpn_nms_post: int = 1000
    rpn_max_num: int = 1000
    rpn_nms_thr: float = 0.7
    nms_pre: int = 1000  # RetinaNet: anchors kept per level
    score_thr: float = 0.05
    nms_thr: float = 0.5
    max_per_img: int = 100
    mask_thr: float = 0.5
    buckets: str = "orientation"

    def __post_init__(self):
        if self.buckets not in ("orientation", "square", "exact"):
            raise ValueError(f"buckets: {self.buckets!r}; choices: orientation, square, exact")
        if len(self.img_scale) != 2 or min(self.img_scale) < 1:
            raise ValueError(f"img_scale: two positive sizes (long, short), got {self.img_scale}")

    def to_json(self) -> dict[str, Any]:
        """The settings as model.json stores them."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> TestSettings:
        """Settings from model.json (unknown keys are an error naming them)."""
        data = dict(data or {})
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := sorted(set(data) - names):
            raise ValueError(f"unknown test settings: {', '.join(unknown)}")
        for key in ("img_scale", "mean", "std"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
