"""python -m eca_flax.detection predict | evaluate: a converted v1 detector on image files.

    python -m eca_flax.detection predict DST IMAGES... --out DIR [--draw] [--score-thr 0.3]
    python -m eca_flax.detection evaluate DST --images DIR --annotations instances_val2017.json
        [--out DIR]

DST is a converted detector directory or a release's name (``mask_rcnn_ecanet50_k3377``:
downloaded, checked, converted and cached on first use). Images are read as v1 read them
(OpenCV imread in colour: EXIF orientation applied, grayscale and 16-bit images converted,
alpha dropped). predict writes DIR/detections.json (COCO results,
v1's +1 widths, RLE masks, with a file_name per entry) and with --draw DIR/<name>.png.
evaluate keeps finished images in DIR/partial.jsonl (a stopped run continues where it was),
then writes DIR/results_bbox.json (and results_segm.json) and prints COCOeval's tables.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from eca_flax.cli import shell


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m eca_flax.detection", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="detect objects in image files")
    p.add_argument(
        "detector",
        metavar="DST",
        help="a converted detector directory, or a release's name (mask_rcnn_ecanet50_k3377)",
    )
    p.add_argument("images", metavar="IMAGE", nargs="+")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--draw", action="store_true", help="write a PNG per image")
    p.add_argument("--score-thr", type=float, default=0.3, help="drawn detections (default 0.3)")
    e = sub.add_parser("evaluate", help="COCO evaluation with pycocotools")
    e.add_argument("detector", metavar="DST", help="as for predict")
    e.add_argument("--images", required=True, metavar="DIR")
    e.add_argument("--annotations", required=True, metavar="JSON")
    e.add_argument("--out", default="coco_eval", metavar="DIR")
    return parser.parse_args(argv)


def predict(args: argparse.Namespace) -> None:
    """Detections of each image: json and, with --draw, pictures."""
    import cv2

    from eca_flax.detection import cocoio
    from eca_flax.detection.io import load_detector

    images = [cocoio.read_image(p) for p in args.images]  # all readable before any work
    det = load_detector(args.detector)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (path, rgb) in enumerate(zip(args.images, images)):
        found = det.detect(rgb)
        for entry in cocoio.results(i, found):
            entries.append({"file_name": Path(path).name, **entry})
        shown = int((found.scores > args.score_thr).sum())
        print(f"{path}: {len(found)} detections, {shown} above {args.score_thr}", flush=True)
        if args.draw:
            picture = out / f"{Path(path).stem}.png"
            if not cv2.imwrite(str(picture), cocoio.draw(rgb, found, args.score_thr)):
                raise OSError(f"{picture}: could not write it")
            print(f"wrote {picture}", flush=True)
    _write_json(out / "detections.json", entries)
    print(f"wrote {out / 'detections.json'}", flush=True)


def _write_json(path: Path, data) -> None:
    from eca_flax import files
    from eca_flax.errors import DataError

    files.write_file(path, lambda tmp: Path(tmp).write_text(json.dumps(data)), DataError)


def evaluate(args: argparse.Namespace) -> None:
    """COCO evaluation of the detector on the annotation file's images, resumable."""
    from eca_flax.detection import cocoio
    from eca_flax.detection.io import load_detector
    from eca_flax.errors import DataError

    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError:
        raise DataError("evaluate needs pycocotools: pip install pycocotools") from None
    import contextlib
    import io

    from tqdm import tqdm

    ann = Path(args.annotations)
    if not ann.is_file():
        raise DataError(f"{ann}: no such annotation file")
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            coco = COCO(str(ann))
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{ann}: not a COCO annotation file ({e})") from None
    ids = sorted(coco.getImgIds())
    root = Path(args.images)
    missing = [
        coco.imgs[i]["file_name"] for i in ids if not (root / coco.imgs[i]["file_name"]).is_file()
    ]
    if missing:
        raise DataError(f"{ann}: {len(missing)} images missing under {root}, e.g. {missing[0]}")
    det = load_detector(args.detector)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "partial.jsonl"
    done: dict[int, list] = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                break  # a line cut by a stop: that image runs again
            done[record["image_id"]] = record["results"]
    todo = [i for i in ids if i not in done]
    if done:
        print(f"continuing: {len(done)} of {len(ids)} images done", flush=True)
    with open(partial, "a") as f:
        for i in tqdm(todo, desc="images", unit="img"):
            rgb = cocoio.read_image(root / coco.imgs[i]["file_name"])
            done[i] = cocoio.results(i, det.detect(rgb))
            f.write(json.dumps({"image_id": i, "results": done[i]}) + "\n")
            f.flush()
    entries = [e for i in ids for e in done[i]]
    kinds = ["bbox"] + (["segm"] if det.kind == "mask_rcnn" else [])
    for kind in kinds:
        rows = [
            {k: v for k, v in e.items() if kind == "segm" or k != "segmentation"} for e in entries
        ]
        if kind == "segm":
            rows = [r for r in rows if "segmentation" in r]
        path = out / f"results_{kind}.json"
        _write_json(path, rows)
        print(f"wrote {path}\n{kind}:", flush=True)
        if not rows:
            print("no detections", flush=True)
            continue
        evaluator = COCOeval(coco, coco.loadRes(str(path)), kind)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; the exit status (0 ok, 1 error, 130 Ctrl-C)."""
    args = parse_args(argv)
    return shell.run(lambda: predict(args) if args.command == "predict" else evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
