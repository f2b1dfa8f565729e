"""Tests of eca_flax.data on real files: TFDS imagenet2012 built from ILSVRC-layout tars (read
as ArrayRecord), folder datasets, the torchvision transforms on PIL, the quick-start digits."""

from __future__ import annotations

import collections
import io
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import warnings

import imagenet_fixture
import numpy as np
import pytest
from faults import popen_interruptible, run_on_small_disk
from PIL import Image
from test_train import cli_env, train_cli

from eca_flax import data, errors
from eca_flax.cli import shell
from eca_flax.data import sources, transforms
from eca_flax.data.__main__ import main as data_cli

MEAN = np.asarray(data.MEAN_RGB, np.float32)
STD = np.asarray(data.STD_RGB, np.float32)


# ------------------------------------------------------------------------------------------
# Helpers.


def pil_eval_uint8(image_bytes: bytes, image_size: int = 224, resize: int = 256) -> np.ndarray:
    """torchvision Resize(resize) + CenterCrop(image_size) on a PIL image, as uint8."""
    with Image.open(io.BytesIO(image_bytes)) as im:
        im = im.convert("RGB")
        w, h = im.size
        if w <= h:
            ow, oh = resize, int(resize * h / w)
        else:
            ow, oh = int(resize * w / h), resize
        im = im.resize((ow, oh), Image.BILINEAR)  # PIL's bilinear antialiases when shrinking.
        top = int(round((oh - image_size) / 2.0))
        left = int(round((ow - image_size) / 2.0))
        return np.asarray(im.crop((left, top, left + image_size, top + image_size)))


def pil_eval_reference(image_bytes: bytes, image_size: int = 224, resize: int = 256) -> np.ndarray:
    """... + ToTensor + Normalize: the original's eval input, float32."""
    x = pil_eval_uint8(image_bytes, image_size, resize).astype(np.float32) / 255.0
    return (x - MEAN) / STD


def encode(image: Image.Image, fmt: str = "JPEG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (image.convert(mode) if mode else image).save(buf, fmt, quality=90)
    return buf.getvalue()


def photo_bytes(index: int, box: tuple[int, int, int, int] | None = None) -> bytes:
    """A sample photo (or a crop of it) as JPEG bytes; the full photo is the original file."""
    if box is None:
        return imagenet_fixture.PHOTO_FILES[index].read_bytes()
    return encode(imagenet_fixture.photo(index).crop(box))


def collect(iterator) -> list[dict[str, np.ndarray]]:
    return list(iterator)


def masked_labels(batches: list[dict[str, np.ndarray]]) -> list[int]:
    return [int(y) for b in batches for y, m in zip(b["label"], b["mask"]) if m == 1.0]


def write_folder(root: pathlib.Path, spec: dict[str, dict[str, int]]) -> pathlib.Path:
    """Folder dataset root/{split}/{class}/ with n small images per class, mixed extensions."""
    exts = ["JPEG", "jpg", "PNG", "jpeg", "png"]
    rng = np.random.default_rng(0)
    for split, classes in spec.items():
        for name, count in classes.items():
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                ext = exts[k % len(exts)]
                pixels = rng.integers(0, 256, (20 + k, 24, 3), dtype=np.uint8)
                fmt = "PNG" if ext.lower() == "png" else "JPEG"
                (d / f"img{k}.{ext}").write_bytes(encode(Image.fromarray(pixels), fmt))
            (d / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="session")
def mini_imagenet() -> str:
    return imagenet_fixture.shared_mini_imagenet()


@pytest.fixture(scope="session")
def digits_path() -> str:
    return imagenet_fixture.shared_digits_folder(32)


# ------------------------------------------------------------------------------------------
# Eval transform: parity with the original PIL pipeline.

PHOTOS = {
    "china_landscape": (0, None),
    "flower_landscape": (1, None),
    "china_portrait": (0, (150, 0, 450, 427)),
    "flower_portrait": (1, (200, 10, 461, 420)),
}


@pytest.mark.parametrize("name", sorted(PHOTOS))
@pytest.mark.parametrize("image_size", [224, 160])
def test_preprocess_for_eval_matches_pil(name: str, image_size: int) -> None:
    image_bytes = photo_bytes(*PHOTOS[name])
    out = data.preprocess_for_eval(image_bytes, image_size)
    assert out.shape == (image_size, image_size, 3) and out.dtype == np.float32
    resize = data.default_resize_size(image_size)
    err = float(np.abs(out - pil_eval_reference(image_bytes, image_size, resize)).mean())
    print(f"preprocess_for_eval {name} @{image_size}: mean |delta| vs PIL = {err:.5f}")
    assert err <= 0.01
    # The eval transform is the PIL pipeline itself: bit-exact in uint8.
    np.testing.assert_array_equal(
        transforms.eval_transform(image_bytes, image_size),
        pil_eval_uint8(image_bytes, image_size, resize),
    )


def test_default_resize_size() -> None:
    assert data.default_resize_size(224) == 256
    assert data.default_resize_size(160) == 183
    assert data.default_resize_size(32) == 37


@pytest.mark.parametrize(
    ("hw", "expected"),
    [((427, 640), (256, 383)), ((640, 427), (383, 256)), ((300, 300), (256, 256))],
)
def test_resize_long_side_truncates_like_torchvision(hw, expected) -> None:
    # int(256 * 640 / 427) = int(383.7) = 383, where rounding would give 384.
    image = Image.new("RGB", hw[::-1])
    assert transforms.resize_shorter(image, 256).size[::-1] == expected


@pytest.mark.parametrize("extra", [0, 1, 2, 3, 4, 5, 7])
def test_center_crop_rounds_like_torchvision(extra: int) -> None:
    size = 6
    h, w = size + extra, size + extra + 3
    image = np.arange(h * w, dtype=np.uint8).reshape(h, w)
    top, left = int(round(extra / 2.0)), int(round((extra + 3) / 2.0))  # Python: half to even.
    want = image[top : top + size, left : left + size]
    got = np.asarray(transforms.center_crop(Image.fromarray(image), size))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpeg_decode_to_rgb(mode: str) -> None:
    image_bytes = encode(imagenet_fixture.photo(1).crop((0, 0, 400, 300)), "JPEG", mode)
    with Image.open(io.BytesIO(image_bytes)) as im:
        assert im.mode == mode
    out = data.preprocess_for_eval(image_bytes, 128)
    assert out.shape == (128, 128, 3)
    err = float(np.abs(out - pil_eval_reference(image_bytes, 128, 146)).mean())
    assert err <= 0.01, err
    if mode == "L":  # Three equal channels before normalization.
        x = out * STD + MEAN
        np.testing.assert_allclose(x[..., 0], x[..., 2], atol=1e-5)


def test_png_decodes() -> None:
    image_bytes = encode(imagenet_fixture.photo(0).crop((0, 0, 300, 200)), "PNG")
    out = data.preprocess_for_eval(image_bytes, 96)
    err = float(np.abs(out - pil_eval_reference(image_bytes, 96, 110)).mean())
    assert err <= 0.01, err


def test_16_bit_png_is_scaled_to_8_bits(tmp_path: pathlib.Path) -> None:
    """Issue 31, finding 4: a 16-bit grayscale PNG read through convert("RGB") was clipped at
    255 (almost white); it is scaled by 255/65535, in the pipelines and in predict."""
    from eca_flax import predict

    rng = np.random.default_rng(0)
    wide = rng.integers(0, 65536, (16, 16), dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(wide).save(path)
    with Image.open(path) as check:
        assert check.mode == "I;16"
    want = np.repeat(np.round(wide / 257).astype(np.uint8)[..., None], 3, axis=-1)
    np.testing.assert_array_equal(transforms.eval_transform(path.read_bytes(), 16, 16), want)
    np.testing.assert_array_equal(predict.load_image(str(path), 16, 16), want)
    # PIL's "I" mode (32-bit; some 16-bit PNGs and TIFFs read so) is taken as 16-bit too.
    tiff = tmp_path / "deep.tif"
    Image.fromarray(wide.astype(np.int32), "I").save(tiff)
    np.testing.assert_array_equal(transforms.eval_transform(tiff.read_bytes(), 16, 16), want)


def test_palette_with_transparency_decodes_without_a_warning() -> None:
    """Issue 31, finding 16: PIL's "Palette images with Transparency expressed in bytes should
    be converted to RGBA images" warning reached stderr for such PNGs; decoded to the same RGB
    as convert("RGB"), without it."""
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = Image.fromarray(pixels).convert("P")
    buf = io.BytesIO()
    image.save(buf, "PNG", transparency=bytes([0] * 8 + [255] * 248))
    with Image.open(io.BytesIO(buf.getvalue())) as original, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = np.asarray(original.convert("RGB"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = transforms.eval_transform(buf.getvalue(), 16, 16)
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------
# Train transform.


def test_random_resized_crop_window_respects_ranges() -> None:
    h, w = 427, 640
    for s in range(200):
        rng = np.random.default_rng([7, s])
        top, left, ch, cw = transforms.random_resized_crop_box(w, h, rng, (0.08, 1.0))
        assert 0 <= top <= h - ch and 0 <= left <= w - cw
        area = ch * cw / (h * w)
        assert 0.08 * 0.97 <= area <= 1.0
        assert 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1


def test_random_resized_crop_falls_back_to_center_crop() -> None:
    # 10 x 1000: no sampled crop fits, so torchvision takes h=10, w=round(10 * 4/3), centered.
    box = transforms.random_resized_crop_box(1000, 10, np.random.default_rng(1), (0.08, 1))
    assert list(box) == [0, (1000 - 13) // 2, 10, 13]


def test_train_transform_flips_and_is_deterministic() -> None:
    square = imagenet_fixture.photo(0).crop((100, 0, 527, 427)).resize((64, 64))
    image_bytes = encode(square, "PNG")
    base = np.asarray(square)
    flipped = 0
    for s in range(24):
        out = transforms.train_transform(
            image_bytes, np.random.default_rng([3, s]), 64, area_range=(1.0, 1.0)
        )
        again = transforms.train_transform(
            image_bytes, np.random.default_rng([3, s]), 64, area_range=(1.0, 1.0)
        )
        assert out.dtype == np.uint8 and out.shape == (64, 64, 3)
        np.testing.assert_array_equal(out, again)
        if np.array_equal(out, base):
            continue
        np.testing.assert_array_equal(out, base[:, ::-1])
        flipped += 1
    assert 3 <= flipped <= 21  # Both orientations occur (p = 0.5 each).


def test_pad_crop_zero_equals_eval_at_native_size(digits_path: str) -> None:
    path = sorted(pathlib.Path(digits_path, "val", "3").glob("*.png"))[0]
    image_bytes = path.read_bytes()
    rng = np.random.default_rng(0)
    out = transforms.train_transform(image_bytes, rng, 32, augment="pad_crop:0", hflip=False)
    want = transforms.eval_transform(image_bytes, 32, resize_size=32)
    np.testing.assert_array_equal(out, want)
    shifted = [
        transforms.train_transform(image_bytes, np.random.default_rng(s), 32, augment="pad_crop:4")
        for s in range(4)
    ]
    assert all(x.shape == (32, 32, 3) for x in shifted)
    assert any(np.abs(x.astype(int) - want).max() > 25 for x in shifted)


def test_bad_augment_rejected() -> None:
    with pytest.raises(ValueError, match="pad_crop:N"):
        transforms.parse_augment("random_erase")


# ------------------------------------------------------------------------------------------
# TFDS imagenet2012 built from ILSVRC-layout tars.


def test_imagenet_dataset_info(mini_imagenet: str) -> None:
    info = data.dataset_info("imagenet2012", mini_imagenet)
    assert (info.num_classes, info.num_train, info.num_eval) == (
        1000,
        imagenet_fixture.TRAIN_PER_CLASS * imagenet_fixture.NUM_VAL,
        imagenet_fixture.NUM_VAL,
    )
    assert info.class_names == imagenet_fixture.tfds_synsets()
    assert data.steps_per_epoch("imagenet2012", mini_imagenet, 8) == 28 // 8


def val_bytes_by_label(data_dir: str) -> dict[int, bytes]:
    """Raw bytes of each val image from the manual tar, keyed by its (unique) label."""
    tar_path = pathlib.Path(data_dir, "downloads", "manual", "ILSVRC2012_img_val.tar")
    with tarfile.open(tar_path) as tar:
        raw = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    names = imagenet_fixture.val_file_names()
    return dict(zip(imagenet_fixture.expected_val_labels(), (raw[n] for n in names)))


def test_imagenet_eval_counts_every_image_once(mini_imagenet: str) -> None:
    batches = collect(
        data.eval_iterator(
            "imagenet2012",
            mini_imagenet,
            global_batch_size=4,
            image_size=64,
            process_index=0,
            process_count=1,
        )
    )
    assert len(batches) == 2
    for b in batches:
        assert b["image"].shape == (4, 64, 64, 3) and b["image"].dtype == np.uint8
        assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32
    assert sum(float(b["mask"].sum()) for b in batches) == imagenet_fixture.NUM_VAL
    assert sorted(masked_labels(batches)) == sorted(imagenet_fixture.expected_val_labels())
    # The pipeline runs exactly preprocess_for_eval; padding is zeros.
    raw = val_bytes_by_label(mini_imagenet)
    for b in batches:
        for image, label, mask in zip(b["image"], b["label"], b["mask"]):
            if mask:
                want = data.preprocess_for_eval(raw[int(label)], 64)
                np.testing.assert_allclose(transforms.normalize(image), want, atol=1e-6)
            else:
                assert not image.any()


@pytest.mark.parametrize("global_batch_size", [2, 4, 6])
def test_imagenet_eval_two_processes(mini_imagenet: str, global_batch_size: int) -> None:
    per_process = [
        collect(
            data.eval_iterator(
                "imagenet2012",
                mini_imagenet,
                global_batch_size=global_batch_size,
                image_size=32,
                process_index=i,
                process_count=2,
            )
        )
        for i in range(2)
    ]
    assert len(per_process[0]) == len(per_process[1]) > 0
    assert all(b["label"].shape == (global_batch_size // 2,) for p in per_process for b in p)
    labels = masked_labels(per_process[0]) + masked_labels(per_process[1])
    assert sorted(labels) == sorted(imagenet_fixture.expected_val_labels())


def test_imagenet_train_batches(mini_imagenet: str) -> None:
    it = data.train_iterator(
        "imagenet2012",
        mini_imagenet,
        global_batch_size=4,
        image_size=48,
        seed=0,
        process_index=0,
        process_count=1,
    )
    epoch = [next(it) for _ in range(7)]  # 28 images / 4 = 7 steps.
    for b in epoch:
        assert b["image"].shape == (4, 48, 48, 3) and b["image"].dtype == np.uint8
        assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    labels = sorted(int(y) for b in epoch for y in b["label"])
    assert labels == sorted(imagenet_fixture.expected_train_labels())
    stds = [float(transforms.normalize(b["image"]).std()) for b in epoch]
    assert min(stds) > 0.1  # Real photo content, not blank crops.


def test_imagenet_train_two_processes_cover_epoch(mini_imagenet: str) -> None:
    labels = []
    for i in range(2):
        it = data.train_iterator(
            "imagenet2012",
            mini_imagenet,
            global_batch_size=4,
            image_size=16,
            seed=1,
            process_index=i,
            process_count=2,
        )
        batches = [next(it) for _ in range(7)]
        assert all(b["label"].shape == (2,) for b in batches)
        labels += [int(y) for b in batches for y in b["label"]]
    assert sorted(labels) == sorted(imagenet_fixture.expected_train_labels())


@pytest.mark.parametrize("dataset_kind", ["imagenet", "folder"])
def test_train_resume_reproduces_batches(mini_imagenet: str, digits_path: str, dataset_kind):
    if dataset_kind == "imagenet":
        dataset, data_dir, batch, k = "imagenet2012", mini_imagenet, 8, 4  # 3 steps/epoch.
    else:
        dataset, data_dir, batch, k = f"folder:{digits_path}", None, 256, 7  # 5 steps/epoch.
    kwargs = dict(global_batch_size=batch, image_size=32, process_index=0, process_count=1)
    it = data.train_iterator(dataset, data_dir, seed=5, **kwargs)
    run = [next(it) for _ in range(k + 2)]
    resumed = data.train_iterator(dataset, data_dir, seed=5, start_step=k, **kwargs)
    for step in (k, k + 1):
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], run[step]["image"])
        np.testing.assert_array_equal(got["label"], run[step]["label"])
    other = next(data.train_iterator(dataset, data_dir, seed=6, **kwargs))
    assert not np.array_equal(other["image"], run[0]["image"])
    steps = data.steps_per_epoch(dataset, data_dir, batch)
    assert not np.array_equal(run[0]["image"], run[steps]["image"])  # Epochs differ.


def test_cli_prepares_from_manual_dir(tmp_path: pathlib.Path, capsys) -> None:
    imagenet_fixture.write_ilsvrc_tars(tmp_path / "downloads" / "manual")
    assert data_cli(["prepare", "--data_dir", os.fspath(tmp_path)]) == 0
    assert "28 train, 7 validation images, 1000 classes" in capsys.readouterr().out
    assert data.dataset_info("imagenet2012", os.fspath(tmp_path)).num_eval == 7


def test_tfrecord_preparation_is_refused_then_converted_in_place(tmp_path: pathlib.Path) -> None:
    """An older TFRecord preparation: reading names the command; that command converts it in
    place, and the converted records read without TensorFlow's reader."""
    root = imagenet_fixture.build_mini_imagenet(tmp_path, file_format="tfrecord")
    with pytest.raises(errors.DataError) as e:
        data.dataset_info("imagenet2012", root)
    assert "prepared as TFRecord" in str(e.value)
    assert f"`python -m eca_flax.data prepare --data_dir {root}`" in str(e.value)
    assert data_cli(["prepare", "--data_dir", root]) == 0
    assert list(pathlib.Path(root).glob("imagenet2012/*/*.tfrecord-*"))  # beside, not instead
    batches = collect(
        data.eval_iterator("imagenet2012", root, global_batch_size=7, image_size=32,
                           process_index=0, process_count=1)
    )  # fmt: skip
    assert sorted(masked_labels(batches)) == sorted(imagenet_fixture.expected_val_labels())


# ------------------------------------------------------------------------------------------
# Missing data and bad arguments.


def test_missing_imagenet_explains_steps(tmp_path: pathlib.Path) -> None:
    calls = [
        lambda: data.dataset_info("imagenet2012", os.fspath(tmp_path)),
        lambda: data.train_iterator(
            "imagenet2012", os.fspath(tmp_path), global_batch_size=2, image_size=32, seed=0,
            process_index=0, process_count=1,
        ),
        lambda: data.eval_iterator(
            "imagenet2012", os.fspath(tmp_path), global_batch_size=2, image_size=32,
            process_index=0, process_count=1,
        ),
    ]  # fmt: skip
    for call in calls:
        with pytest.raises(errors.DataError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg
        assert os.path.join(os.fspath(tmp_path), "downloads", "manual") in msg
        assert "ILSVRC2012_img_train.tar" in msg and "ILSVRC2012_img_val.tar" in msg
        assert "python -m eca_flax.data prepare --data_dir" in msg
    assert data_cli(["prepare", "--data_dir", os.fspath(tmp_path)]) == 1


def test_unknown_dataset_lists_choices() -> None:
    for name in ("cifar10", "folder:", "imagenet"):
        with pytest.raises(errors.DataError, match=r"imagenet2012.*folder:PATH"):
            data.dataset_info(name, None)


def test_batch_not_divisible_by_processes(digits_path: str) -> None:
    with pytest.raises(ValueError, match="divisible"):
        data.eval_iterator(
            f"folder:{digits_path}", None, global_batch_size=5, image_size=32,
            process_index=0, process_count=2,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------
# Folder datasets.


def test_folder_dataset_classes_counts_and_eval(tmp_path: pathlib.Path) -> None:
    spec = {
        "train": {"zebra": 3, "Apple": 2, "mango": 4},
        "val": {"zebra": 2, "Apple": 1, "mango": 2},
    }
    root = write_folder(tmp_path / "ds", spec)
    info = data.dataset_info(f"folder:{root}", None)
    assert info.class_names == ("Apple", "mango", "zebra")  # sorted(), as ImageFolder.
    assert (info.num_classes, info.num_train, info.num_eval) == (3, 9, 5)
    batches = collect(
        data.eval_iterator(
            f"folder:{root}", None, global_batch_size=4, image_size=16,
            process_index=0, process_count=1,
        )
    )  # fmt: skip
    assert len(batches) == 2
    assert sorted(masked_labels(batches)) == [0, 1, 1, 2, 2]
    it = data.train_iterator(
        f"folder:{root}", None, global_batch_size=4, image_size=16, seed=0,
        process_index=0, process_count=1,
    )  # fmt: skip
    b = next(it)
    assert b["image"].shape == (4, 16, 16, 3) and set(b["label"]) <= {0, 1, 2}


# torchvision's IMG_EXTENSIONS (torchvision/datasets/folder.py) and the PIL format of each.
IMAGE_FORMATS = {
    "jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "ppm": "PPM", "bmp": "BMP", "pgm": "PPM",
    "tif": "TIFF", "tiff": "TIFF", "webp": "WEBP",
}  # fmt: skip


def test_folder_reads_the_files_imagefolder_reads(tmp_path: pathlib.Path) -> None:
    """Issue 31, finding 2: .bmp, .webp, .tif, ... were left out silently; every extension of
    torchvision's ImageFolder is listed (any case) and decodes, other files are not."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        d = tmp_path / "ds" / split / "a"
        d.mkdir(parents=True)
        for i, (ext, fmt) in enumerate(IMAGE_FORMATS.items()):
            pixels = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert("L" if ext == "pgm" else "RGB")
            name = f"img{i}.{ext.upper() if i % 2 else ext}"
            (d / name).write_bytes(encode(image, fmt))
        (d / "notes.txt").write_text("not an image")
        (d / "anim.gif").write_bytes(encode(Image.fromarray(pixels), "GIF"))  # not ImageFolder's
    info = data.dataset_info(f"folder:{tmp_path / 'ds'}", None)
    assert (info.num_train, info.num_eval) == (9, 9)
    batches = collect(
        data.eval_iterator(
            f"folder:{tmp_path / 'ds'}", None, global_batch_size=9, image_size=8,
            process_index=0, process_count=1,
        )
    )  # fmt: skip
    assert len(batches) == 1 and batches[0]["mask"].sum() == 9 and not batches[0]["damaged"].any()


def test_folder_two_processes_split_epoch(tmp_path: pathlib.Path) -> None:
    # One image per class, so labels identify images.
    spec = {"train": {f"c{i}": 1 for i in range(9)}, "val": {f"c{i}": 1 for i in range(9)}}
    root = write_folder(tmp_path / "ds", spec)
    seen = []
    for i in range(2):
        it = data.train_iterator(
            f"folder:{root}", None, global_batch_size=4, image_size=8, seed=3,
            process_index=i, process_count=2,
        )  # fmt: skip
        seen += [int(y) for _ in range(2) for y in next(it)["label"]]  # 9 // 4 = 2 steps.
    assert len(seen) == 8 and len(set(seen)) == 8


@pytest.mark.parametrize("problem", ["missing", "no_val", "empty_split", "empty_class", "differ"])
def test_folder_errors_name_the_path(tmp_path: pathlib.Path, problem: str) -> None:
    root = tmp_path / "ds"
    if problem == "no_val":
        write_folder(root, {"train": {"a": 1}})
        bad = root / "val"
    elif problem == "empty_split":
        write_folder(root, {"train": {"a": 1}, "val": {"a": 0}})
        bad = root / "val" / "a"
    elif problem == "empty_class":
        write_folder(root, {"train": {"a": 1, "b": 0}, "val": {"a": 1, "b": 1}})
        bad = root / "train" / "b"
    elif problem == "differ":
        write_folder(root, {"train": {"a": 1, "b": 1}, "val": {"a": 1, "c": 1}})
        bad = root
    else:
        bad = root
    with pytest.raises(errors.DataError) as e:
        data.dataset_info(f"folder:{root}", None)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def symlink(link: pathlib.Path, target: str | pathlib.Path) -> None:
    """``ln -s TARGET LINK`` for a directory, replacing a folder already at LINK."""
    if link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=True)


# case -> the directory symlinks to make (LINK, TARGET; OUT: a folder of images outside DS), and
# the one the error names; relative to tmp_path
LINKS_BACK = {
    "loop": ([("DS/train/c0/loop", "..")], "DS/train/c0/loop"),  # the ln -s ..
    "to the root": ([("DS/train/c0/all", "../..")], "DS/train/c0/all"),
    "second path": ([("DS/train/c1/more", "../c0")], "DS/train/c1/more"),
    "class folder": ([("DS/val/c2", "../train/c2")], "DS/val/c2"),
    "split folder": ([("DS/val", "train")], "DS/val"),
    "holding the tree": ([("DS/train/c0/up", "../../..")], "DS/train/c0/up"),
    "outside, twice": ([("DS/train/c0/x", "OUT"), ("DS/train/c2/x", "OUT")], "DS/train/c2/x"),
    "loop outside": ([("OUT/sub", "."), ("DS/train/c0/x", "OUT")], "DS/train/c0/x/sub"),
}


@pytest.mark.parametrize("case", sorted(LINKS_BACK))
def test_folder_symlink_back_into_the_tree_is_refused(tmp_path: pathlib.Path, case, capsys):
    """A directory symlink that leads back into the dataset (a loop, a second path to the same
    images) is one line naming it, and the run that would count its images does not start."""
    spec = {"train": {"c0": 2, "c1": 2, "c2": 2}, "val": {"c0": 1, "c1": 1, "c2": 1}}
    root = write_folder(tmp_path / "DS", spec)
    outside = write_folder(tmp_path / "outside", {"more": {"a": 2}}) / "more" / "a"
    links, named = LINKS_BACK[case]
    for link, target in links:
        link = tmp_path / link.replace("OUT", os.path.relpath(outside, tmp_path))
        symlink(link, outside if target == "OUT" else target)
    dataset = f"folder:{root}"
    with pytest.raises(errors.DataError) as e:
        data.dataset_info(dataset, None)
    message = str(e.value)
    named = str(tmp_path / named.replace("OUT", os.path.relpath(outside, tmp_path)))
    assert message.startswith(f"folder dataset: {named} ") and "\n" not in message, message
    assert message.endswith("remove it") or message.endswith("remove the symlink"), message
    # As a command line reports it (train.py reads steps_per_epoch first): one line, exit 1.
    assert shell.run(lambda: data.steps_per_epoch(dataset, None, 2)) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: {message}\n")


def test_folder_symlinks_out_of_the_tree_are_followed(tmp_path: pathlib.Path) -> None:
    """Symlinked files (to anywhere), and directory symlinks to folders outside the tree (a
    class folder, a folder inside one, the dataset root itself), are read as before."""
    root = write_folder(tmp_path / "DS", {"train": {"c0": 2, "c1": 2}, "val": {"c0": 1, "c1": 1}})
    outside = write_folder(tmp_path / "outside", {"more": {"c0": 3, "c2": 2, "v2": 1}}) / "more"
    symlink(root / "train" / "c0" / "extra", outside / "c0")  # 3 more c0 images
    symlink(root / "train" / "c2", outside / "c2")  # a class folder elsewhere
    symlink(root / "val" / "c2", outside / "v2")
    (root / "train" / "c1" / "linked.jpg").symlink_to(outside / "c0" / "img1.jpg")
    (root / "val" / "c1" / "again.jpg").symlink_to(root / "train" / "c1" / "img0.JPEG")
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    for path in (root, tmp_path / "alias"):
        info = data.dataset_info(f"folder:{path}", None)
        assert info.class_names == ("c0", "c1", "c2")
        assert (info.num_train, info.num_eval) == (2 + 3 + 2 + 1 + 2, 1 + 2 + 1)
    train = sources.records(f"folder:{root}", None, "train")
    by_label = collections.Counter(train.labels)
    assert by_label == {0: 5, 1: 3, 2: 2}
    extra = [lab for f, lab in zip(train.files, train.labels) if "/c0/extra/" in f]
    assert extra == [0, 0, 0]
    batches = collect(
        data.eval_iterator(
            f"folder:{root}", None, global_batch_size=4, image_size=8,
            process_index=0, process_count=1,
        )
    )  # fmt: skip
    assert sorted(masked_labels(batches)) == [0, 1, 1, 2]  # every linked file decoded


# ------------------------------------------------------------------------------------------
# Quick-start digits.


def test_write_digits_folder(digits_path: str, tmp_path: pathlib.Path) -> None:
    info = data.dataset_info(f"folder:{digits_path}", None)
    assert info.class_names == tuple(str(d) for d in range(10))
    assert (info.num_train, info.num_eval) == (1437, 360)
    per_class = collections.Counter(
        p.parent.name for p in pathlib.Path(digits_path, "val").glob("*/*")
    )
    total = collections.Counter(p.parent.name for p in pathlib.Path(digits_path).glob("*/*/*"))
    assert sum(total.values()) == 1797
    for digit, n in total.items():  # Stratified 80/20.
        assert abs(per_class[digit] - 0.2 * n) <= 1
    with Image.open(next(pathlib.Path(digits_path, "train", "0").glob("*.png"))) as im:
        assert im.size == (32, 32)
    # Complete: a second call is a no-op; a different size at the same path is refused.
    assert data.write_digits_folder(digits_path, 32) == digits_path
    with pytest.raises(errors.DataError, match="digits"):
        data.write_digits_folder(digits_path, 16)
    b = next(
        data.eval_iterator(
            f"folder:{digits_path}", None, global_batch_size=64, image_size=32, resize_size=32,
            process_index=0, process_count=1,
        )
    )  # fmt: skip
    assert b["image"].shape == (64, 32, 32, 3) and b["mask"].all()
    assert b["label"][0] == 0 and (np.diff(b["label"]) >= 0).all()  # Class order '0'..'9'.
    # White digits on black: the background corner is the normalized black.
    np.testing.assert_allclose(
        transforms.normalize(b["image"][:, 0, 0]), np.broadcast_to(-MEAN / STD, (64, 3)), atol=0.05
    )
    small = data.write_digits_folder(tmp_path / "d8", 8)
    assert data.dataset_info(f"folder:{small}", None).num_train == 1437


DAMAGED = {  # file name -> what the error says
    "zero.png": "empty file",
    "truncated.jpg": "",  # Pillow's words, which differ between its versions
    "text.jpg": "not an image, or a format PIL does not know",
}


def write_damaged(directory: pathlib.Path) -> None:
    """The damaged kinds of DAMAGED: zero bytes, a JPEG cut in half, text named .jpg."""
    jpeg = encode(imagenet_fixture.photo(0).crop((0, 0, 64, 64)), "JPEG")
    (directory / "zero.png").write_bytes(b"")
    (directory / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (directory / "text.jpg").write_text("not an image\n")


@pytest.mark.parametrize("split", ["train", "val"])
@pytest.mark.parametrize("name", sorted(DAMAGED))
def test_damaged_image_stops_with_its_name(tmp_path: pathlib.Path, split: str, name: str):
    root = write_folder(tmp_path / "ds", {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}})
    write_damaged(tmp_path)
    shutil.copy(tmp_path / name, root / split / "b" / name)
    args = dict(image_size=16, process_index=0, process_count=1)
    with pytest.raises(errors.DataError) as error:
        if split == "val":
            collect(data.eval_iterator(f"folder:{root}", None, global_batch_size=4, **args))
        else:
            next(data.train_iterator(f"folder:{root}", None, global_batch_size=7, seed=0, **args))
    message = str(error.value)
    assert message.startswith(f"{root / split / 'b' / name}: not a decodable image (")
    assert message.endswith(f"{DAMAGED[name]}); --config.skip_damaged_images=True skips such files")


def test_damaged_images_skipped_and_counted(tmp_path: pathlib.Path) -> None:
    """skip_damaged: validation counts every good image once and each damaged one as skipped;
    a training epoch replaces each damaged file by a readable one and counts it once."""
    root = write_folder(tmp_path / "ds", {"train": {"a": 3, "b": 3}, "val": {"a": 2, "b": 2}})
    for split in ("train", "val"):
        write_damaged(root / split / "b")
    args = dict(image_size=16, process_index=0, process_count=1, skip_damaged=True)
    batches = collect(data.eval_iterator(f"folder:{root}", None, global_batch_size=4, **args))
    assert sorted(masked_labels(batches)) == [0, 0, 1, 1]
    assert sum(int(b["damaged"].sum()) for b in batches) == 3
    epoch = next(data.train_iterator(f"folder:{root}", None, global_batch_size=9, seed=0, **args))
    assert int(epoch["damaged"].sum()) == 3  # one batch is the whole epoch of 9 files
    assert (epoch["image"].reshape(9, -1).max(1) > 0).all()  # every slot holds a real image


def test_too_large_images_say_so_and_a_flag_reads_them(tmp_path: pathlib.Path, monkeypatch):
    """Issue 31, finding 13, in training and evaluation: an image over PIL's limit against
    decompression bombs stops the run with a line saying it is too large and naming the flag
    that reads it; ``allow_large_images`` reads it, PIL's process-wide limit left as it was.
    The limit is lowered here (threads only: the worker processes would not see it) so that
    the dataset's 480-pixel images are over it."""
    root = write_folder(tmp_path / "ds", {"train": {"a": 2}, "val": {"a": 1}})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # PIL refuses over twice the limit
    args = dict(image_size=8, process_index=0, process_count=1, threads=2)
    train = lambda **more: next(
        data.train_iterator(f"folder:{root}", None, global_batch_size=2, seed=0, **args, **more)
    )
    val = lambda **more: collect(
        data.eval_iterator(f"folder:{root}", None, global_batch_size=1, **args, **more)
    )
    for read, split in ((train, "train"), (val, "val")):
        with pytest.raises(errors.DataError) as error:
            read()
        assert re.fullmatch(
            rf"{root / split}/a/img[01]\.\w+: too large \(480 pixels, over PIL's limit of 400 "
            r"against decompression bombs\); --config.allow_large_images=True reads it; "
            r"--config.skip_damaged_images=True skips such files",
            str(error.value),
        ), str(error.value)
    batch = train(allow_large_images=True)
    assert batch["image"].shape == (2, 8, 8, 3) and not batch["damaged"].any()
    (batch,) = val(allow_large_images=True)
    assert batch["mask"].tolist() == [1.0] and batch["image"].any()
    assert Image.MAX_IMAGE_PIXELS == 200


@pytest.mark.slow
def test_digits_cli_full_disk_bad_size_and_umask(tmp_path: pathlib.Path) -> None:
    """``python -m eca_flax.data digits``: a full disk and a bad size are one error line with
    nothing written; the folder gets the modes of any new directory (not mkdtemp's 0700)."""
    cmd = [sys.executable, "-m", "eca_flax.data", "digits"]
    disk, repo = tmp_path / "disk", pathlib.Path(__file__).parents[1]
    proc, left = run_on_small_disk(
        [*cmd, str(disk / "d"), "--image_size", "8"], disk, 64 * 1024, cwd=repo
    )
    assert (proc.returncode, left) == (1, []), proc.stderr
    assert proc.stderr.splitlines() == [
        f"error: {disk / 'd'}: could not write the digits (No space left on device); nothing "
        "written"
    ]
    bad = subprocess.run(
        [*cmd, str(tmp_path / "d0"), "--image_size", "0"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        bad.returncode == 1
        and bad.stderr == "error: image_size must be a positive integer, got 0\n"
    )
    assert not (tmp_path / "d0").exists()
    previous = os.umask(0o027)
    try:
        root = pathlib.Path(data.write_digits_folder(tmp_path / "d8", 8))
    finally:
        os.umask(previous)
    for path in (root, root / "train", next((root / "train" / "0").iterdir())):
        assert path.stat().st_mode & 0o777 == (0o750 if path.is_dir() else 0o640), path


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def digits_progress(path: pathlib.Path | str) -> re.Pattern:
    """A progress line of write_digits_folder for ``path``; group 1: images written."""
    return re.compile(
        rf"digits: (\d+)/1797 images written \((\d+)%\) for {re.escape(str(path))}, "
        r"(\d+h\d\dm|\d+m\d\ds|\d+s) so far, about (\d+h\d\dm|\d+m\d\ds|\d+s) left"
    )


def test_digits_progress_lines(tmp_path: pathlib.Path, monkeypatch) -> None:
    """Progress lines at most every PROGRESS_SECONDS (0 here: one per image, the last one
    excepted), counting up with their percentage and the time left."""
    monkeypatch.setattr(sources, "PROGRESS_SECONDS", 0.0)
    handler, level = _Lines(), sources.log.level
    sources.log.addHandler(handler)
    sources.log.setLevel(logging.INFO)
    sources.log.propagate = False  # not 1,796 lines through a training test's log handler
    try:
        path = data.write_digits_folder(tmp_path / "d4", 4)
    finally:
        sources.log.removeHandler(handler)
        sources.log.setLevel(level)
        sources.log.propagate = True
    line = digits_progress(path)
    matches = [line.fullmatch(x) for x in handler.lines]
    assert all(matches), handler.lines[:3]
    assert [int(m[1]) for m in matches] == list(range(1, 1797))
    assert all(int(m[2]) == 100 * int(m[1]) // 1797 for m in matches)
    assert data.dataset_info(f"folder:{path}", None).num_train == 1437


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_digits_cli_progress_then_interrupted(tmp_path: pathlib.Path, signum: int) -> None:
    """``python -m eca_flax.data digits`` at a large size: progress lines on stderr while it
    writes; Ctrl-C or SIGTERM then ends it with one line, exit 130, and no temporary folder
    (nor PATH) left."""
    out = tmp_path / "out"
    out.mkdir()
    proc = popen_interruptible(
        [sys.executable, "-m", "eca_flax.data", "digits", str(out / "d"), "--image_size", "768"],
        cwd=pathlib.Path(__file__).parents[1], text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        first = proc.stderr.readline()  # the first after PROGRESS_SECONDS (5 s) of writing
        writing = sorted(p.name for p in out.iterdir())
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    line = digits_progress(out / "d")
    assert first.startswith("INFO ") and line.fullmatch(first[5:].rstrip("\n")), first + stderr
    assert len(writing) == 1 and writing[0].startswith(".d.tmp-")  # it was writing there
    lines = stderr.splitlines()
    assert (proc.returncode, stdout, lines[-1]) == (130, "", "interrupted; nothing written")
    assert all(x.startswith("INFO ") and line.fullmatch(x[5:]) for x in lines[:-1]), stderr
    assert list(out.iterdir()) == []


@pytest.mark.slow
def test_sigterm_while_train_py_writes_the_digits(tmp_path: pathlib.Path) -> None:
    """SIGTERM to train.py while it writes ``digits:N`` (before its loop, whose handler asks for
    a save) stops it as Ctrl-C there does: the temporary folder removed, one line, exit 130."""
    env = cli_env(tmp_path, devices=1)  # a fresh cache: tmp_path/xdg
    workdir = tmp_path / "run"
    proc = train_cli(workdir, env, dataset="digits:768")
    try:
        dest = tmp_path / "xdg" / "eca_flax" / "digits768"
        line = digits_progress(dest)
        for first in proc.stdout:  # the first after PROGRESS_SECONDS (5 s) of writing
            if line.search(first):
                break
        writing = sorted(p.name for p in dest.parent.iterdir())
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert line.search(first), first + stdout + stderr
    assert len(writing) == 1 and writing[0].startswith(".digits768.tmp-")  # it was writing
    expected = "interrupted: before the first training step, no checkpoint written"
    assert (proc.returncode, stderr.splitlines()) == (130, [expected]), stdout + stderr
    assert list(dest.parent.iterdir()) == [] and not workdir.exists()
