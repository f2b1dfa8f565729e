"""Test data builders: a miniature ImageNet in the real ILSVRC2012 tar layout, and digits.

``build_mini_imagenet(root)`` writes ``ILSVRC2012_img_train.tar`` (a tar of per-synset tars
``nXXXXXXXX.tar`` of ``nXXXXXXXX_N.JPEG``) and ``ILSVRC2012_img_val.tar`` (a flat tar of
``ILSVRC2012_val_000000NN.JPEG``) into ``root/downloads/manual`` and prepares them with TFDS's
own imagenet2012 builder, into ``root`` (the TFDS data_dir), in ArrayRecord. Images are real
JPEGs cut from scikit-learn's two sample photos, landscape and portrait, with a grayscale and a
CMYK JPEG in each split and a PNG disguised as .JPEG (as ImageNet has). TFDS assigns validation
labels by sorted file name from its bundled list of the 50,000 real labels, so the val files
carry the real indices 1..N and their real synsets; the train synsets are those same synsets.

``shared_mini_imagenet()`` / ``shared_digits_folder()`` build once per process into a temp dir
(removed at exit), for tests in any file.
"""

from __future__ import annotations

import atexit
import functools
import io
import os
import pathlib
import shutil
import tarfile
import tempfile

import numpy as np
from PIL import Image

NUM_VAL = 7  # Odd on purpose: no batch size > 1 divides it.
TRAIN_PER_CLASS = 4
_SK_IMAGES = pathlib.Path(__import__("sklearn.datasets").datasets.__file__).parent / "images"
PHOTO_FILES = (_SK_IMAGES / "china.jpg", _SK_IMAGES / "flower.jpg")


def _tfds_label_file(name: str) -> pathlib.Path:
    import tensorflow_datasets as tfds

    return pathlib.Path(tfds.__file__).parent / "datasets" / "imagenet2012" / name


@functools.cache
def tfds_synsets() -> tuple[str, ...]:
    """TFDS imagenet2012's 1000 class names (synsets); labels index this tuple."""
    return tuple(_tfds_label_file("labels.txt").read_text().split())


@functools.cache
def val_synsets() -> tuple[str, ...]:
    """Synsets of the real validation images 1..NUM_VAL (from TFDS's bundled label list)."""
    return tuple(_tfds_label_file("validation_labels.txt").read_text().split()[:NUM_VAL])


def val_file_names() -> list[str]:
    return [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, NUM_VAL + 1)]


def expected_val_labels() -> list[int]:
    """Ground-truth TFDS label index of each validation image, in file-name order."""
    return [tfds_synsets().index(s) for s in val_synsets()]


def expected_train_labels() -> list[int]:
    return [tfds_synsets().index(s) for s in val_synsets() for _ in range(TRAIN_PER_CLASS)]


def photo(index: int) -> Image.Image:
    """One of scikit-learn's two sample photos (china 640x427, flower 640x427), RGB."""
    with Image.open(PHOTO_FILES[index % 2]) as im:
        return Image.fromarray(np.asarray(im.convert("RGB")))  # Drops the ICC profile.


def _encode(image: Image.Image, mode: str) -> bytes:
    buf = io.BytesIO()
    if mode == "PNG":
        image.save(buf, "PNG")
    else:
        image.convert(mode).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _varied_image(rng: np.random.Generator, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    """A random crop of a sample photo resized to a small landscape or portrait size."""
    src = photo(int(rng.integers(2)))
    w, h = src.size
    cw, ch = int(rng.integers(120, 400)), int(rng.integers(120, 420))
    left, top = int(rng.integers(0, w - cw)), int(rng.integers(0, h - ch))
    long_side, short_side = int(rng.integers(60, 110)), int(rng.integers(40, 60))
    size = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    image = src.crop((left, top, left + cw, top + ch)).resize(size, Image.BILINEAR)
    return _encode(image, "PNG" if fmt == "PNG" else mode)


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_ilsvrc_tars(manual_dir: pathlib.Path, seed: int = 0) -> None:
    """Writes the two ILSVRC2012 tars (train: tar of per-synset tars; val: flat tar)."""
    rng = np.random.default_rng(seed)
    manual_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train_tar:
        for c, synset in enumerate(val_synsets()):
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as class_tar:
                for k in range(TRAIN_PER_CLASS):
                    mode = {(0, 1): "L", (1, 2): "CMYK"}.get((c, k), "RGB")
                    # TFDS converts this real ImageNet PNG-in-disguise file name to JPEG.
                    disguised = synset == "n02105855" and k == 0
                    name = "n02105855_2933.JPEG" if disguised else f"{synset}_{k + 1}.JPEG"
                    fmt = "PNG" if disguised else "JPEG"
                    _add_bytes(class_tar, name, _varied_image(rng, mode, fmt))
            _add_bytes(train_tar, f"{synset}.tar", buf.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val_tar:
        for i, name in enumerate(val_file_names()):
            mode = {2: "L", 4: "CMYK"}.get(i, "RGB")
            _add_bytes(val_tar, name, _varied_image(rng, mode))


def build_mini_imagenet(root: pathlib.Path, file_format: str = "array_record") -> str:
    """Writes the tars into root/downloads/manual and prepares TFDS imagenet2012 in root, with
    TFDS's own builder (which needs TensorFlow), as ArrayRecord (what eca_flax reads) or, to
    test the conversion, TFRecord."""
    import tensorflow_datasets as tfds

    root = pathlib.Path(root)
    builder = tfds.builder("imagenet2012", data_dir=os.fspath(root), file_format=file_format)
    if not builder.is_prepared():
        manual = root / "downloads" / "manual"
        write_ilsvrc_tars(manual)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                manual_dir=os.fspath(manual), try_download_gcs=False
            )
        )
    return os.fspath(root)


def _temp_dir(prefix: str) -> pathlib.Path:
    path = pathlib.Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def shared_mini_imagenet() -> str:
    """data_dir of a mini ImageNet built once per process (temp dir, removed at exit)."""
    return build_mini_imagenet(_temp_dir("mini_imagenet_"))


@functools.cache
def shared_digits_folder(image_size: int = 32) -> str:
    """PATH of the digits folder dataset (use 'folder:' + PATH), written once per process."""
    from eca_flax import data

    return data.write_digits_folder(_temp_dir("digits_") / "digits", image_size)
