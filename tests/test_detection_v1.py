"""The six COCO detectors in JAX (eca_flax.detection) against v1's test-time semantics.

The reference (tests/det_reference.py) is written from the facts file; its worked examples are
checked here by hand first. Detectors are random v1-layout checkpoints (det_reference.
v1_state_dict: score biases raised, so that every photo gives many detections over several
classes and masks partly on), converted by the command line with no flag, run on real photos.

Tolerances (the issue's): boxes within 0.05 px, scores within 1e-3 relative, masks IoU >= 0.98,
at most MAX_UNMATCHED detections unmatched on either side. Derivation: both sides compute in
float32 and differ in summation order only (oneDNN vs XLA:CPU convolutions, the RoIAlign sums):
features agree to ~1e-6 relative, so decoded boxes (hundreds of px) to ~1e-3 px and softmax /
sigmoid scores to ~1e-6 relative, 50x inside the tolerances. Discrete decisions (score_thr,
top-1000 cut-offs, NMS IoU at its threshold, ties) can still flip for a box whose value lies
within that noise of the edge; each such flip changes one or two detections, hence the few
allowed unmatched. A test image is run at img_scale (333, 200) (a model.json test setting; the
code path is that of (1333, 800)) to keep the suite's time.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import det_reference as ref
import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_image

from eca_flax.detection import boxes, load_detector, pipeline
from eca_flax.detection.roi_align import roi_align
from eca_flax.detection.settings import TestSettings as Settings

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("convert_cli", ROOT / "convert_torch_weights.py")
CLI = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(CLI)

SCALE = (333, 200)
SETTINGS = Settings(img_scale=SCALE, buckets="square")
BOX_TOL, SCORE_TOL, MASK_IOU, MAX_UNMATCHED = 0.05, 1e-3, 0.98, 3
META = {"mmdet_version": "1.0rc1+c2ba6e6", "config": "", "CLASSES": None, "epoch": 12}


def photos() -> dict[str, np.ndarray]:
    """china.jpg, flower.jpg (427 x 640) and a portrait crop (427 x 300): both orientations,
    sizes not multiples of 32."""
    china = load_sample_image("china.jpg")
    return {
        "china": china,
        "flower": load_sample_image("flower.jpg"),
        "portrait": np.ascontiguousarray(china[:, 170:470]),
    }


# ---- the facts file's worked examples, by hand --------------------------------------------


def test_worked_examples():
    # Anchors (facts 3): stride 4 (scale 8) and stride 8 RetinaNet, ratio-major.
    want4 = [[-21, -9, 24, 12], [-14, -14, 17, 17], [-9, -21, 12, 24]]
    want8 = [[-19, -7, 26, 14], [-25, -10, 32, 17], [-32, -14, 39, 21]]
    assert boxes.rpn_anchor_base(4).tolist() == want4
    assert boxes.retina_anchor_base(8)[:3].tolist() == want8
    assert ref.anchors(4, [8], [0.5, 1, 2], 1, 1).tolist() == want4
    assert (
        ref.anchors(8, [4 * 2 ** (i / 3) for i in range(3)], [0.5, 1, 2], 1, 1)[:3].tolist()
        == want8
    )
    # Grid: cell-major, row-major, A per cell.
    grid = ref.anchors(4, [8], [0.5, 1, 2], 2, 3)
    index = np.arange(18)
    np.testing.assert_array_equal(boxes.anchors_at(boxes.rpn_anchor_base(4), 4, index, 3), grid)
    assert grid[3 * 4 + 1].tolist() == [-14 + 4, -14 + 4, 17 + 4, 17 + 4]  # cell (1, 1)

    # Resize (facts 1): 427 x 640 -> s = 1.8735363, 800 x 1199.
    h, w, s = pipeline.rescale_size(427, 640, (1333, 800))
    assert (h, w) == (800, 1199) and abs(s - 1.8735363) < 1e-7
    x, ori, img_shape, s_ref = ref.preprocess(np.zeros((427, 640, 3), np.uint8))
    assert tuple(x.shape) == (1, 3, 800, 1216) and img_shape == (800, 1199) and s_ref == s
    image, meta = pipeline.preprocess(np.zeros((427, 640, 3), np.uint8), Settings())
    assert meta.pad_shape == (800, 1216) and meta.bucket == (800, 1344)
    np.testing.assert_allclose(image[0, :800, :1216], x[0].numpy().transpose(1, 2, 0), rtol=1e-6)
    assert not image[0, :, 1216:].any()

    # Box coder (facts 4): zero deltas give the anchor back (the +-0.5), clipped to img_shape.
    anchor = np.array([[0, 0, 15, 15], [-5, 2, 30, 9]], np.float32)
    got = boxes.delta2bbox(anchor, np.zeros((2, 4), np.float32), boxes.RPN_STDS, (20, 25))
    assert got.tolist() == [[0, 0, 15, 15], [0, 2, 24, 9]]
    back = ref.delta2bbox(torch.from_numpy(anchor), torch.zeros(2, 4), (1, 1, 1, 1), (20, 25))
    assert back.tolist() == got.tolist()

    # NMS (facts 6): +1 IoU; IoU = thr is kept (> thr suppresses); ties by input order.
    a = np.array([[0, 0, 9, 9], [5, 0, 14, 9]], np.float32)  # +1: 50/150; without: 36/126
    sc = np.array([0.9, 0.8], np.float32)
    assert boxes.nms(a, sc, 0.3).tolist() == [0]  # 0.333 > 0.3 (0.286 without the +1)
    assert boxes.nms(a, sc, 1 / 3).tolist() == [0, 1]
    tie = np.array([[0, 0, 9, 9], [0, 0, 9, 9], [20, 20, 29, 29]], np.float32)
    tie_scores = np.array([0.5, 0.5, 0.7], np.float32)
    assert boxes.nms(tie, tie_scores, 0.5).tolist() == [0, 2]
    assert ref.nms(torch.from_numpy(tie), torch.from_numpy(tie_scores), 0.5).tolist() == [0, 2]
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (300, 2)).astype(np.float32)
    many = np.concatenate([xy, xy + rng.uniform(5, 30, (300, 2)).astype(np.float32)], 1)
    many_scores = np.round(rng.uniform(0, 1, 300), 1).astype(np.float32)  # ties
    want = ref.nms(torch.from_numpy(many), torch.from_numpy(many_scores), 0.5).tolist()
    assert boxes.nms(many, many_scores, 0.5).tolist() == want

    # RoIAlign (facts 8) on f(y, x) = 10 y + x (bilinear is exact on it), 5 x 5, scale 1.
    f = (10 * np.arange(5)[:, None] + np.arange(5)[None, :]).astype(np.float32)
    rois = np.array([[0, 0, 3, 3], [3, 3, 5, 5]], np.float32)
    # RoI 0: end = x2 + 1 = 4, bins of 2, samples 0.5, 1.5 | 2.5, 3.5: means 1 and 3.
    # RoI 1: bins 1.5; samples 3.375, 4.125 (row 4 on both taps) | 4.875, 5.625 (> H: 0).
    # Taps of RoI 1: 3.375 (rows 3, 4), 4.125 and 4.875 (row 4 only), 5.625 (the sample is 0).
    want = np.array([
        [[11, 13], [31, 33]],
        [[(37.125 + 37.75 + 43.375 + 44) / 4, (37.75 + 44) / 4], [(43.375 + 44) / 4, 44 / 4]],
    ])  # fmt: skip
    feats = [f[:, :, None]] * 4
    got = np.asarray(roi_align(feats, rois, (1, 2, 4, 8), [(5, 5)] * 4, 2))[..., 0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    by_ref = ref.roi_align([torch.from_numpy(f)[None]] * 4, (1, 2, 4, 8), torch.from_numpy(rois), 2)
    np.testing.assert_allclose(by_ref[:, 0].numpy(), want, rtol=1e-6)


# ---- random v1 detectors, converted with no flag, on three photos --------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """kind, arch, k_size -> (v1 state_dict, converted directory), made once per module."""
    made: dict = {}

    def get(kind: str, arch: str, k_size: tuple[int, ...], capsys=None):
        key = (kind, arch, k_size)
        if key not in made:
            root = tmp_path_factory.mktemp(kind)
            sd = ref.v1_state_dict(kind, arch, k_size, seed=len(made))
            src = root / f"{kind}_{arch}.pth"
            torch.save({"meta": META, "state_dict": sd}, src, _use_new_zipfile_serialization=False)
            dst = root / "converted"
            assert CLI.main([str(src), str(dst)]) == 0
            made[key] = sd, dst
        return made[key]

    return get


def match(got, want, masks: bool) -> tuple[int, int, list[float]]:
    """Pair detections as sets (same label, boxes within BOX_TOL, scores within SCORE_TOL
    relative): (unmatched in got, unmatched in want, mask IoUs of the pairs)."""
    used = np.zeros(len(got.scores), bool)
    missing, ious = 0, []
    for j in np.argsort(-want["scores"]):
        ok = (
            (got.labels == want["labels"][j])
            & (np.abs(got.boxes - want["boxes"][j]).max(axis=1) <= BOX_TOL)
            & (np.abs(got.scores - want["scores"][j]) <= SCORE_TOL * want["scores"][j])
            & ~used
        )
        if not ok.any():
            missing += 1
            continue
        i = int(np.flatnonzero(ok)[0])
        used[i] = True
        if masks:
            a, b = got.masks[i], want["masks"][j]
            union = np.logical_or(a, b).sum()
            ious.append(np.logical_and(a, b).sum() / union if union else 1.0)
    return int((~used).sum()), missing, ious


def check_kind(converted, kind, arch, k_size, names):
    sd, dst = converted(kind, arch, k_size)
    description = json.loads((dst / "model.json").read_text())
    assert (description["kind"], description["arch"], description["k_size"]) == (
        kind, arch, list(k_size))  # fmt: skip
    assert description["test"]["img_scale"] == [1333, 800]
    det = load_detector(dst, settings=SETTINGS)
    v1 = ref.V1Detector(kind, arch, k_size, sd, img_scale=SCALE)
    for name, rgb in photos().items():
        if name not in names:
            continue
        got, want = det.detect(rgb), v1.detect(rgb)
        n = len(want["scores"])
        assert n >= 30 and len(set(want["labels"].tolist())) >= 3, (name, n)
        assert got.boxes.dtype == np.float32 and got.labels.min() >= 0 and got.labels.max() < 80
        extra, missing, ious = match(got, want, kind == "mask_rcnn")
        print(f"{kind} {arch} {name}: {n} detections, {extra} / {missing} unmatched")
        assert extra <= MAX_UNMATCHED and missing <= MAX_UNMATCHED, (name, extra, missing)
        if kind == "mask_rcnn":
            assert got.masks.shape == (len(got.scores), *rgb.shape[:2])
            assert got.masks.dtype == bool
            on = np.mean([m.mean() for m in want["masks"]])
            assert 0 < on < 0.5, on  # partly on
            assert min(ious) >= MASK_IOU, min(ious)
        else:
            assert got.masks is None
        if kind != "retinanet":
            assert len(got.proposals) == len(want["proposals"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, k_size",
    [("faster_rcnn", (5, 5, 5, 5)), ("mask_rcnn", (3, 3, 7, 7)), ("retinanet", (3, 3, 7, 7))],
)
def test_r50_detectors_equal_v1_reference(converted, kind, k_size):
    check_kind(converted, kind, "eca_resnet50", k_size, ("china", "flower", "portrait"))


@pytest.mark.slow
def test_r101_detector_equals_v1_reference(converted):
    check_kind(converted, "mask_rcnn", "eca_resnet101", (3, 3, 5, 7), ("portrait",))
