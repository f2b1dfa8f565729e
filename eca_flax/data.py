"""Input pipelines for ECA-Net training and evaluation (tf.data, host side).

Datasets (the ``dataset`` argument of every function here):

* ``imagenet2012``: TFDS ``imagenet2012`` in ``data_dir`` (TFDS's default directory when
  ``data_dir`` is None). ImageNet cannot be downloaded automatically: put
  ``ILSVRC2012_img_train.tar`` and ``ILSVRC2012_img_val.tar`` (from image-net.org, after
  registering) into ``<data_dir>/downloads/manual/`` and run::

      python -m eca_flax.data prepare --data_dir DIR

  which runs TFDS's own builder (hours on the full set). The iterators also prepare it on
  first use when the tars are there; without them they raise ``DataError`` with these steps.
* ``folder:PATH``: the original repository's layout, ``PATH/train/<class>/*.JPEG`` and
  ``PATH/val/<class>/*.JPEG`` (jpg/jpeg/png, any case), classes in sorted folder order as
  torchvision's ImageFolder; files are read directly, no conversion step.

Quick-start data: ``python -m eca_flax.data digits PATH [--image_size 32]`` writes
scikit-learn's handwritten digits in the folder layout (use ``folder:PATH``).

Eval preprocessing reproduces the original PIL/torchvision pipeline (resize shorter side to
256 bilinear with antialiasing, center crop 224, normalize): ``preprocess_for_eval`` and the
eval pipeline run the same TF function. Training uses torchvision-style random resized crops
and flips, with stateless randomness seeded by (seed, epoch, example index) so a resumed run
(``start_step``) sees exactly the same batches as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# TensorFlow runs this module's pipelines only: keep its start-up chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import tensorflow as tf  # noqa: E402

# Keep TensorFlow off accelerators (JAX owns them; tf.data runs on the host CPU). Raises
# RuntimeError when TF is already initialized, ValueError without such a device type.
with contextlib.suppress(RuntimeError, ValueError):
    tf.config.set_visible_devices([], "GPU")

log = logging.getLogger(__name__)

MEAN_RGB: tuple[float, float, float] = (0.485, 0.456, 0.406)
STD_RGB: tuple[float, float, float] = (0.229, 0.224, 0.225)

IMAGENET = "imagenet2012"
DATASET_CHOICES = (IMAGENET, "folder:PATH", "digits:SIZE")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
DEFAULT_SHUFFLE_BUFFER = 16_384
_DCT = "INTEGER_ACCURATE"  # Decodes JPEGs as PIL/libjpeg does (TF's default DCT is ~1 level off).


class DataError(Exception):
    """The requested data is missing or malformed; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Sizes and class names of a dataset (class_names None when unknown)."""

    num_classes: int
    num_train: int
    num_eval: int
    class_names: tuple[str, ...] | None


# --------------------------------------------------------------------------------------------
# Dataset sources.


@dataclasses.dataclass(frozen=True)
class _FolderData:
    root: str
    class_names: tuple[str, ...]
    train_files: tuple[str, ...]
    train_labels: np.ndarray
    val_files: tuple[str, ...]
    val_labels: np.ndarray


def _parse_dataset(dataset: str) -> tuple[str, str | None]:
    """Returns ('tfds', None) or ('folder', PATH); DataError for anything else.

    ``digits:SIZE`` is the folder of scikit-learn's digits at SIZE px in the user's cache
    (written on first use; see ``write_digits_folder``).
    """
    if dataset == IMAGENET:
        return "tfds", None
    if isinstance(dataset, str) and dataset.startswith("folder:") and dataset[7:]:
        return "folder", dataset[7:]
    if isinstance(dataset, str) and re.fullmatch(r"digits:[1-9]\d*", dataset):
        size = int(dataset[7:])
        return "folder", write_digits_folder(digits_cache_dir(size), size)
    raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASET_CHOICES)}")


def _list_class_dir(class_dir: str) -> list[str]:
    """All image files under class_dir (recursively, like ImageFolder), sorted."""
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                files.append(os.path.join(dirpath, name))
    return files


def _list_split(root: str, split: str) -> tuple[tuple[str, ...], list[str], list[int]]:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(
            f"folder dataset: {split_dir} is not a directory; expected "
            f"{root}/{{train,val}}/<class>/*.JPEG"
        )
    classes = tuple(sorted(e.name for e in os.scandir(split_dir) if e.is_dir()))
    if not classes:
        raise DataError(f"folder dataset: no class folders in {split_dir}")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_files = _list_class_dir(os.path.join(split_dir, name))
        if not class_files:
            raise DataError(
                f"folder dataset: no {'/'.join(IMAGE_EXTENSIONS)} images in "
                f"{os.path.join(split_dir, name)}"
            )
        files += class_files
        labels += [label] * len(class_files)
    return classes, files, labels


@functools.lru_cache(maxsize=8)
def _folder_data(path: str) -> _FolderData:
    """Lists a folder dataset once per process (listing ImageNet takes seconds)."""
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise DataError(f"folder dataset: {root} does not exist or is not a directory")
    classes, train_files, train_labels = _list_split(root, "train")
    val_classes, val_files, val_labels = _list_split(root, "val")
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(classes))[:5]
        raise DataError(
            f"folder dataset: class folders differ between {root}/train and {root}/val "
            f"(only in train: {only_train}, only in val: {only_val})"
        )
    return _FolderData(
        root=root,
        class_names=classes,
        train_files=tuple(train_files),
        train_labels=np.asarray(train_labels, np.int32),
        val_files=tuple(val_files),
        val_labels=np.asarray(val_labels, np.int32),
    )


def _tfds_root(data_dir: str | None) -> str:
    if data_dir:
        return os.path.abspath(os.path.expanduser(data_dir))
    import tensorflow_datasets as tfds

    return os.path.abspath(os.path.expanduser(tfds.core.constants.DATA_DIR))


def _missing_imagenet_message(root: str) -> str:
    manual = os.path.join(root, "downloads", "manual")
    return (
        f"ImageNet (TFDS imagenet2012) is not prepared in {root}: download {TRAIN_TAR} and "
        f"{VAL_TAR} from https://image-net.org/download-images (registration required), "
        f"put both in {manual}/, then run `python -m eca_flax.data prepare --data_dir {root}` "
        "(takes hours on the full set)"
    )


_BUILDERS: dict[str, Any] = {}


def _imagenet_builder(data_dir: str | None, *, prepare: bool = True) -> Any:
    """The prepared TFDS imagenet2012 builder; prepares it from the manual tars if needed."""
    root = _tfds_root(data_dir)
    if root in _BUILDERS:
        return _BUILDERS[root]
    import tensorflow_datasets as tfds

    builder = tfds.builder(IMAGENET, data_dir=root)
    if not builder.is_prepared():
        manual = os.path.join(root, "downloads", "manual")
        missing = [t for t in (TRAIN_TAR, VAL_TAR) if not os.path.isfile(os.path.join(manual, t))]
        if missing or not prepare:
            raise DataError(_missing_imagenet_message(root))
        try:
            import importlib_resources  # noqa: F401  (TFDS 4.9 needs it to build datasets)
        except ImportError as e:
            raise DataError(
                "preparing TFDS datasets needs the importlib_resources package: "
                "pip install importlib_resources"
            ) from e
        log.warning(
            "Preparing TFDS imagenet2012 in %s from %s; this takes hours on the full "
            "ImageNet (1.28M images) and needs ~150 GB of free space.",
            root,
            manual,
        )
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
        )
        log.warning("Prepared TFDS imagenet2012 in %s.", root)
    for split in ("train", "validation"):
        if split not in builder.info.splits:
            raise DataError(f"TFDS imagenet2012 in {root} has no {split!r} split; re-prepare it")
    _BUILDERS[root] = builder
    return builder


def prepare(data_dir: str | None) -> DatasetInfo:
    """Prepares TFDS imagenet2012 from ``<data_dir>/downloads/manual/`` (no-op if prepared)."""
    _imagenet_builder(data_dir, prepare=True)
    return dataset_info(IMAGENET, data_dir)


def dataset_info(dataset: str, data_dir: str | None) -> DatasetInfo:
    """Class count, split sizes and class names of ``dataset``."""
    kind, path = _parse_dataset(dataset)
    if kind == "folder":
        d = _folder_data(path)
        return DatasetInfo(len(d.class_names), len(d.train_files), len(d.val_files), d.class_names)
    builder = _imagenet_builder(data_dir)
    label = builder.info.features["label"]
    return DatasetInfo(
        num_classes=label.num_classes,
        num_train=builder.info.splits["train"].num_examples,
        num_eval=builder.info.splits["validation"].num_examples,
        class_names=tuple(label.names),
    )


def steps_per_epoch(dataset: str, data_dir: str | None, global_batch_size: int) -> int:
    """Full global batches in one pass over the training split (the remainder is dropped)."""
    _check_positive("global_batch_size", global_batch_size)
    n = dataset_info(dataset, data_dir).num_train
    if n < global_batch_size:
        raise DataError(
            f"{dataset}: {n} training images are fewer than global_batch_size={global_batch_size}"
        )
    return n // global_batch_size


# --------------------------------------------------------------------------------------------
# Image transforms (TF ops, run inside tf.data or eagerly).


def _decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG (incl. grayscale/CMYK) as PIL does, or PNG/GIF/BMP, to uint8 RGB HWC."""

    def other() -> tf.Tensor:
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        return image

    return tf.cond(
        tf.io.is_jpeg(image_bytes),
        lambda: tf.io.decode_jpeg(image_bytes, channels=3, dct_method=_DCT),
        other,
    )


def _normalize(image: tf.Tensor) -> tf.Tensor:
    """[0, 255] RGB -> (x / 255 - mean) / std, float32."""
    image = tf.cast(image, tf.float32) / 255.0
    return (image - tf.constant(MEAN_RGB)) / tf.constant(STD_RGB)


def default_resize_size(image_size: int) -> int:
    """Eval resize of the shorter side: 256 for 224 (the original's ratio), rounded."""
    return round(image_size * 256 / 224)


def _resize_shorter(image: tf.Tensor, size: int | tf.Tensor, round_to_uint8: bool) -> tf.Tensor:
    """torchvision Resize(size): short side -> size, long side -> int(size * long / short)."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    size_f = tf.cast(size, tf.float64)
    new_h = tf.where(h <= w, size_f, tf.floor(size_f * h / w))
    new_w = tf.where(h <= w, tf.floor(size_f * w / h), size_f)
    new_hw = tf.cast(tf.stack([new_h, new_w]), tf.int32)
    image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
    if round_to_uint8:  # PIL resizes in uint8: round like it does.
        image = tf.clip_by_value(tf.round(image), 0.0, 255.0)
    return image


def _center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """torchvision CenterCrop: top = int(round((h - size) / 2.0)) (round half to even)."""
    shape = tf.shape(image)
    top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float64) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float64) / 2.0), tf.int32)
    return image[top : top + size, left : left + size]


def _eval_transform(
    image_bytes: tf.Tensor, image_size: int, resize_size: int | None = None
) -> tf.Tensor:
    """Eval preprocessing: decode, resize shorter side, center crop, normalize -> (S, S, 3)."""
    if resize_size is None:
        resize_size = default_resize_size(image_size)
    if resize_size < image_size:
        raise ValueError(f"resize_size={resize_size} must be >= image_size={image_size}")
    image = _decode_rgb(image_bytes)
    image = _resize_shorter(image, resize_size, round_to_uint8=True)
    image = _normalize(_center_crop(image, image_size))
    image.set_shape([image_size, image_size, 3])
    return image


def preprocess_for_eval(
    image_bytes: bytes, image_size: int = 224, resize_size: int | None = None
) -> np.ndarray:
    """Eval preprocessing of one encoded image -> float32 (image_size, image_size, 3)."""
    _check_positive("image_size", image_size)
    return _eval_transform(tf.constant(image_bytes), image_size, resize_size).numpy()


def _random_resized_crop_window(
    height: tf.Tensor,
    width: tf.Tensor,
    seed: tf.Tensor,
    area_range: tuple[float, float],
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tf.Tensor:
    """torchvision RandomResizedCrop.get_params, vectorized: [top, left, h, w] (int32).

    Draws `attempts` (area, aspect) pairs, takes the first that fits, else falls back to the
    central crop with the aspect ratio clamped to ratio_range, exactly as torchvision.
    """
    s_area, s_ratio, s_top, s_left = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
    h = tf.cast(height, tf.float64)
    w = tf.cast(width, tf.float64)
    target_area = (h * w) * tf.random.stateless_uniform(
        [attempts], s_area, area_range[0], area_range[1], tf.float64
    )
    log_ratio = tf.random.stateless_uniform(
        [attempts], s_ratio, math.log(ratio_range[0]), math.log(ratio_range[1]), tf.float64
    )
    aspect = tf.exp(log_ratio)
    cw = tf.round(tf.sqrt(target_area * aspect))  # Python round(): half to even, as tf.round.
    ch = tf.round(tf.sqrt(target_area / aspect))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
    in_ratio = w / h
    fb_w = tf.where(
        in_ratio < ratio_range[0],
        w,
        tf.where(in_ratio > ratio_range[1], tf.round(h * ratio_range[1]), w),
    )
    fb_h = tf.where(in_ratio < ratio_range[0], tf.round(w / ratio_range[0]), h)
    found = tf.reduce_any(fits)
    crop_h = tf.cast(tf.where(found, ch[first], fb_h), tf.int32)
    crop_w = tf.cast(tf.where(found, cw[first], fb_w), tf.int32)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    top = tf.where(
        found,
        tf.random.stateless_uniform([], s_top, 0, height - crop_h + 1, tf.int32),
        (height - crop_h) // 2,
    )
    left = tf.where(
        found,
        tf.random.stateless_uniform([], s_left, 0, width - crop_w + 1, tf.int32),
        (width - crop_w) // 2,
    )
    return tf.stack([top, left, crop_h, crop_w])


def _decode_random_crop(
    image_bytes: tf.Tensor, seed: tf.Tensor, area_range: tuple[float, float]
) -> tf.Tensor:
    """Random resized crop window; JPEGs decode only the window (decode_and_crop_jpeg)."""

    def jpeg() -> tf.Tensor:
        shape = tf.image.extract_jpeg_shape(image_bytes)
        window = _random_resized_crop_window(shape[0], shape[1], seed, area_range)
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3, dct_method=_DCT)

    def other() -> tf.Tensor:
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        image.set_shape([None, None, 3])
        shape = tf.shape(image)
        top, left, h, w = tf.unstack(
            _random_resized_crop_window(shape[0], shape[1], seed, area_range)
        )
        return image[top : top + h, left : left + w]

    return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def _parse_augment(augment: str) -> int | None:
    """'inception_crop' -> None; 'pad_crop:N' -> N (pixels of random shift)."""
    if augment == "inception_crop":
        return None
    if augment.startswith("pad_crop:") and augment[9:].isdigit():
        return int(augment[9:])
    raise ValueError(f"augment={augment!r}: choose 'inception_crop' or 'pad_crop:N' (N pixels)")


def _train_transform(
    image_bytes: tf.Tensor,
    seed: tf.Tensor,
    image_size: int,
    area_range: tuple[float, float] = (0.08, 1.0),
    augment: str = "inception_crop",
    hflip: bool = True,
) -> tf.Tensor:
    """Train preprocessing of one image with stateless randomness from `seed` (shape [2])."""
    pad = _parse_augment(augment)
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    if pad is None:
        image = _decode_random_crop(image_bytes, crop_seed, area_range)
        image = tf.image.resize(image, [image_size, image_size], "bilinear", antialias=True)
    else:  # Fit to image_size like eval (no zoom), then shift by up to `pad` px (zero fill).
        image = _decode_rgb(image_bytes)
        image = _center_crop(_resize_shorter(image, image_size, round_to_uint8=False), image_size)
        image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
        offsets = tf.random.stateless_uniform([2], crop_seed, 0, 2 * pad + 1, tf.int32)
        image = image[offsets[0] : offsets[0] + image_size, offsets[1] : offsets[1] + image_size]
    if hflip:
        flip = tf.random.stateless_uniform([], flip_seed) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    image = _normalize(image)
    image.set_shape([image_size, image_size, 3])
    return image


# --------------------------------------------------------------------------------------------
# Pipelines.


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value <= 0:
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


def _options() -> tf.data.Options:
    options = tf.data.Options()
    options.deterministic = True
    options.autotune.enabled = True
    options.threading.max_intra_op_parallelism = 1
    options.experimental_optimization.map_parallelization = True
    return options


def _tfds_split(builder: Any, split: str, start: int, end: int) -> tf.data.Dataset:
    """Records [start, end) of a TFDS split in stored order as (image_bytes, label int32)."""
    import tensorflow_datasets as tfds

    ds = builder.as_dataset(
        split=f"{split}[{start}:{end}]",
        shuffle_files=False,
        decoders={"image": tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False),  # Parallel, deterministic reads.
    )
    return ds.map(lambda ex: (ex["image"], tf.cast(ex["label"], tf.int32)))


def _shard(n: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous [start, end) of n items for shard `index` of `count` (sizes differ by <= 1)."""
    return index * n // count, (index + 1) * n // count


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
    shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches {'image': float32 (B,S,S,3), 'label': int32 (B,)} per process.

    Epoch e is a permutation seeded by (seed, e), cut to whole global batches; each process
    gets its own part. Augmentation is seeded by (seed, epoch, example index), so starting at
    ``start_step`` reproduces exactly the batches an uninterrupted run sees from that step.
    folder: a global permutation per epoch, strided across processes; skipping is free.
    imagenet2012: a contiguous shard of TFDS's (already shuffled) stored order per process,
    shuffled per epoch with a ``shuffle_buffer``-sized buffer; skipping reads the skipped
    records (no decoding).
    """
    index, count, per_process = _process_layout(global_batch_size, process_index, process_count)
    _check_positive("image_size", image_size)
    _parse_augment(augment)
    if not 0.0 < area_range[0] <= area_range[1] <= 1.0:
        raise ValueError(f"area_range={area_range} must satisfy 0 < low <= high <= 1")
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0")
    steps = steps_per_epoch(dataset, data_dir, global_batch_size)
    start_epoch, skip_batches = divmod(start_step, steps)
    per_epoch = steps * per_process  # Examples per process per epoch.
    seed_t = tf.constant(seed, tf.int64)
    kind, path = _parse_dataset(dataset)

    if kind == "folder":
        d = _folder_data(path)
        files = tf.constant(d.train_files)
        labels = tf.constant(d.train_labels)
        n = len(d.train_files)

        def epoch_examples(epoch: tf.Tensor) -> tf.data.Dataset:
            perm = tf.random.experimental.stateless_shuffle(
                tf.range(n, dtype=tf.int64), seed=tf.stack([seed_t, epoch])
            )
            mine = perm[: steps * global_batch_size][index::count]
            return tf.data.Dataset.from_tensor_slices((tf.fill([per_epoch], epoch), mine))

        ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_examples)
        ds = ds.skip(skip_batches * per_process)

        def load(epoch: tf.Tensor, i: tf.Tensor) -> tuple[tf.Tensor, ...]:
            return epoch, i, tf.io.read_file(tf.gather(files, i)), tf.gather(labels, i)

        ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    else:
        builder = _imagenet_builder(data_dir)
        start, end = _shard(builder.info.splits["train"].num_examples, index, count)
        base = _tfds_split(builder, "train", start, end).enumerate(start)
        buffer = max(1, min(shuffle_buffer, end - start))

        def epoch_examples(epoch: tf.Tensor) -> tf.data.Dataset:
            epoch_seed = seed_t * 1_000_003 + epoch  # tf.data shuffle takes one int64 seed.
            shuffled = base.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
            return shuffled.take(per_epoch).map(lambda i, ex: (epoch, i, ex[0], ex[1]))

        ds = tf.data.Dataset.range(start_epoch, 2**62).flat_map(epoch_examples)
        ds = ds.skip(skip_batches * per_process)

    def transform(
        epoch: tf.Tensor, i: tf.Tensor, image_bytes: tf.Tensor, label: tf.Tensor
    ) -> dict[str, tf.Tensor]:
        example_seed = tf.random.experimental.stateless_fold_in(tf.stack([seed_t, epoch]), i)
        image = _train_transform(image_bytes, example_seed, image_size, area_range, augment, hflip)
        return {"image": image, "label": label}

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(per_process, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options()).as_numpy_iterator()


def eval_iterator(
    dataset: str,
    data_dir: str | None,
    *,
    global_batch_size: int,
    image_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    resize_size: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """One pass over the validation split: {'image', 'label' int32, 'mask' float32} batches.

    Each process reads a contiguous shard, so every image appears exactly once overall. The
    last batch is padded (mask 0.0, label 0, zero image) and processes with shorter shards add
    all-masked batches, so every process yields the same number of full batches.
    """
    index, count, per_process = _process_layout(global_batch_size, process_index, process_count)
    _check_positive("image_size", image_size)
    kind, path = _parse_dataset(dataset)
    if kind == "folder":
        d = _folder_data(path)
        n = len(d.val_files)
        start, end = _shard(n, index, count)
        files = list(d.val_files[start:end])
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant(files, tf.string, [len(files)]), d.val_labels[start:end])
        ).map(lambda f, y: (tf.io.read_file(f), y))
    else:
        builder = _imagenet_builder(data_dir)
        n = builder.info.splits["validation"].num_examples
        start, end = _shard(n, index, count)
        ds = _tfds_split(builder, "validation", start, end) if end > start else None
    if n == 0:
        raise DataError(f"{dataset}: the validation split is empty")
    longest_shard = math.ceil(n / count)
    num_batches = math.ceil(longest_shard / per_process)  # The same on every process.
    num_pad = num_batches * per_process - (end - start)

    def transform(image_bytes: tf.Tensor, label: tf.Tensor) -> dict[str, tf.Tensor]:
        image = _eval_transform(image_bytes, image_size, resize_size)
        return {"image": image, "label": label, "mask": tf.constant(1.0)}

    padding = tf.data.Dataset.from_tensors(
        {
            "image": tf.zeros([image_size, image_size, 3]),
            "label": tf.constant(0, tf.int32),
            "mask": tf.constant(0.0),
        }
    ).repeat(num_pad)
    if end > start:
        ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.concatenate(padding)
    else:
        ds = padding
    ds = ds.batch(per_process, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options()).as_numpy_iterator()


# --------------------------------------------------------------------------------------------
# Quick-start data: scikit-learn's handwritten digits as a folder dataset.

_DIGITS_TOTAL = 1797


def _digits_folder_complete(root: pathlib.Path, image_size: int) -> bool:
    counts = [
        len(list((root / split).glob("*/*.png"))) if (root / split).is_dir() else 0
        for split in ("train", "val")
    ]
    if sum(counts) != _DIGITS_TOTAL or not all(counts):
        return False
    from PIL import Image

    with Image.open(next((root / "train").glob("*/*.png"))) as im:
        return im.size == (image_size, image_size)


def digits_cache_dir(image_size: int) -> str:
    """Where ``digits:SIZE`` lives: $XDG_CACHE_HOME/eca_flax/digitsSIZE (default ~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "eca_flax", f"digits{image_size}")


def write_digits_folder(path: str | os.PathLike[str], image_size: int = 32) -> str:
    """Writes sklearn's 1,797 digits, upscaled to image_size, as PATH/{train,val}/<digit>/*.png.

    80/20 stratified split (random_state=0). Written to a temp dir and renamed into place, and
    skipped when PATH already holds the complete set. Returns PATH, for ``folder:PATH``.
    """
    from PIL import Image
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_positive("image_size", image_size)
    root = pathlib.Path(path).expanduser().absolute()
    if root.exists():
        if _digits_folder_complete(root, image_size):
            return str(root)
        raise DataError(
            f"{root} exists but is not a complete {image_size}x{image_size} digits folder; "
            "remove it or choose another path"
        )
    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        index, test_size=0.2, stratify=digits.target, random_state=0
    )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        for split, ids in (("train", train_idx), ("val", val_idx)):
            for i in ids:
                label = int(digits.target[i])
                pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
                image = Image.fromarray(pixels, mode="L").resize(
                    (image_size, image_size), Image.BILINEAR
                )
                out = tmp / split / str(label)
                out.mkdir(parents=True, exist_ok=True)
                image.save(out / f"{i:04d}.png")
        try:
            tmp.rename(root)
        except OSError:  # Another process finished first.
            if not _digits_folder_complete(root, image_size):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(root)


# --------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
    """`prepare --data_dir DIR` (TFDS imagenet2012) or `digits PATH` (quick-start folder)."""
    parser = argparse.ArgumentParser(
        prog="python -m eca_flax.data", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="prepare TFDS imagenet2012 from <data_dir>/downloads/manual")
    p.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's default)")
    g = sub.add_parser("digits", help="write scikit-learn's digits as a folder dataset")
    g.add_argument("path")
    g.add_argument("--image_size", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "prepare":
            info = prepare(args.data_dir)
            print(
                f"imagenet2012 ready in {_tfds_root(args.data_dir)}: {info.num_train} train, "
                f"{info.num_eval} validation images, {info.num_classes} classes"
            )
        else:
            print(f"folder:{write_digits_folder(args.path, args.image_size)}")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
