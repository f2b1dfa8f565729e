"""The three v1 detectors in JAX against the PyTorch reference's dense part, in one run.

For each detector (random weights, ECA-ResNet-50): images per second of ``detect`` on one
800 x 1199 image (china.jpg at v1's scale), of its dense part alone and of the PyTorch
reference's dense part (tests/det_reference.py, eager, no_grad). The dense part is the
backbone, FPN and dense heads (one jitted program) plus the RoI heads (the box head's FCs on
the 1000 proposals' pooled features, the mask head's convolutions on 100 detections'); the
sparse part is the rest of ``detect``: proposals, RoIAlign, NMS, the mask paste, transfers.
Then the number of compiled programs over ``--images`` images of varied sizes. Targets: dense
part >= 1.0x PyTorch, sparse share < 25%, <= 8 programs.

    python benchmarks/detection_speed.py [--repeats 3] [--images 50] [--kinds faster_rcnn ...]
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # det_reference

import det_reference as ref  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flax import nnx  # noqa: E402
from sklearn.datasets import load_sample_image  # noqa: E402

from eca_flax.cli import xla_flags  # noqa: E402
from eca_flax.detection import compiled_programs, detectors  # noqa: E402
from eca_flax.detection.io import detector_from_state_dict  # noqa: E402
from eca_flax.detection.pipeline import preprocess  # noqa: E402

K = {"faster_rcnn": (5, 5, 5, 5), "mask_rcnn": (3, 3, 7, 7), "retinanet": (3, 3, 7, 7)}


def best(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def torch_dense(v1: ref.V1Detector, x: torch.Tensor) -> None:
    """The reference's backbone + FPN + dense heads, eager."""
    sd = v1.sd
    with torch.no_grad():
        for f in v1.fpn(x):
            if v1.kind == "retinanet":
                c = r = f
                for i in range(4):
                    c = F.relu(ref._conv(sd, f"bbox_head.cls_convs.{i}.conv", c))
                    r = F.relu(ref._conv(sd, f"bbox_head.reg_convs.{i}.conv", r))
                ref._conv(sd, "bbox_head.retina_cls", c).sigmoid()
                ref._conv(sd, "bbox_head.retina_reg", r)
            else:
                t = F.relu(ref._conv(sd, "rpn_head.rpn_conv", f))
                ref._conv(sd, "rpn_head.rpn_cls", t).sigmoid()
                ref._conv(sd, "rpn_head.rpn_reg", t)


def torch_roi_heads(v1: ref.V1Detector) -> None:
    """The reference's box head on 1000 RoIs and (Mask R-CNN) mask head on 100, eager."""
    sd = v1.sd
    if v1.kind == "retinanet":
        return
    with torch.no_grad():
        x = torch.ones(1000, 256 * 49)
        for i in range(2):
            w, b = sd[f"bbox_head.shared_fcs.{i}.weight"], sd[f"bbox_head.shared_fcs.{i}.bias"]
            x = F.relu(F.linear(x, w, b))
        F.linear(x, sd["bbox_head.fc_cls.weight"], sd["bbox_head.fc_cls.bias"]).softmax(1)
        F.linear(x, sd["bbox_head.fc_reg.weight"], sd["bbox_head.fc_reg.bias"])
        if v1.kind == "mask_rcnn":
            x = torch.ones(100, 256, 14, 14)
            for i in range(4):
                x = F.relu(ref._conv(sd, f"mask_head.convs.{i}.conv", x))
            w, b = sd["mask_head.upsample.weight"], sd["mask_head.upsample.bias"]
            x = F.relu(F.conv_transpose2d(x, w, b, stride=2))
            ref._conv(sd, "mask_head.conv_logits", x).sigmoid()


@functools.partial(jax.jit, static_argnums=0)
def _roi_heads(graphdef, state, boxes, masks, labels):
    """The box head on (1000, 7, 7, 256) pooled features and the mask head on (100, ...)."""
    det = nnx.merge(graphdef, state)
    out = det.bbox_head(boxes)
    return out if masks is None else (*out, det.mask_head(masks, labels))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--kinds", nargs="+", default=list(K))
    args = parser.parse_args()
    xla_flags.use_recommended()
    rgb = load_sample_image("china.jpg")  # 427 x 640 -> 800 x 1199
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__}")
    dets, first = {}, {}
    for kind in args.kinds:
        sd = ref.v1_state_dict(kind, "eca_resnet50", K[kind])
        det = detector_from_state_dict({k: v.numpy() for k, v in sd.items()}, kind,
                                       "eca_resnet50", K[kind])  # fmt: skip
        v1 = ref.V1Detector(kind, "eca_resnet50", K[kind], sd)
        image, meta = preprocess(rgb, det.settings)
        graphdef, state = nnx.split(det)
        valid = jnp.asarray(meta.pad_shape, jnp.int32)

        two_stage = kind != "retinanet"
        pooled = jnp.ones((1000, 7, 7, 256)) if two_stage else None
        masks = jnp.ones((100, 14, 14, 256)) if kind == "mask_rcnn" else None
        x = ref.preprocess(rgb)[0]

        def dense(graphdef=graphdef, state=state, image=image, valid=valid, pooled=pooled,
                  masks=masks):  # fmt: skip
            jax.block_until_ready(detectors._dense(graphdef, state, image, valid))
            if pooled is not None:
                labels = jnp.zeros(100, jnp.int32)
                jax.block_until_ready(_roi_heads(graphdef, state, pooled, masks, labels))

        def torch_all(v1=v1, x=x):
            torch_dense(v1, x)
            torch_roi_heads(v1)

        before = compiled_programs()
        det.detect(rgb)  # compile
        dets[kind], first[kind] = det, compiled_programs() - before
        dense()
        torch_all()
        t_detect = best(lambda det=det: det.detect(rgb), args.repeats)
        t_dense = best(dense, args.repeats)
        t_torch = best(torch_all, args.repeats)
        print(f"{kind}: detect {1 / t_detect:.2f} img/s; dense part {1 / t_dense:.2f} img/s "
              f"(bucket {meta.bucket}) vs PyTorch eager {1 / t_torch:.2f} img/s "
              f"({t_torch / t_dense:.2f}x); sparse part {100 * (1 - t_dense / t_detect):.0f}% "
              "of detect", flush=True)  # fmt: skip
    # the detector with the most stages (dense, boxes, masks) when it is measured
    kind = "mask_rcnn" if "mask_rcnn" in dets else args.kinds[-1]
    rng = np.random.default_rng(0)
    before = compiled_programs()
    for _ in range(args.images):
        h, w = (int(v) for v in rng.integers(100, 1000, 2))
        dets[kind].detect(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    total = first[kind] + compiled_programs() - before
    print(
        f"{kind}: {total} programs compiled in all: {first[kind]} for china.jpg, then "
        f"{total - first[kind]} over {args.images} images of varied sizes (100-1000 px a side)"
    )


if __name__ == "__main__":
    main()
