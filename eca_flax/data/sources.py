"""The datasets: random-access records of (encoded image, label, name), with their sizes.

* ``imagenet2012``: TFDS imagenet2012 prepared as ArrayRecord in ``data_dir`` (TFDS's default
  directory when ``data_dir`` is None), read through TFDS's data source: no TensorFlow. It is
  prepared once from the manual tars by ``python -m eca_flax.data prepare`` (``prepare``, which
  needs TensorFlow: TFDS's own builder), which also converts a TFRecord preparation in place.
* ``folder:PATH``: the original repository's layout, ``PATH/train/<class>/*.JPEG`` and
  ``PATH/val/<class>/*.JPEG`` (torchvision's IMG_EXTENSIONS, any case: jpg, jpeg, png, ppm,
  bmp, pgm, tif, tiff, webp), classes in sorted folder order as torchvision's ImageFolder;
  files are read directly, no conversion step. Directory symlinks are followed to folders
  outside the tree only, each once (a loop or a second path to the same images is refused: it
  would train them again, under another label).
* ``digits:SIZE``: scikit-learn's handwritten digits at SIZE px as a folder in the user's cache,
  written on first use (the quick start's data), with progress lines when that takes long.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pathlib
import re
import shutil
import tempfile
import time
from typing import Any

import numpy as np

from eca_flax.errors import DataError

log = logging.getLogger(__name__)

IMAGENET = "imagenet2012"
DATASET_CHOICES = (IMAGENET, "folder:PATH", "digits:SIZE")
# torchvision's IMG_EXTENSIONS (datasets/folder.py): the files its ImageFolder reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
ARRAY_RECORD = "array_record"


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Sizes and class names of a dataset (class_names None when unknown)."""

    num_classes: int
    num_train: int
    num_eval: int
    class_names: tuple[str, ...] | None


# --------------------------------------------------------------------------------------------
# Records: what the pipelines read. Both kinds pickle (for worker processes).


@dataclasses.dataclass(frozen=True)
class FolderRecords:
    """The image files of one split of a folder dataset."""

    files: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[bytes, int, str]:
        """(encoded image, label, the file's path)."""
        with open(self.files[i], "rb") as f:
            return f.read(), self.labels[i], self.files[i]


class TfdsRecords:
    """One split of a TFDS dataset prepared in ArrayRecord, encoded images undecoded."""

    def __init__(self, version_dir: str, split: str) -> None:
        import tensorflow_datasets as tfds

        self.split = split
        builder = tfds.builder_from_directory(version_dir)  # also a TFRecord one converted here
        self.source = builder.as_data_source(
            split=split, decoders={"image": tfds.decode.SkipDecoding()}
        )

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[bytes, int, str]:
        """(encoded image, label, 'split record i (file name)')."""
        record = self.source[i]
        name = record["file_name"]
        name = name.decode() if isinstance(name, bytes) else str(name)
        return record["image"], int(record["label"]), f"{self.split} record {i} ({name})"


# --------------------------------------------------------------------------------------------
# Folder datasets.


def _parse_dataset(dataset: str) -> tuple[str, str | None]:
    """Returns ('tfds', None) or ('folder', PATH); DataError for anything else."""
    if dataset == IMAGENET:
        return "tfds", None
    if isinstance(dataset, str) and dataset.startswith("folder:") and dataset[7:]:
        return "folder", dataset[7:]
    if isinstance(dataset, str) and re.fullmatch(r"digits:[1-9]\d*", dataset):
        size = int(dataset[7:])
        return "folder", write_digits_folder(digits_cache_dir(size), size)
    raise DataError(f"unknown dataset {dataset!r}; choose one of: {', '.join(DATASET_CHOICES)}")


def _check_dir(path: str, tree: str, seen: set[str]) -> None:
    """DataError naming ``path`` if the listing reached its folder before, or if it is a symlink
    back into the dataset ``tree`` (its real path) or to a folder holding it: labels are the
    class folders directly under train/ and val/, so a second path to the same images (a loop
    such as ``ln -s .. train/c0/loop``) would train them many times, under another class."""
    real = os.path.realpath(path)
    if os.path.islink(path):
        inside = real == tree or real.startswith(tree.rstrip(os.sep) + os.sep)
        if inside or tree.startswith(real.rstrip(os.sep) + os.sep):
            where = "back into" if inside else "to a folder holding"
            raise DataError(
                f"folder dataset: {path} is a directory symlink {where} the dataset {tree} "
                f"(-> {real}): a loop or a second path to the same images; remove it"
            )
    if real in seen:
        raise DataError(
            f"folder dataset: {path} leads to {real}, which the dataset already reaches by "
            "another path (a loop or a second path to the same images); remove the symlink"
        )
    seen.add(real)


def _list_class_dir(class_dir: str, tree: str, seen: set[str]) -> list[str]:
    """All image files under class_dir (recursively, like ImageFolder), sorted. Directory
    symlinks are followed once each, to folders outside the tree only (``_check_dir``)."""
    _check_dir(class_dir, tree, seen)
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        for name in dirnames:
            _check_dir(os.path.join(dirpath, name), tree, seen)
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                files.append(os.path.join(dirpath, name))
    return files


def _list_split(root: str, split: str, seen: set[str]) -> tuple[tuple[str, ...], FolderRecords]:
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise DataError(
            f"folder dataset: {split_dir} is not a directory; expected "
            f"{root}/{{train,val}}/<class>/*.JPEG"
        )
    tree = os.path.realpath(root)
    _check_dir(split_dir, tree, seen)
    classes = tuple(sorted(e.name for e in os.scandir(split_dir) if e.is_dir()))
    if not classes:
        raise DataError(f"folder dataset: no class folders in {split_dir}")
    files, labels = [], []
    for label, name in enumerate(classes):
        class_dir = os.path.join(split_dir, name)
        class_files = _list_class_dir(class_dir, tree, seen)
        if not class_files:
            raise DataError(
                f"folder dataset: no {'/'.join(IMAGE_EXTENSIONS)} images in {class_dir}"
            )
        files += class_files
        labels += [label] * len(class_files)
    return classes, FolderRecords(tuple(files), tuple(labels))


@functools.lru_cache(maxsize=8)
def _folder(path: str) -> tuple[tuple[str, ...], FolderRecords, FolderRecords]:
    """(class names, train records, val records); listed once per process (ImageNet: seconds)."""
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise DataError(f"folder dataset: {root} does not exist or is not a directory")
    seen = {os.path.realpath(root)}  # every folder listed, by real path
    classes, train = _list_split(root, "train", seen)
    val_classes, val = _list_split(root, "val", seen)
    if val_classes != classes:
        only_train = sorted(set(classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(classes))[:5]
        raise DataError(
            f"folder dataset: class folders differ between {root}/train and {root}/val "
            f"(only in train: {only_train}, only in val: {only_val})"
        )
    return classes, train, val


# --------------------------------------------------------------------------------------------
# TFDS imagenet2012.


def tfds_root(data_dir: str | None) -> str:
    if data_dir:
        return os.path.abspath(os.path.expanduser(data_dir))
    import tensorflow_datasets as tfds

    return os.path.abspath(os.path.expanduser(tfds.core.constants.DATA_DIR))


def _prepare_command(root: str) -> str:
    return f"python -m eca_flax.data prepare --data_dir {root}"


def _missing_imagenet_message(root: str) -> str:
    manual = os.path.join(root, "downloads", "manual")
    return (
        f"ImageNet (TFDS imagenet2012) is not prepared in {root}: download {TRAIN_TAR} and "
        f"{VAL_TAR} from https://image-net.org/download-images (registration required), "
        f"put both in {manual}/, then run `{_prepare_command(root)}` (takes hours on the full "
        "set; needs TensorFlow: pip install -r requirements-prepare.txt)"
    )


def _builder(root: str, **kwargs: Any) -> Any:
    import tensorflow_datasets as tfds

    return tfds.builder(IMAGENET, data_dir=root, **kwargs)


def _has_array_record(builder: Any) -> bool:
    info = builder.info
    formats = {str(getattr(info.file_format, "value", info.file_format))}
    formats |= {str(getattr(f, "value", f)) for f in info.as_proto.alternative_file_formats}
    return ARRAY_RECORD in formats


@functools.lru_cache(maxsize=8)
def _imagenet(root: str) -> tuple[str, DatasetInfo]:
    """(version dir, info) of the prepared imagenet2012 in ``root``; DataError with the steps."""
    builder = _builder(root)
    if not builder.is_prepared():
        raise DataError(_missing_imagenet_message(root))
    for split in ("train", "validation"):
        if split not in builder.info.splits:
            raise DataError(f"TFDS imagenet2012 in {root} has no {split!r} split; re-prepare it")
    if not _has_array_record(builder):
        raise DataError(
            f"TFDS imagenet2012 in {root} is prepared as TFRecord, which only TensorFlow reads; "
            f"convert it in place to ArrayRecord with `{_prepare_command(root)}` (needs "
            "TensorFlow and as much free space again as the TFRecord files)"
        )
    label = builder.info.features["label"]
    info = DatasetInfo(
        num_classes=label.num_classes,
        num_train=builder.info.splits["train"].num_examples,
        num_eval=builder.info.splits["validation"].num_examples,
        class_names=tuple(label.names),
    )
    return os.fspath(builder.data_dir), info


def prepare(data_dir: str | None) -> DatasetInfo:
    """Prepares TFDS imagenet2012 in ArrayRecord from ``<data_dir>/downloads/manual/`` with
    TFDS's own builder, or converts a TFRecord preparation in place; no-op when ready."""
    root = tfds_root(data_dir)
    try:
        import tensorflow  # noqa: F401  (TFDS's builder and TFRecord reader need it)
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            "preparing imagenet2012 needs TensorFlow: pip install -r requirements-prepare.txt "
            "(training and evaluation then read the prepared files without it)"
        ) from None
    builder = _builder(root)
    if builder.is_prepared() and not _has_array_record(builder):
        _convert_to_array_record(os.fspath(builder.data_dir))
    elif not builder.is_prepared():
        manual = os.path.join(root, "downloads", "manual")
        if any(not os.path.isfile(os.path.join(manual, t)) for t in (TRAIN_TAR, VAL_TAR)):
            raise DataError(_missing_imagenet_message(root))
        log.warning(
            "Preparing TFDS imagenet2012 in %s from %s; this takes hours on the full ImageNet "
            "(1.28M images) and needs ~150 GB of free space.",
            root,
            manual,
        )
        _builder(root, file_format=ARRAY_RECORD).download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=False)
        )
    _imagenet.cache_clear()
    return dataset_info(IMAGENET, data_dir)


def _convert_to_array_record(version_dir: str) -> None:
    """Writes an ArrayRecord copy of every TFRecord shard beside it and records the format in
    dataset_info.json: what TFDS's ``convert_format`` does in place, without Apache Beam."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import dataset_info, file_adapters

    log.warning("Converting %s from TFRecord to ArrayRecord in place.", version_dir)
    builder = tfds.builder_from_directory(version_dir)
    for split in builder.info.splits.values():
        template = split.filename_template
        out_template = template.replace(filetype_suffix=ARRAY_RECORD)
        for shard in range(split.num_shards):
            src = template.sharded_filepath(shard_index=shard, num_shards=split.num_shards)
            dst = out_template.sharded_filepath(shard_index=shard, num_shards=split.num_shards)
            if dst.exists():
                continue
            tmp = dst.parent / f".{dst.name}.incomplete"
            examples = file_adapters.TfRecordFileAdapter.make_tf_data(src)
            file_adapters.ArrayRecordFileAdapter.write_examples(
                tmp, ((i, ex.numpy()) for i, ex in enumerate(examples))
            )
            tmp.rename(dst)
    proto = dataset_info.read_proto_from_builder_dir(version_dir)
    if ARRAY_RECORD not in proto.alternative_file_formats:
        proto.alternative_file_formats.append(ARRAY_RECORD)
        dataset_info.write_dataset_info_proto(proto, dataset_info_dir=version_dir)


# --------------------------------------------------------------------------------------------
# The API the pipelines and the trainer use.


def dataset_info(dataset: str, data_dir: str | None) -> DatasetInfo:
    """Class count, split sizes and class names of ``dataset``."""
    kind, path = _parse_dataset(dataset)
    if kind == "folder":
        classes, train, val = _folder(path)
        return DatasetInfo(len(classes), len(train), len(val), classes)
    return _imagenet(tfds_root(data_dir))[1]


def records(dataset: str, data_dir: str | None, split: str) -> FolderRecords | TfdsRecords:
    """The records of the "train" or "val" split."""
    kind, path = _parse_dataset(dataset)
    if kind == "folder":
        return _folder(path)[1 if split == "train" else 2]
    version_dir, _ = _imagenet(tfds_root(data_dir))
    return TfdsRecords(version_dir, "train" if split == "train" else "validation")


def steps_per_epoch(dataset: str, data_dir: str | None, global_batch_size: int) -> int:
    """Full global batches in one pass over the training split (the remainder is dropped)."""
    if not isinstance(global_batch_size, int | np.integer) or global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    n = dataset_info(dataset, data_dir).num_train
    if n < global_batch_size:
        raise DataError(
            f"{dataset}: {n} training images are fewer than global_batch_size={global_batch_size}"
        )
    return n // global_batch_size


# --------------------------------------------------------------------------------------------
# Quick-start data: scikit-learn's handwritten digits as a folder dataset.

_DIGITS_TOTAL = 1797
PROGRESS_SECONDS = 5.0  # writing the digits: at most one progress line per this many seconds


def digits_cache_dir(image_size: int) -> str:
    """Where ``digits:SIZE`` lives: $XDG_CACHE_HOME/eca_flax/digitsSIZE (default ~/.cache)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "eca_flax", f"digits{image_size}")


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


def _duration(seconds: float) -> str:
    """'1h02m', '3m05s', '12s'."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _write_digit_pngs(
    root: pathlib.Path, digits: Any, splits: dict, image_size: int, dest: pathlib.Path
) -> None:
    """The digits of each split's indices as root/<split>/<digit>/<index>.png, upscaled. Large
    sizes take hours (digits:20000: 400-megapixel PNGs): a progress line for ``dest`` (logged at
    INFO) at most every PROGRESS_SECONDS, none for a write that ends sooner."""
    from PIL import Image

    total = sum(len(ids) for ids in splits.values())
    done, start = 0, time.monotonic()
    last = start
    for split, ids in splits.items():
        for i in ids:
            label = int(digits.target[i])
            pixels = np.round(digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize(
                (image_size, image_size), Image.BILINEAR
            )
            out = root / split / str(label)
            out.mkdir(parents=True, exist_ok=True)
            image.save(out / f"{i:04d}.png")
            done += 1
            now = time.monotonic()
            if now - last >= PROGRESS_SECONDS and done < total:
                last = now
                log.info(
                    "digits: %d/%d images written (%d%%) for %s, %s so far, about %s left",
                    done, total, 100 * done // total, dest, _duration(now - start),
                    _duration((now - start) / done * (total - done)),
                )  # fmt: skip


def write_digits_folder(path: str | os.PathLike[str], image_size: int = 32) -> str:
    """Writes sklearn's 1,797 digits, upscaled to image_size, as PATH/{train,val}/<digit>/*.png.

    80/20 stratified split (random_state=0). Written to a temp dir and renamed into place, and
    skipped when PATH already holds the complete set. Returns PATH, for ``folder:PATH``.
    """
    from eca_flax.files import deferred_interrupt, private_to_umask

    if not isinstance(image_size, int) or image_size <= 0:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    root = pathlib.Path(path).expanduser().absolute()
    if root.exists():
        if _digits_folder_complete(root, image_size):
            return str(root)
        raise DataError(
            f"{root} exists but is not a complete {image_size}x{image_size} digits folder; "
            "remove it or choose another path"
        )
    # scikit-learn only to write the folder: its import takes seconds of every train.py start.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    index = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
        index, test_size=0.2, stratify=digits.target, random_state=0
    )
    tmp = None
    try:
        try:
            root.parent.mkdir(parents=True, exist_ok=True)
            tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
        except OSError as e:
            raise DataError(f"{root}: cannot write there ({e.strerror or e})") from None
        private_to_umask(tmp)  # readable like any other new directory, not mkdtemp's 0700
        splits = {"train": train_idx, "val": val_idx}
        _write_digit_pngs(tmp, digits, splits, image_size, root)
        try:
            tmp.rename(root)
        except OSError:  # Another process finished first.
            if not _digits_folder_complete(root, image_size):
                raise
    except OSError as e:  # a full disk, ...
        raise DataError(
            f"{root}: could not write the digits ({e.strerror or e}); nothing written"
        ) from None
    finally:  # also on Ctrl-C (KeyboardInterrupt); a second one waits for the removal
        if tmp is not None:
            with deferred_interrupt():
                shutil.rmtree(tmp, ignore_errors=True)
    return str(root)
