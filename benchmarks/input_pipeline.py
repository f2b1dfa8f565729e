"""Throughput of the train and eval input pipelines, in images/s and images/s per CPU core.

Writes ImageNet-size JPEGs (about 500x375, quality 90, cut from scikit-learn's sample photos)
as a folder dataset in a temp dir, then times `eca_flax.data.train_iterator` and
`eval_iterator` on it (decode, crop/resize, normalize, batch; no model).

    python benchmarks/input_pipeline.py [--num_images 1024] [--batch_size 64] [--seconds 10]

The last column sizes the data workers: cores (at this machine's per-core rate) to feed
--target images/s, 4,000 by default (the H100 training goal of issue 6).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image
from sklearn.datasets import load_sample_images

from eca_flax import data


def write_jpegs(root: pathlib.Path, num_images: int) -> None:
    """num_images JPEGs of ImageNet's typical sizes in root/{train,val}/<class>/."""
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    for i in range(num_images):
        src = photos[i % 2]
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        w, h = int(w * rng.uniform(0.9, 1.1)), int(h * rng.uniform(0.9, 1.1))
        cw, ch = int(rng.integers(300, 640)), int(rng.integers(250, 427))
        left, top = int(rng.integers(0, 641 - cw)), int(rng.integers(0, 428 - ch))
        image = src.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)
        for split in ("train", "val"):
            out = root / split / f"c{i % 4}"
            out.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            image.save(buf, "JPEG", quality=90)
            (out / f"{i:05d}.JPEG").write_bytes(buf.getvalue())


def rate(iterator, seconds: float, batch_size: int) -> float:
    """Images/s after one warm-up batch, for `seconds` or until a finite iterator ends."""
    it = iterator()
    next(it)
    count, start = 0, time.perf_counter()
    for _ in it:
        count += batch_size
        if time.perf_counter() - start > seconds:
            break
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_images", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--target", type=float, default=4000.0, help="images/s to size the CPU cores for"
    )
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp, "jpegs")
        write_jpegs(root, args.num_images)
        dataset = f"folder:{root}"
        common = dict(
            global_batch_size=args.batch_size,
            image_size=args.image_size,
            process_index=0,
            process_count=1,
        )
        pipelines = {
            "train (inception crop + flip)": lambda: data.train_iterator(
                dataset, None, seed=0, **common
            ),
            "eval (resize 256 + center crop)": lambda: data.eval_iterator(dataset, None, **common),
        }
        print(f"{args.num_images} JPEGs ~500x375, batch {args.batch_size}, {cores} CPU cores")
        for name, make in pipelines.items():
            r = rate(make, args.seconds, args.batch_size)
            print(
                f"{name:34s} {r:8.1f} images/s  {r / cores:7.1f} images/s per core  "
                f"~{math.ceil(args.target / (r / cores))} cores for {args.target:,.0f} images/s"
            )


if __name__ == "__main__":
    main()
