"""Train and eval batches on grain: deterministic, resumable, each process its own part.

The training stream is a sequence of positions: position p is example ``perm_e[p % E]`` of
epoch ``e = p // E``, where E = steps_per_epoch * global_batch and ``perm_e`` is a global
permutation seeded by (seed, e); global batch s is positions [s * G, (s + 1) * G) and process i
takes its contiguous 1/count of it, so every process count sees the same global batches in
the same order. Each example's augmentation is seeded by (seed, epoch, index), so starting at
``start_step`` reproduces exactly the batches an uninterrupted run sees, at no cost (random
access). Threads and grain worker processes read whole batches (``_batches``), so the batch of
step N is the same whatever their numbers. Validation reads each process's contiguous shard
once, padded to the same number of full batches on every process (``mask`` 0 on padding).

Batches are uint8 images (B, S, S, 3), int32 labels, and ``damaged``: 1 where the slot's own
file is unreadable (so a batch's sum counts each damaged file it met once). An unreadable file
stops the pipeline with a DataError naming it, unless ``skip_damaged``: then a train slot takes
the next readable example of the epoch (augmented with the damaged one's seed) and a
validation slot is masked out.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image

from eca_flax.data import randaugment as ra
from eca_flax.data import sources, transforms
from eca_flax.errors import DataError

Batch = dict[str, np.ndarray]


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int | np.integer) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _process_layout(
    global_batch_size: int, process_index: int | None, process_count: int | None
) -> tuple[int, int, int]:
    """(process_index, process_count, per-process batch size), defaulting to JAX's."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    _check_positive("global_batch_size", global_batch_size)
    _check_positive("process_count", process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by "
            f"process_count={process_count}"
        )
    return process_index, process_count, global_batch_size // process_count


def default_threads() -> int:
    """Decoding threads: every core this process may use (PIL releases the GIL)."""
    return len(os.sched_getaffinity(0))


# benchmarks/input_pipeline.py (docs/benchmarks.md, "Sized for big hosts"), 2-core AMD EPYC:
# the share of the train transform's CPU time that holds the GIL (PIL's Python-side JPEG
# parsing, the crop box, glue; the rest is PIL's C decoding and resampling), and what grain
# workers of one thread each make of N cores: N workers' images/s / (N x one thread's), 652 /
# (2 x 378) in the quietest measurement (issue 21).
TRAIN_GIL_SHARE = 0.30
WORKER_EFFICIENCY = 0.86
# Workers only where they are predicted to beat threads by more than this: a worker costs a
# process (start-up, memory) and an IPC copy of every batch, and at 2 cores the two measured
# within noise of each other.
WORKER_MARGIN = 1.25


def auto_workers(cores: int, gil_share: float = TRAIN_GIL_SHARE) -> tuple[int, int]:
    """(grain worker processes, decoding threads in each) for ``data_workers="auto"`` on
    ``cores`` cores: threads in this process (0 workers) while Amdahl's law for the GIL share
    keeps them within WORKER_MARGIN of what workers make (WORKER_EFFICIENCY x cores), else one
    worker of one thread per core (each process has its own GIL)."""
    threads = 1.0 / (gil_share + (1.0 - gil_share) / cores)
    if cores * WORKER_EFFICIENCY > WORKER_MARGIN * threads:
        return cores, 1
    return 0, cores


def _batches(
    positions: range, load: Callable[[int], dict], per_process: int, threads: int, workers: int
) -> Iterator[Batch]:
    """grain: batch b is ``load`` of positions [b * per_process, (b + 1) * per_process), stacked,
    yielded in order; ``threads`` threads (in each of ``workers`` processes, if any) each read
    whole batches.

    Batches are formed before the work is split: grain's worker processes take whole elements
    of the dataset in turn, so with single images as elements (batched after the split) which
    images shared a batch depended on the worker count and the start step. Here an element is
    a batch, so its images are a function of the positions only, whatever the workers and
    threads."""
    import grain

    ds = grain.MapDataset.range(positions.start, positions.stop).map(load)
    ds = ds.batch(per_process, drop_remainder=True)
    # One batch per thread in flight, two at least (the next one while a step runs).
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(2, threads))
    it = ds.to_iter_dataset(options)
    if workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain 0.2 reads its own absl flags in the workers
            flags.FLAGS.mark_as_parsed()
        options = grain.MultiprocessingOptions(num_workers=workers)
        it = it.mp_prefetch(options, worker_init_fn=_end_with_the_trainer)
        it = it.map(_release_shared_names)
    return iter(it)


def _release_shared_names(batch: Batch) -> Batch:
    """``batch`` with the names of its shared memory unlinked as it arrives from a worker.

    grain unlinks them when the arrays are freed, in a thread pool that the interpreter's exit
    cuts short: the batches still held then (the transfers in flight, those of a failed step)
    were "There appear to be N leaked shared_memory objects" at every exit, from the resource
    tracker the workers registered them with. Unlinked here (which unregisters them), the
    memory stays mapped while the arrays live and goes with them, or with the process.
    """
    for array in batch.values():
        if getattr(array, "_unlink_on_del", False):  # grain's SharedMemoryArray, its owner
            array._unlink_on_del = False
            array.shm.unlink()
    return batch


def _end_with_the_trainer(index: int, count: int) -> None:
    """grain's worker init, in each worker process: the worker ends when the trainer that
    started it does, however (SIGKILL; ``os._exit``, which skips multiprocessing's stopping of
    its daemon workers). grain's workers do not watch for that: they wait forever to hand their
    next batch over, holding their memory.

    A thread waits on multiprocessing's parent sentinel, a pipe whose other end only the trainer
    holds, so it is readable once the trainer is gone (at once if it already is), and ends the
    worker. Not PR_SET_PDEATHSIG: it follows the *thread* that started the worker, and grain
    starts workers from its prefetch threads, which end (close, set_state) while the trainer
    runs on.
    """
    import multiprocessing
    import threading

    trainer = multiprocessing.parent_process()
    if trainer is None:  # not a spawned worker
        return

    def wait_then_exit() -> None:
        trainer.join()
        os._exit(1)  # nothing to hand over to; the resource tracker removes what is left

    threading.Thread(target=wait_then_exit, name="end-with-the-trainer", daemon=True).start()


_LARGE_HINT = "; --config.allow_large_images=True reads it"


def _read(records: sources.FolderRecords | sources.TfdsRecords, index: int, transform: Callable):
    """(transform(encoded image), label) of record ``index``; DataError naming the file."""
    try:
        data, label, name = records[index]
    except OSError as e:
        raise DataError(f"{e.filename or index}: unreadable ({e.strerror or e})") from None
    try:
        return transform(data), label
    except transforms.DECODE_ERRORS as e:
        large = _LARGE_HINT if isinstance(e, Image.DecompressionBombError) else ""
        raise DataError(f"{name}: {transforms.decode_problem(e, data)}{large}") from None


_SKIP_HINT = "; --config.skip_damaged_images=True skips such files"


class _TrainExample:
    """This process's i-th example -> {'image', 'label', 'damaged'} (picklable, for workers).

    Example i is slot i % P of this process's part (P images from ``offset``) of global batch
    ``first_step + i // P``, which holds the stream positions [s * G, (s + 1) * G).
    """

    def __init__(
        self,
        records,
        *,
        seed: int,
        per_epoch: int,
        layout: tuple[int, int, int, int],
        skip_damaged: bool,
        **augment,
    ):
        self.records, self.seed, self.per_epoch = records, seed, per_epoch
        self.first_step, self.global_batch, self.offset, self.per_process = layout
        self.skip_damaged, self.augment = skip_damaged, augment

    @functools.lru_cache(maxsize=2)  # noqa: B019 - two epochs in flight at an epoch boundary
    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.records))

    def __call__(self, i: int) -> dict:
        step, slot = divmod(int(i), self.per_process)
        position = (self.first_step + step) * self.global_batch + self.offset + slot
        epoch, k = divmod(position, self.per_epoch)
        perm = self.permutation(epoch)
        index = int(perm[k])
        transform = functools.partial(
            self._augment, np.random.default_rng([self.seed, epoch, index])
        )
        for damaged in range(len(perm)):  # the next readable example of the epoch, if skipping
            try:
                image, label = _read(self.records, int(perm[(k + damaged) % len(perm)]), transform)
                # Its own file only: the files after it are counted by their own slots.
                return {"image": image, "label": np.int32(label), "damaged": np.int32(damaged > 0)}
            except DataError as e:
                if not self.skip_damaged:
                    raise DataError(f"{e}{_SKIP_HINT}") from None
        raise DataError("no readable image in the training split")

    def _augment(self, rng: np.random.Generator, data: bytes) -> np.ndarray:
        return transforms.train_transform(data, rng, **self.augment)


class _EvalExample:
    """Shard position -> {'image', 'label', 'mask', 'damaged'}; past the shard: padding."""

    def __init__(self, records, start: int, end: int, skip_damaged: bool, **eval_args):
        self.records, self.start, self.end = records, start, end
        self.skip_damaged, self.eval_args = skip_damaged, eval_args
        size = eval_args["image_size"]
        self.blank = np.zeros((size, size, 3), np.uint8)

    def __call__(self, position: int) -> dict:
        index = self.start + int(position)
        out = {
            "image": self.blank,
            "label": np.int32(0),
            "mask": np.float32(0.0),
            "damaged": np.int32(0),
        }
        if index >= self.end:
            return out
        try:
            image, label = _read(self.records, index, self._transform)
        except DataError as e:
            if not self.skip_damaged:
                raise DataError(f"{e}{_SKIP_HINT}") from None
            return {**out, "damaged": np.int32(1)}
        return {
            "image": image,
            "label": np.int32(label),
            "mask": np.float32(1.0),
            "damaged": np.int32(0),
        }

    def _transform(self, data: bytes) -> np.ndarray:
        return transforms.eval_transform(data, **self.eval_args)


def train_iterator(
    dataset: str,
    data_dir: str | None,
    *,
    global_batch_size: int,
    image_size: int,
    seed: int,
    start_step: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    area_range: tuple[float, float] = (0.08, 1.0),
    augment: str = "inception_crop",
    hflip: bool = True,
    randaugment: str = "",
    skip_damaged: bool = False,
    allow_large_images: bool = False,
    threads: int | None = None,
    workers: int = 0,
) -> Iterator[Batch]:
    """Infinite training batches {'image': uint8 (B,S,S,3), 'label', 'damaged'} of this process.

    Epoch e is a permutation seeded by (seed, e), cut to whole global batches; starting at
    ``start_step`` gives exactly the batches an uninterrupted run sees from that step.
    ``randaugment``: a timm-style spec such as "rand-m6-mstd0.5-inc1" ("" for none).
    ``allow_large_images``: images over PIL's limit against decompression bombs (178,956,970
    pixels) are read, not refused as too large.
    """
    index, count, per_process = _process_layout(global_batch_size, process_index, process_count)
    _check_positive("image_size", image_size)
    transforms.parse_augment(augment)
    if not 0.0 < area_range[0] <= area_range[1] <= 1.0:
        raise ValueError(f"area_range={area_range} must satisfy 0 < low <= high <= 1")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    steps = sources.steps_per_epoch(dataset, data_dir, global_batch_size)
    load = _TrainExample(
        sources.records(dataset, data_dir, "train"),
        seed=seed,
        per_epoch=steps * global_batch_size,
        layout=(start_step, global_batch_size, index * per_process, per_process),
        skip_damaged=skip_damaged,
        image_size=image_size,
        area_range=tuple(area_range),
        augment=augment,
        hflip=hflip,
        randaugment=ra.parse(randaugment),
        allow_large=allow_large_images,
    )
    forever = range(2**40 * per_process)
    if threads is None:  # every core: split among the workers, if any
        threads = max(1, default_threads() // max(workers, 1))
    return _batches(forever, load, per_process, threads, workers)


def eval_iterator(
    dataset: str,
    data_dir: str | None,
    *,
    global_batch_size: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    resize_size: int | None = None,
    interpolation: str = "bilinear",
    skip_damaged: bool = False,
    allow_large_images: bool = False,
    threads: int | None = None,
) -> Iterator[Batch]:
    """One pass over the validation split: {'image' uint8, 'label', 'mask', 'damaged'} batches
    (``allow_large_images`` as in ``train_iterator``).

    Each process reads a contiguous shard, so every image appears exactly once overall. The
    last batch is padded (mask 0.0, label 0, zero image) and processes with shorter shards add
    all-masked batches, so every process yields the same number of full batches.
    """
    index, count, per_process = _process_layout(global_batch_size, process_index, process_count)
    _check_positive("image_size", image_size)
    records = sources.records(dataset, data_dir, "val")
    n = len(records)
    if n == 0:
        raise DataError(f"{dataset}: the validation split is empty")
    start, end = index * n // count, (index + 1) * n // count
    num_batches = math.ceil(math.ceil(n / count) / per_process)  # the same on every process
    transforms.interpolation_filter(interpolation)
    load = _EvalExample(
        records,
        start,
        end,
        skip_damaged,
        image_size=image_size,
        resize_size=resize_size,
        interpolation=interpolation,
        allow_large=allow_large_images,
    )
    return _batches(
        range(num_batches * per_process), load, per_process, threads or default_threads(), workers=0
    )


def preprocess_for_eval(
    image_bytes: bytes,
    image_size: int | None = None,
    resize_size: int | None = None,
    *,
    weights: str | os.PathLike[str] | None = None,
    interpolation: str | None = None,
) -> np.ndarray:
    """Eval preprocessing of one encoded image -> normalized float32 (image_size, image_size, 3):
    exactly what the eval pipeline feeds the model (its uint8 output, normalized).

    With ``weights`` (a pretrained directory or .safetensors file), the preprocessing its
    model.json records (``transforms.eval_settings``: timm's models their test size, crop_pct,
    bicubic; the original's 256 -> 224 bilinear); arguments given override it
    (``transforms.override_eval``). Without, the original's: 224, resize by the 256/224 ratio,
    bilinear.
    """
    settings = transforms.ORIGINAL_EVAL
    if weights is not None:  # imported here: eca_flax.data imports no JAX (grain's workers)
        from eca_flax.weights.pretrained import read_model_json

        settings = transforms.eval_settings(read_model_json(weights))
    settings = transforms.override_eval(settings, image_size, resize_size, interpolation)
    _check_positive("image_size", settings["image_size"])
    image = transforms.eval_transform(
        image_bytes, settings["image_size"], settings["resize_size"], settings["interpolation"]
    )
    return transforms.normalize(image, settings["mean"], settings["std"])
