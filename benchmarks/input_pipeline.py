"""Throughput of the train and eval input pipelines, per core and on all cores, and the bytes
each image costs on its way to the device.

    python benchmarks/input_pipeline.py [--num_images 1024] [--batch_size 64] [--seconds 10]
    python benchmarks/input_pipeline.py --compare-with 207831a   # and the tf.data pipeline

Writes ImageNet-size JPEGs (about 500x375, quality 90, cut from scikit-learn's sample photos)
as a folder dataset in a temp dir, then times ``eca_flax.data.train_iterator`` and
``eval_iterator`` on it (decode, crop / resize, flip, batch; no model), each in a fresh child
process: pinned to one core with one decoding thread ("per core"), and on every core.
``--compare-with REV`` times another revision of this repository's pipeline the same way,
alternating with this one (207831a: the tf.data pipeline this one replaced). The last column
sizes a host: cores at this per-core rate to feed --target images/s.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def write_jpegs(root: pathlib.Path, num_images: int, val: int | None = None) -> None:
    """num_images JPEGs of ImageNet's typical sizes in root/train/<class>/, and the first
    ``val`` of them (default all) in root/val/<class>/; 4 classes. Encoded on every core."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]
    val = num_images if val is None else val

    def write(i: int) -> None:
        rng = np.random.default_rng(i)
        w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
        w, h = int(w * rng.uniform(0.9, 1.1)), int(h * rng.uniform(0.9, 1.1))
        cw, ch = int(rng.integers(300, 640)), int(rng.integers(250, 427))
        left, top = int(rng.integers(0, 641 - cw)), int(rng.integers(0, 428 - ch))
        image = photos[i % 2].crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        for split in ("train", "val") if i < val else ("train",):
            (root / split / f"c{i % 4}" / f"{i:05d}.JPEG").write_bytes(buf.getvalue())

    for split in ("train", "val"):
        for c in range(4):
            (root / split / f"c{c}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        list(pool.map(write, range(num_images)))


def child(kind: str, cores: int, root: str, batch_size: int, seconds: float) -> dict:
    """Images/s of one pipeline in this process (pinned to ``cores`` cores), and bytes/image."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from eca_flax import data  # this revision's or --compare-with's, by PYTHONPATH

    make = data.train_iterator if kind == "train" else data.eval_iterator
    kwargs = dict(global_batch_size=batch_size, image_size=224, process_index=0, process_count=1)
    if kind == "train":
        kwargs["seed"] = 0
    if "threads" in inspect.signature(make).parameters:
        kwargs["threads"] = cores
    images, start = 0, None
    while start is None or time.perf_counter() - start < seconds:
        for batch in make(f"folder:{root}", None, **kwargs):
            if start is None:  # after the first batch: start-up is not throughput
                start, per_image = time.perf_counter(), sum(v.nbytes for v in batch.values())
                continue
            images += batch_size
            if time.perf_counter() - start > seconds:
                break
    return {
        "images_per_s": images / (time.perf_counter() - start),
        "bytes_per_image": per_image / batch_size,
    }


def run_child(path: pathlib.Path, kind: str, cores: int, root: pathlib.Path, args) -> dict:
    """``child`` in a fresh process importing eca_flax from ``path``."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        kind,
        str(cores),
        str(root),
        "--batch_size",
        str(args.batch_size),
        "--seconds",
        str(args.seconds),
    ]
    env = {**os.environ, "PYTHONPATH": str(path), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60 + 4 * args.seconds,
    )
    if proc.returncode:
        sys.exit(f"error: the {kind} pipeline of {path} failed: {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def checkout(rev: str, into: pathlib.Path) -> pathlib.Path:
    """The files of revision ``rev`` of this repository, extracted into ``into``."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_images", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--compare-with", metavar="REV", help="also time this git revision")
    parser.add_argument("--target", type=float, default=5000.0, help="images/s to size a host for")
    parser.add_argument(
        "--child", nargs=3, metavar=("KIND", "CORES", "ROOT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        kind, cores, root = args.child
        print(json.dumps(child(kind, int(cores), root, args.batch_size, args.seconds)))
        return
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp, "jpegs")
        write_jpegs(root, args.num_images)
        revisions = {"this revision": REPO}
        if args.compare_with:
            revisions[args.compare_with] = checkout(args.compare_with, pathlib.Path(tmp, "rev"))
        print(
            f"{args.num_images} JPEGs ~500x375 q90, batch {args.batch_size}, {cores} CPU cores, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        print(
            "| pipeline | revision | img/s, 1 core | img/s, all cores | bytes/image to device "
            f"| cores for {args.target:,.0f} img/s |"
        )
        print("|---|---|---|---|---|---|")
        for kind in ("train", "eval"):
            for name, path in revisions.items():  # alternating: load hits both alike
                one = run_child(path, kind, 1, root, args)
                every = run_child(path, kind, cores, root, args)
                print(
                    f"| {kind} | {name} | {one['images_per_s']:.1f} | "
                    f"{every['images_per_s']:.1f} | {one['bytes_per_image']:,.0f} | "
                    f"{math.ceil(args.target / one['images_per_s'])} |"
                )
        print(f"load average at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
