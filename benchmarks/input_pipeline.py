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

Then, for hosts bigger than this one: the share of the train transform that holds the GIL
(``gil_profile``, CPU time, so load from other processes does not count) and the Amdahl
ceiling it sets for threads at 16 cores and at this machine's; threads against grain worker
processes on 1, 2 and all cores (best of --repeats alternating runs); JPEG decoders on the
same images (PIL, PIL's draft mode, simplejpeg if installed); and what ``data_workers="auto"``
(``eca_flax.data.pipeline.auto_workers``) picks. ``--gil-only`` skips the timed pipelines.
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


def child(
    kind: str, cores: int, root: str, batch_size: int, seconds: float, workers: int = 0
) -> dict:
    """Images/s of one pipeline in this process (pinned to ``cores`` cores), and bytes/image:
    ``cores`` decoding threads, or with ``workers`` that many grain processes of one thread."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from eca_flax import data  # this revision's or --compare-with's, by PYTHONPATH

    make = data.train_iterator if kind == "train" else data.eval_iterator
    kwargs = dict(global_batch_size=batch_size, image_size=224, process_index=0, process_count=1)
    if kind == "train":
        kwargs["seed"] = 0
    if "threads" in inspect.signature(make).parameters:
        kwargs["threads"] = 1 if workers else cores
    if workers:
        kwargs["workers"] = workers
    images, start = 0, None
    while start is None or time.perf_counter() - start < seconds:
        for batch in make(f"folder:{root}", None, **kwargs):
            if start is None:  # after the first batch: start-up is not throughput
                start, per_image = time.perf_counter(), sum(v.nbytes for v in batch.values())
                cpu = _tree_cpu_s()
                continue
            images += batch_size
            if time.perf_counter() - start > seconds:
                break
    wall, cpu_end = time.perf_counter() - start, _tree_cpu_s()
    return {
        "images_per_s": images / wall,
        "bytes_per_image": per_image / batch_size,
        # CPU time of this process and its workers per image: what the machine's other load
        # does not change much (prefetching makes it approximate, to a few buffered batches).
        "cpu_ms_per_image": (
            1e3 * sum(t - cpu.get(pid, 0.0) for pid, t in cpu_end.items()) / images
            if cpu and cpu_end
            else None
        ),
    }


def _tree_cpu_s() -> dict[int, float] | None:
    """User + system CPU seconds of this process and each descendant, by pid (psutil), or
    None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    out = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def run_child(
    path: pathlib.Path, kind: str, cores: int, root: pathlib.Path, args, workers: int = 0
) -> dict:
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
        "--workers",
        str(workers),
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


# PIL's C calls in the train transform (cProfile's names), all of which run without the GIL:
# JPEG decoding, resampling and the RGB copy (``gil_release_check`` measures it).
GIL_FREE_CALLS = (
    "<method 'decode' of 'ImagingDecoder' objects>",
    "<method 'resize' of 'ImagingCore' objects>",
    "<method 'copy' of 'ImagingCore' objects>",
    "<method 'convert' of 'ImagingCore' objects>",
)


def _train_images(root: pathlib.Path, count: int) -> list[bytes]:
    return [f.read_bytes() for f in sorted(root.glob("train/*/*.JPEG"))[:count]]


def gil_profile(root: pathlib.Path, count: int = 128, rounds: int = 7) -> dict:
    """The share of one image's train transform that holds the GIL, on this thread's CPU time
    (not wall time: other processes on the machine do not count).

    Each round times the transform of ``count`` images unprofiled (the total), then once more
    under cProfile with the thread's CPU clock for the time inside PIL's C calls
    (GIL_FREE_CALLS); the profiler slows only the Python part, which is why the total is taken
    without it. The share is the median over rounds of 1 - C time / total (adjacent runs, so
    the machine's load hits both alike). The rest (PIL's Python-side file parsing, the crop
    box, numpy copies, the Python glue) holds the GIL.
    """
    import cProfile
    import pstats
    import statistics

    import numpy as np

    from eca_flax.data import transforms

    images = _train_images(root, count)

    def run() -> None:
        for i, data in enumerate(images):
            transforms.train_transform(data, np.random.default_rng(i), 224)

    run()  # warm-up: imports, PIL plugins, allocator
    shares, totals, calls = [], [], []
    for _ in range(rounds):
        start = time.thread_time()
        run()
        total = time.thread_time() - start
        prof = cProfile.Profile(time.thread_time)
        prof.runcall(run)
        per_call = {}
        for (_, _, name), (_, _, tottime, _, _) in pstats.Stats(prof).stats.items():
            if name in GIL_FREE_CALLS:
                per_call[name.split("'")[1]] = 1e3 * tottime / len(images)
        free = sum(per_call.values()) * len(images) / 1e3
        shares.append(max(0.0, 1.0 - free / total))
        totals.append(total)
        calls.append(per_call)
    middle = shares.index(statistics.median_low(shares))
    return {
        "ms_per_image": 1e3 * totals[middle] / len(images),
        "gil_free_ms": calls[middle],
        "gil_share": shares[middle],
        "range": (min(shares), max(shares)),
    }


def gil_release_check(root: pathlib.Path, seconds: float = 1.0) -> dict:
    """How fast a pure-Python loop runs on a second thread while this one decodes and resizes
    in a loop, against while it sleeps: near 1.0 when those calls release the GIL (a second
    core is free), far lower when they hold it."""
    import threading

    from PIL import Image

    from eca_flax.data import transforms

    data = _train_images(root, 1)[0]

    def spin(stop: threading.Event, out: list) -> None:
        n = 0
        while not stop.is_set():
            n += 1
        out.append(n)

    def rate(work) -> float:
        stop, out = threading.Event(), []
        t = threading.Thread(target=spin, args=(stop, out))
        start = time.perf_counter()
        t.start()
        while time.perf_counter() - start < seconds:
            work()
        stop.set()
        t.join()
        return out[0] / (time.perf_counter() - start)

    decoded = transforms.decode(data)
    stages = {
        "idle": lambda: time.sleep(0.01),
        "decode": lambda: transforms.decode(data),
        "resize": lambda: decoded.resize((224, 224), Image.BILINEAR, box=(10, 10, 310, 290)),
    }
    rates = {name: rate(work) for name, work in stages.items()}
    return {name: rates[name] / rates["idle"] for name in ("decode", "resize")}


def amdahl(share: float, n: int) -> float:
    """Speed-up of n threads when ``share`` of the work holds the GIL (Amdahl's law)."""
    return 1.0 / (share + (1.0 - share) / n)


def decoders(root: pathlib.Path, count: int = 128, rounds: int = 3) -> list[tuple[str, float, str]]:
    """(decoder, ms per image of decode + train crop, what it gives) on the same images: PIL
    (the pipeline's), PIL with ``draft`` (DCT scaling where the crop allows it), and simplejpeg
    when it is installed. CPU time of this thread, best of ``rounds``."""
    import io

    import numpy as np
    from PIL import Image

    from eca_flax.data import transforms

    images = _train_images(root, count)
    boxes = []
    for i, data in enumerate(images):
        with Image.open(io.BytesIO(data)) as im:
            boxes.append(transforms.random_resized_crop_box(*im.size, np.random.default_rng(i)))

    def crop(image: Image.Image, box, scale: float = 1.0) -> np.ndarray:
        top, left, h, w = (v * scale for v in box)
        return np.asarray(
            image.resize((224, 224), Image.BILINEAR, box=(left, top, left + w, top + h))
        )

    def pil(data, box):
        return crop(transforms.decode(data), box)

    drafted = [0]

    def pil_draft(data, box):
        with Image.open(io.BytesIO(data)) as im:
            w0 = im.size[0]
            # The smallest DCT scale at which the crop box still has >= 224 pixels a side.
            im.draft(
                "RGB",
                (max(1, int(im.size[0] * 224 / box[3])), max(1, int(im.size[1] * 224 / box[2]))),
            )
            drafted[0] += im.size[0] != w0
            image = im.convert("RGB")
            return crop(image, box, image.size[0] / w0)

    candidates = {"PIL (now)": pil, "PIL draft": pil_draft}
    try:
        import simplejpeg

        def sj(data, box):
            return crop(Image.fromarray(simplejpeg.decode_jpeg(data, colorspace="RGB")), box)

        candidates["simplejpeg"] = sj
    except ImportError:
        pass
    reference = [pil(d, b) for d, b in zip(images, boxes)]
    best = dict.fromkeys(candidates, math.inf)
    notes = {}
    for _ in range(rounds):  # alternating: load hits every decoder alike
        for name, fn in candidates.items():
            drafted[0] = 0
            start = time.thread_time()
            got = [fn(d, b) for d, b in zip(images, boxes)]
            best[name] = min(best[name], time.thread_time() - start)
            same = sum(np.array_equal(a, b) for a, b in zip(got, reference))
            notes[name] = f"{same}/{len(images)} crops bit-identical to PIL's"
            if name == "PIL draft":
                notes[name] += f"; DCT-scaled {drafted[0]}/{len(images)}"
    out = [(name, 1e3 * best[name] / len(images), notes[name]) for name in candidates]
    return out


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
    parser.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--repeats", type=int, default=1, help="threads/workers runs per core count (best kept)"
    )
    parser.add_argument(
        "--gil-only", action="store_true", help="only the GIL profile and the decoder comparison"
    )
    parser.add_argument(
        "--child", nargs=3, metavar=("KIND", "CORES", "ROOT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        kind, cores, root = args.child
        print(
            json.dumps(child(kind, int(cores), root, args.batch_size, args.seconds, args.workers))
        )
        return
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp, "jpegs")
        write_jpegs(root, args.num_images)
        print(
            f"{args.num_images} JPEGs ~500x375 q90, batch {args.batch_size}, {cores} CPU cores, "
            f"load average {os.getloadavg()[0]:.2f}"
        )
        measured = {} if args.gil_only else revisions_table(root, cores, args, tmp)
        gil_report(root, cores, args, measured)


def revisions_table(root: pathlib.Path, cores: int, args, tmp: str) -> dict[int, dict]:
    """Per core and all cores, train and eval, this revision (and --compare-with). Returns
    this revision's train runs by core count: the threads table's first runs (not made twice)."""
    revisions = {"this revision": REPO}
    if args.compare_with:
        revisions[args.compare_with] = checkout(args.compare_with, pathlib.Path(tmp, "rev"))
    print(
        "| pipeline | revision | img/s, 1 core | img/s, all cores | bytes/image to device "
        f"| cores for {args.target:,.0f} img/s |"
    )
    print("|---|---|---|---|---|---|")
    for kind in ("train", "eval"):
        for name, path in revisions.items():  # alternating: load hits both alike
            one = run_child(path, kind, 1, root, args)
            every = run_child(path, kind, cores, root, args)
            if (kind, name) == ("train", "this revision"):
                train = {1: one, cores: every}
            print(
                f"| {kind} | {name} | {one['images_per_s']:.1f} | "
                f"{every['images_per_s']:.1f} | {one['bytes_per_image']:,.0f} | "
                f"{math.ceil(args.target / one['images_per_s'])} |"
            )
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    return train


def gil_report(root: pathlib.Path, cores: int, args, measured: dict[int, dict]) -> None:
    """The GIL share of the train transform, the thread ceiling it implies, threads against
    grain workers at each core count, the decoders, and what data_workers="auto" picks.
    ``measured``: train runs with threads already made, by core count (used as first runs)."""
    from eca_flax.data import pipeline

    print(f"\nGIL profile of the train transform (one thread, CPU time; load {_load()}):")
    profile = gil_profile(root)
    free = ", ".join(f"{k} {v:.3f}" for k, v in profile["gil_free_ms"].items())
    share = profile["gil_share"]
    print(
        f"  {profile['ms_per_image']:.3f} ms/image ({1e3 / profile['ms_per_image']:.0f} img/s "
        f"of CPU time); in PIL's GIL-free C calls (ms): {free}"
    )
    check = gil_release_check(root, min(1.0, args.seconds))
    print(
        f"  GIL share: {share:.3f} (median of 7 rounds, range "
        f"{profile['range'][0]:.3f}-{profile['range'][1]:.3f}; an upper bound: numpy's copies, "
        "which also release it, count as held). A Python thread runs at "
        + ", ".join(f"{v:.2f}x" for v in check.values())
        + f" of its idle rate beside {' / '.join(check)} loops (1.0: GIL released)"
    )
    for n in sorted({16, cores}):
        a = amdahl(share, n)
        print(
            f"  Amdahl, {n} threads: {a:.2f}x speed-up ({a / n:.0%} of {n}x), ceiling "
            f"{1 / share:.2f}x for any number of threads"
        )
    if args.gil_only:
        rates = None
    else:
        print(f"\nthreads against grain workers (train, img/s, best of {args.repeats} runs):")
        print(
            "| cores | threads (1 process): img/s (CPU ms/image) | workers (1 thread each) | load |"
        )
        print("|---|---|---|---|")
        rates, cpu = {}, {}
        for n in sorted({1, min(2, cores), cores}):
            t = w = 0.0
            for _ in range(args.repeats):  # alternating, the best of each: the quietest moment
                a = measured.pop(n, None) or run_child(REPO, "train", n, root, args)
                b = run_child(REPO, "train", n, root, args, workers=n)
                t, w = max(t, a["images_per_s"]), max(w, b["images_per_s"])
                for key, r in (((n, "t"), a), ((n, "w"), b)):
                    if r.get("cpu_ms_per_image"):
                        cpu[key] = min(cpu.get(key, math.inf), r["cpu_ms_per_image"])
            rates[n] = (t, w)
            cpu_t, cpu_w = (_fmt_ms(cpu.get((n, k))) for k in "tw")
            print(f"| {n} | {t:.1f} ({cpu_t}) | {w:.1f} ({cpu_w}) | {_load()} |")
        one = rates[1][0]
        if cores > 1:
            scaling = rates[cores][0] / one
            implied = (cores / scaling - 1) / (cores - 1)
            efficiency = rates[cores][1] / (cores * one)
            print(
                f"  {cores} threads: {scaling:.2f}x one thread (a GIL share of {implied:.3f} by "
                f"Amdahl); {cores} workers: {efficiency:.0%} of {cores}x"
            )
        else:
            efficiency = pipeline.WORKER_EFFICIENCY
        if (1, "t") in cpu:
            # The pipeline's GIL share: grain's per-image work (reading, batching) holds it too.
            # (Workers' CPU time is not read: grain's processes are not all this one's children.)
            rate = 1e3 / cpu[(1, "t")]
            free = sum(profile["gil_free_ms"].values())
            pipe = max(share, 1.0 - free / cpu[(1, "t")])
            print(
                f"  by CPU time: the pipeline {cpu[(1, 't')]:.2f} ms/image on one thread "
                f"({rate:.0f} img/s per core), {free:.2f} of it in PIL's GIL-free calls: GIL "
                f"share of the pipeline {pipe:.3f}, Amdahl at 16 threads {amdahl(pipe, 16):.2f}x "
                f"(ceiling {1 / pipe:.2f}x): {rate * amdahl(pipe, 16):,.0f} img/s on 16 cores; "
                f"workers at the efficiency above: {rate * 16 * efficiency:,.0f} img/s"
            )
        print(
            f"  16 cores, threads: {one:.0f} x {amdahl(share, 16):.2f} = "
            f"{one * amdahl(share, 16):,.0f} img/s; workers: {one:.0f} x 16 x {efficiency:.2f} = "
            f"{one * 16 * efficiency:,.0f} img/s (target {args.target:,.0f})"
        )
    for n in sorted({16, cores}):
        w, t = pipeline.auto_workers(n)
        print(f"  data_workers='auto' on {n} cores: {w} workers x {t} threads")
    print(f"\ndecoders on the same images (decode + train crop, CPU ms/image; load {_load()}):")
    for name, ms, note in decoders(root):
        print(f"  {name:12s} {ms:.3f} ms  {note}")


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


if __name__ == "__main__":
    main()
