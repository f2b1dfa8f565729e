"""A PyTorch reference of mmdetection v1's test-time semantics, written from
../shared/reference/mmdet_v1_detection_facts.md (the way torch_reference.py serves the
classifiers); and random detectors in v1's exact key layout.

Written independently of eca_flax.detection: torch throughout, the exact padded shape (no
buckets), RoIAlign by its four-corner definition per sample, NMS as a plain greedy loop.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_image

from eca_flax.models import torch_reference as tr

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


# ---- test pipeline (facts 1) -------------------------------------------------------------


def preprocess(rgb: np.ndarray, img_scale=(1333, 800)):
    """(1 x 3 x Hp x Wp float32 tensor, ori_shape, img_shape, scale) as v1's test pipeline."""
    bgr = rgb[:, :, ::-1]  # what OpenCV's imread gives
    h, w = bgr.shape[:2]
    s = min(max(img_scale) / max(h, w), min(img_scale) / min(h, w))
    nw, nh = int(w * s + 0.5), int(h * s + 0.5)
    resized = cv2.resize(np.ascontiguousarray(bgr), (nw, nh), interpolation=cv2.INTER_LINEAR)
    img = resized.astype(np.float32)[:, :, ::-1]  # BGR -> RGB
    img = (img - np.array(MEAN)) * (1 / np.array(STD))
    hp, wp = math.ceil(nh / 32) * 32, math.ceil(nw / 32) * 32
    pad = np.zeros((hp, wp, 3), np.float32)
    pad[:nh, :nw] = img
    return torch.from_numpy(pad.transpose(2, 0, 1)[None].copy()), (h, w), (nh, nw), s


# ---- anchors, coder, NMS (facts 3, 4, 6) ----------------------------------------------------


def anchors(stride: int, scales, ratios, height: int, width: int) -> torch.Tensor:
    base = float(stride)
    c = (base - 1) / 2
    out = []
    for r in ratios:  # ratio-major
        for k in scales:
            hr = math.sqrt(r)
            ws = torch.tensor(base * (1 / hr) * k, dtype=torch.float32)
            hs = torch.tensor(base * hr * k, dtype=torch.float32)
            out.append(torch.stack([c - (ws - 1) / 2, c - (hs - 1) / 2,
                                    c + (ws - 1) / 2, c + (hs - 1) / 2]))  # fmt: skip
    base_anchors = torch.round(torch.stack(out))
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    shifts = torch.stack([xs, ys, xs, ys], -1).reshape(-1, 1, 4).float() * stride
    return (shifts + base_anchors[None]).reshape(-1, 4)


def delta2bbox(rois, deltas, stds, img_shape):
    d = deltas.reshape(len(deltas), -1, 4) * torch.tensor(stds)
    clip = abs(math.log(16 / 1000))
    dx, dy = d[..., 0], d[..., 1]
    dw, dh = d[..., 2].clamp(-clip, clip), d[..., 3].clamp(-clip, clip)
    pw = (rois[:, 2] - rois[:, 0] + 1)[:, None]
    ph = (rois[:, 3] - rois[:, 1] + 1)[:, None]
    px = ((rois[:, 0] + rois[:, 2]) * 0.5)[:, None]
    py = ((rois[:, 1] + rois[:, 3]) * 0.5)[:, None]
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * dx, py + ph * dy
    h, w = img_shape
    x1 = (gx - gw * 0.5 + 0.5).clamp(0, w - 1)
    y1 = (gy - gh * 0.5 + 0.5).clamp(0, h - 1)
    x2 = (gx + gw * 0.5 - 0.5).clamp(0, w - 1)
    y2 = (gy + gh * 0.5 - 0.5).clamp(0, h - 1)
    return torch.stack([x1, y1, x2, y2], -1).reshape(len(deltas), -1)


def iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU with +1 widths, float32."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = (a[:, 2] - a[:, 0] + 1) * (a[:, 3] - a[:, 1] + 1)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def nms(boxes: torch.Tensor, scores: torch.Tensor, thr: float) -> torch.Tensor:
    """Greedy by decreasing score; suppress IoU > thr; kept indices ascending."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    ious = iou(boxes, boxes)
    alive = torch.ones(len(scores), dtype=torch.bool)
    keep = []
    for i in order:
        if alive[i]:
            keep.append(i)
            alive &= ~(ious[i] > thr)
    return torch.tensor(sorted(keep), dtype=torch.long)


def multiclass_nms(boxes, scores, score_thr=0.05, nms_thr=0.5, max_num=100):
    outs = []
    for i in range(1, scores.shape[1]):
        sel = scores[:, i] > score_thr
        if not sel.any():
            continue
        b = boxes[sel, :4] if boxes.shape[1] == 4 else boxes[sel, 4 * i : 4 * i + 4]
        s = scores[sel, i]
        keep = nms(b, s, nms_thr)
        outs.append((b[keep], s[keep], torch.full((len(keep),), i - 1)))
    if not outs:
        return torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    b, s, lab = (torch.cat(x) for x in zip(*outs))
    if len(s) > max_num:
        top = torch.argsort(-s, stable=True)[:max_num]
        b, s, lab = b[top], s[top], lab[top]
    return b, s, lab


# ---- RoIAlign (facts 8) ---------------------------------------------------------------------


def bilinear(feat: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """v1's bilinear sample of feat (H, W, C) at points (P,) -> (P, C)."""
    height, width, _ = feat.shape
    ok = ~((y < -1.0) | (y > height) | (x < -1.0) | (x > width))
    y, x = y.clamp(min=0), x.clamp(min=0)
    y0, x0 = y.floor().long(), x.floor().long()
    ey, ex = y0 >= height - 1, x0 >= width - 1
    y0 = torch.where(ey, height - 1, y0)
    x0 = torch.where(ex, width - 1, x0)
    y1 = torch.where(ey, y0, y0 + 1)
    x1 = torch.where(ex, x0, x0 + 1)
    y = torch.where(ey, y0.float(), y)
    x = torch.where(ex, x0.float(), x)
    ly, lx = y - y0, x - x0
    hy, hx = 1 - ly, 1 - lx
    v = (hy * hx)[:, None] * feat[y0, x0] + (hy * lx)[:, None] * feat[y0, x1]
    v = v + (ly * hx)[:, None] * feat[y1, x0] + (ly * lx)[:, None] * feat[y1, x1]
    return torch.where(ok[:, None], v, 0.0)


def roi_align(feats, strides, rois: torch.Tensor, out: int) -> torch.Tensor:
    """(R, C, out, out) from levels (C, H, W); level by v1's rule, end = (x2 + 1) * scale."""
    scale = torch.sqrt((rois[:, 2] - rois[:, 0] + 1) * (rois[:, 3] - rois[:, 1] + 1))
    levels = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, len(feats) - 1).long()
    result = torch.zeros(len(rois), feats[0].shape[0], out, out)
    feats = [f.permute(1, 2, 0).contiguous() for f in feats]  # (H, W, C): rows of channels
    for r, roi in enumerate(rois):
        lv = int(levels[r])
        sc = 1.0 / strides[lv]
        sx, sy = roi[0] * sc, roi[1] * sc
        rw = torch.clamp((roi[2] + 1) * sc - sx, min=0)
        rh = torch.clamp((roi[3] + 1) * sc - sy, min=0)
        bw, bh = rw / out, rh / out
        ph = torch.arange(out).float()
        i = torch.tensor([0.5, 1.5])
        ys = (sy + ph[:, None] * bh + i[None, :] * bh / 2).reshape(-1)  # (out*2)
        xs = (sx + ph[:, None] * bw + i[None, :] * bw / 2).reshape(-1)
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        v = bilinear(feats[lv], yy.reshape(-1), xx.reshape(-1))  # (out*2*out*2, C)
        v = v.reshape(out, 2, out, 2, -1).mean(dim=(1, 3))
        result[r] = v.permute(2, 0, 1)
    return result


# ---- the networks (facts 2, 5, 7, 8, 9) -----------------------------------------------------


def _conv(sd, name, x, stride=1, pad=None):
    w = sd[f"{name}.weight"]
    return F.conv2d(
        x, w, sd.get(f"{name}.bias"), stride, (w.shape[-1] - 1) // 2 if pad is None else pad
    )


class V1Detector:
    """v1's detector of ``kind`` from a v1 state_dict (torch tensors), at test time."""

    def __init__(self, kind, arch, k_size, state_dict, img_scale=(1333, 800)):
        self.kind, self.img_scale = kind, img_scale
        self.sd = {k: v.float() for k, v in state_dict.items() if not k.startswith("backbone.")}
        self.resnet = tr.build(arch, k_size=k_size)
        bb = {k[9:]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        result = self.resnet.load_state_dict(bb, strict=False)
        assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"], result
        self.resnet.eval()

    def fpn(self, x):
        sd = self.sd
        m = self.resnet
        with torch.no_grad():
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            cs = []
            for layer in (m.layer1, m.layer2, m.layer3, m.layer4):
                x = layer(x)
                cs.append(x)
            start = 1 if self.kind == "retinanet" else 0
            ins = cs[start:]
            lat = [_conv(sd, f"neck.lateral_convs.{i}.conv", c) for i, c in enumerate(ins)]
            for i in range(len(lat) - 1, 0, -1):
                lat[i - 1] = lat[i - 1] + F.interpolate(lat[i], scale_factor=2, mode="nearest")
            outs = [_conv(sd, f"neck.fpn_convs.{i}.conv", v) for i, v in enumerate(lat)]
            if self.kind == "retinanet":
                p6 = _conv(sd, "neck.fpn_convs.3.conv", cs[-1], stride=2)
                outs += [p6, _conv(sd, "neck.fpn_convs.4.conv", p6, stride=2)]
            else:
                outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs

    def detect(self, rgb):
        # One thread: the many small ops of the loops below are >10x slower when PyTorch's
        # threads spin on a busy machine (pytest-xdist's other worker).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._detect(rgb)
        finally:
            torch.set_num_threads(threads)

    def _detect(self, rgb):
        x, ori, img_shape, s = preprocess(rgb, self.img_scale)
        feats = self.fpn(x)
        with torch.no_grad():
            if self.kind == "retinanet":
                return self._retina(feats, img_shape, s, ori)
            return self._two_stage(feats, img_shape, s, ori)

    def _retina(self, feats, img_shape, s, ori):
        sd = self.sd
        boxes, scores = [], []
        towers = self.retina_features(feats)
        for lv, (f, c) in enumerate(zip(feats, towers)):
            stride = 2 ** (lv + 3)
            r = f
            for i in range(4):
                r = F.relu(_conv(sd, f"bbox_head.reg_convs.{i}.conv", r))
            cls = _conv(sd, "bbox_head.retina_cls", c)[0].permute(1, 2, 0).reshape(-1, 80).sigmoid()
            reg = _conv(sd, "bbox_head.retina_reg", r)[0].permute(1, 2, 0).reshape(-1, 4)
            anc = anchors(stride, [4 * 2 ** (i / 3) for i in range(3)], [0.5, 1, 2], *f.shape[2:])
            if len(cls) > 1000:
                top = cls.max(dim=1).values.topk(1000).indices
                cls, reg, anc = cls[top], reg[top], anc[top]
            boxes.append(delta2bbox(anc, reg, (1, 1, 1, 1), img_shape))
            scores.append(cls)
        b = torch.cat(boxes) / s
        sc = torch.cat(scores)
        sc = torch.cat([torch.zeros(len(sc), 1), sc], 1)
        b, sc, lab = multiclass_nms(b, sc)
        return dict(boxes=b.numpy(), scores=sc.numpy(), labels=lab.numpy(), masks=None)

    def proposals(self, feats, img_shape):
        """The RPN's proposals (at most 1000, at the test scale): per level top-1000, NMS 0.7."""
        sd = self.sd
        props, pscores = [], []
        for lv, f in enumerate(feats):
            stride = 2 ** (lv + 2)
            t = F.relu(_conv(sd, "rpn_head.rpn_conv", f))
            cls = _conv(sd, "rpn_head.rpn_cls", t)[0].permute(1, 2, 0).reshape(-1).sigmoid()
            reg = _conv(sd, "rpn_head.rpn_reg", t)[0].permute(1, 2, 0).reshape(-1, 4)
            anc = anchors(stride, [8], [0.5, 1, 2], *f.shape[2:])
            if len(cls) > 1000:
                top = cls.topk(1000).indices
                cls, reg, anc = cls[top], reg[top], anc[top]
            b = delta2bbox(anc, reg, (1, 1, 1, 1), img_shape)
            keep = nms(b, cls, 0.7)[:1000]
            props.append(b[keep])
            pscores.append(cls[keep])
        props, pscores = torch.cat(props), torch.cat(pscores)
        top = pscores.topk(min(1000, len(pscores))).indices
        return props[top]

    def box_features(self, feats, props):
        """The shared FCs' output (R, 1024) for the RoIs ``props``: what fc_cls and fc_reg read."""
        sd = self.sd
        roi = roi_align([f[0] for f in feats[:4]], (4, 8, 16, 32), props, 7)
        x = roi.reshape(len(roi), -1)
        x = F.relu(
            F.linear(x, sd["bbox_head.shared_fcs.0.weight"], sd["bbox_head.shared_fcs.0.bias"])
        )
        return F.relu(
            F.linear(x, sd["bbox_head.shared_fcs.1.weight"], sd["bbox_head.shared_fcs.1.bias"])
        )

    def retina_features(self, feats):
        """The classification tower's output at each level (1, 256, H, W): what retina_cls reads."""
        out = []
        for f in feats:
            c = f
            for i in range(4):
                c = F.relu(_conv(self.sd, f"bbox_head.cls_convs.{i}.conv", c))
            out.append(c)
        return out

    def _two_stage(self, feats, img_shape, s, ori):
        sd = self.sd
        props = self.proposals(feats, img_shape)
        x = self.box_features(feats, props)
        scores = F.linear(x, sd["bbox_head.fc_cls.weight"], sd["bbox_head.fc_cls.bias"]).softmax(1)
        deltas = F.linear(x, sd["bbox_head.fc_reg.weight"], sd["bbox_head.fc_reg.bias"])
        boxes = delta2bbox(props, deltas, (0.1, 0.1, 0.2, 0.2), img_shape) / s
        b, sc, lab = multiclass_nms(boxes, scores)
        out = dict(boxes=b.numpy(), scores=sc.numpy(), labels=lab.numpy(), masks=None,
                   proposals=props.numpy())  # fmt: skip
        if self.kind == "mask_rcnn":
            out["masks"] = self._masks(feats, b * s, lab, s, ori)
        return out

    def _masks(self, feats, rois, labels, s, ori):
        sd = self.sd
        x = roi_align([f[0] for f in feats[:4]], (4, 8, 16, 32), rois, 14)
        for i in range(4):
            x = F.relu(_conv(sd, f"mask_head.convs.{i}.conv", x))
        x = F.relu(F.conv_transpose2d(x, sd["mask_head.upsample.weight"],
                                      sd["mask_head.upsample.bias"], stride=2))  # fmt: skip
        probs = _conv(sd, "mask_head.conv_logits", x).sigmoid().numpy()
        masks = np.zeros((len(rois), *ori), bool)
        for i, (box, label) in enumerate(zip(rois.numpy(), labels.numpy())):
            x1, y1, x2, y2 = (box / s).astype(np.int32)
            w, h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
            m = cv2.resize(probs[i, label + 1], (int(w), int(h)), interpolation=cv2.INTER_LINEAR)
            masks[i, y1 : y1 + h, x1 : x1 + w] = (m > 0.5)[: ori[0] - y1, : ori[1] - x1]
        return masks


# ---- random detectors in v1's key layout (facts 11) -----------------------------------------

HOT = (0, 2, 15, 16, 41, 56, 62)  # classes whose scores are raised: person, car, cat, dog, cup, ...


def v1_state_dict(
    kind: str, arch: str, k_size, seed: int = 0, standardize: bool = True
) -> dict[str, torch.Tensor]:
    """A v1 detector's state_dict with random weights: the ECA-ResNet from torch_reference's
    random_reference (BN statistics randomized), heads drawn so that every image gives many
    detections over several classes (the score layer standardized, the HOT classes' biases
    raised) and masks that are partly on. ``standardize=False`` leaves the score layers random
    (a file whose detections do not matter, made without running the reference)."""
    with torch.random.fork_rng():  # the convolutions' initial weights come from torch's RNG
        torch.manual_seed(seed)
        ref = tr.random_reference(arch, seed=seed, k_size=k_size)
    sd = {f"backbone.{k}": v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    g = torch.Generator().manual_seed(seed + 100)

    def centred(w, centre):
        # A score layer reads ReLU outputs (all >= 0): rows of zero mean make its logits vary
        # with the input rather than be one constant per class (one class everywhere).
        return w - w.flatten(1).mean(1).view(-1, *[1] * (w.dim() - 1)) if centre else w

    def conv(name, out, inp, k, gain=1.0, bias=0.0, centre=False):
        w = torch.randn(out, inp, k, k, generator=g) * gain / math.sqrt(inp * k * k)
        sd[f"{name}.weight"] = centred(w, centre)
        sd[f"{name}.bias"] = 0.1 * torch.randn(out, generator=g) + bias

    def linear(name, out, inp, gain=1.0):
        sd[f"{name}.weight"] = torch.randn(out, inp, generator=g) * gain / math.sqrt(inp)
        sd[f"{name}.bias"] = 0.1 * torch.randn(out, generator=g)

    widths = (256, 512, 1024, 2048)
    start = 1 if kind == "retinanet" else 0
    for i, c in enumerate(widths[start:]):
        conv(f"neck.lateral_convs.{i}.conv", 256, c, 1)
        conv(f"neck.fpn_convs.{i}.conv", 256, 256, 3)
    if kind == "retinanet":
        conv("neck.fpn_convs.3.conv", 256, 2048, 3)
        conv("neck.fpn_convs.4.conv", 256, 256, 3)
        for branch in ("cls_convs", "reg_convs"):
            for i in range(4):
                conv(f"bbox_head.{branch}.{i}.conv", 256, 256, 3, gain=1.4)
        conv("bbox_head.retina_cls", 720, 256, 3)
        conv("bbox_head.retina_reg", 36, 256, 3, gain=0.005)  # deltas ~0.1: boxes near anchors
        bias = torch.full((9, 80), -4.6)  # sigmoid 0.01: below score_thr but by its input
        bias[:, list(HOT)] = -1.6  # 0.17
        if standardize:
            _standardize(sd, kind, arch, k_size, "bbox_head.retina_cls", bias.reshape(-1))
        return sd
    conv("rpn_head.rpn_conv", 256, 256, 3, gain=1.4)
    conv("rpn_head.rpn_cls", 3, 256, 1, gain=0.5, centre=True)  # no saturated (tied) scores
    conv("rpn_head.rpn_reg", 12, 256, 1, gain=0.1)
    linear("bbox_head.shared_fcs.0", 1024, 256 * 49, gain=1.4)
    linear("bbox_head.shared_fcs.1", 1024, 1024, gain=1.4)
    linear("bbox_head.fc_cls", 81, 1024)
    linear("bbox_head.fc_reg", 324, 1024, gain=0.5)
    if kind == "mask_rcnn":
        for i in range(4):
            conv(f"mask_head.convs.{i}.conv", 256, 256, 3, gain=1.4)
        sd["mask_head.upsample.weight"] = torch.randn(256, 256, 2, 2, generator=g) * 1.4 / 16
        sd["mask_head.upsample.bias"] = 0.1 * torch.randn(256, generator=g)
        conv("mask_head.conv_logits", 81, 256, 1, gain=3.0, centre=True)
    bias = torch.zeros(81)
    bias[[h + 1 for h in HOT]] = 3.0
    bias[0] = -2.0  # background (index 0) less likely than any class
    if standardize:
        _standardize(sd, kind, arch, k_size, "bbox_head.fc_cls", bias)
    return sd


def _standardize(sd, kind, arch, k_size, layer: str, bias: torch.Tensor) -> None:
    """Make the score layer ``layer`` well conditioned, as a trained detector's is: on a
    calibration photo, each of its outputs varies with the input by one unit (standard
    deviation over the RoIs or positions) around ``bias``. Random rows read the same ReLU
    features with a per-row offset far larger than their variation, so one class would win
    every box of a photo; standardized, which class wins depends on the box, by margins of
    order one (the Faster R-CNN's 100 detections of china.jpg: 6 classes, not 1)."""
    det = V1Detector(kind, arch, k_size, sd, img_scale=(333, 200))
    x, _, img_shape, _ = preprocess(load_sample_image("china.jpg"), det.img_scale)
    with torch.no_grad():
        feats = det.fpn(x)
        w = sd[f"{layer}.weight"]
        if kind == "retinanet":
            z = torch.cat(
                [F.conv2d(c, w, None, 1, 1)[0].flatten(1).T for c in det.retina_features(feats)]
            )
        else:
            z = det.box_features(feats, det.proposals(feats, img_shape)) @ w.T
    scale = 1 / z.std(0)
    sd[f"{layer}.weight"] = w * scale.view(-1, *[1] * (w.dim() - 1))
    sd[f"{layer}.bias"] = bias - z.mean(0) * scale
