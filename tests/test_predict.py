"""python -m eca_flax.predict on real JPEGs (scikit-learn's two sample photos), checked against
the PyTorch reference holding the same weights."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_images

import eca_flax
from eca_flax import data, predict
from eca_flax.models import torch_reference as tr
from eca_flax.weights import convert, description, pretrained

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = load_sample_images().filenames  # china.jpg, flower.jpg
LINE = re.compile(r"  (\d)\. +(\d+\.\d\d)%  (.+)")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A converted ECA-ResNet-18 (random weights, released file format) and its original."""
    root = tmp_path_factory.mktemp("predict")
    ref = tr.random_reference("eca_resnet18", 5)
    src = root / "eca_resnet18_k3577.pth.tar"
    state = {"module." + k: v for k, v in ref.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 1}, src, _use_new_zipfile_serialization=False)
    convert.convert_file(src, root / "weights", log=lambda _: None)
    return root / "weights", ref


def run(capsys, *args) -> tuple[int, str, str]:
    rc = predict.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_imagenet_class_names_ship_with_the_package():
    classes = predict.imagenet_classes()
    synsets = [s for s, _ in classes]
    assert len(classes) == 1000 and synsets == sorted(set(synsets))  # class-index order
    assert all(re.fullmatch(r"n\d{8}", s) and name for s, name in classes)
    assert classes[0] == ("n01440764", "tench, Tinca tinca")
    assert classes[281] == ("n02123045", "tabby, tabby cat")
    assert classes[999][0] == "n15075141"


def test_top5_on_real_photos_matches_pytorch(converted, capsys):
    weights, ref = converted
    rc, out, err = run(capsys, "--weights", weights, *PHOTOS)
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 * 6
    classes = predict.imagenet_classes()
    index = {f"{s}  {n}": i for i, (s, n) in enumerate(classes)}
    for k, photo in enumerate(PHOTOS):
        assert lines[6 * k] == f"{photo}:"
        rows = [LINE.fullmatch(x).groups() for x in lines[6 * k + 1 : 6 * k + 6]]
        assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
        x = data.preprocess_for_eval(Path(photo).read_bytes())[None]
        with torch.no_grad():
            logits = ref(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        probs = torch.softmax(logits, -1)[0].numpy()
        want = np.argsort(-probs)[:5]
        assert [index[r[2]] for r in rows] == list(want)
        np.testing.assert_allclose([float(r[1]) for r in rows], 100 * probs[want], atol=0.006)


@pytest.mark.slow
def test_predict_subprocess(converted):
    """As a user runs it: exit status 0, the top-3 of one photo, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eca_flax.predict",
            "--weights",
            str(converted[0]),
            "--top",
            "3",
            PHOTOS[1],
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{PHOTOS[1]}:" and len(lines) == 4
    assert all(LINE.fullmatch(x) for x in lines[1:])
    assert "Traceback" not in proc.stderr


def test_bad_input(converted, tmp_path, capsys):
    weights = converted[0]
    cases = {
        "no such file": ("--weights", weights, tmp_path / "missing.jpg"),
        "not an image": ("--weights", weights, ROOT / "pyproject.toml"),
        "no such directory": ("--weights", tmp_path / "nowhere", PHOTOS[0]),
    }
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(PHOTOS[0]).read_bytes()[:5000])
    cases["not a decodable image"] = ("--weights", weights, truncated)
    cases[f"{tmp_path}: is a directory, not an image file"] = ("--weights", weights, tmp_path)
    for message, args in cases.items():
        rc, out, err = run(capsys, *args)
        assert rc == 1 and out == "" and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and message in err, err


def test_other_heads_print_class_indices(converted, tmp_path, capsys):
    model = eca_flax.load_pretrained(converted[0], num_classes=3)  # a fine-tuning start
    pretrained.save_pretrained(model, tmp_path / "w", arch="eca_resnet18", attention="eca")
    rc, out, err = run(capsys, "--weights", tmp_path / "w", "--top", "9", PHOTOS[0])
    assert rc == 0, err
    rows = [LINE.fullmatch(x).groups() for x in out.splitlines()[1:]]
    assert sorted(r[2] for r in rows) == ["class 0", "class 1", "class 2"]
    assert sum(float(r[1]) for r in rows) == pytest.approx(100, abs=0.02)


def test_default_size_is_the_models_own(converted, tmp_path, capsys):
    """A model evaluated at 16 px (the quick start's) classifies at 16 px unless told."""
    model = eca_flax.load_pretrained(converted[0])
    pretrained.save_pretrained(
        model, tmp_path / "w", arch="eca_resnet18", attention="eca", image_size=16, resize_size=16
    )
    rc, out, err = run(capsys, "--weights", tmp_path / "w", PHOTOS[0])
    assert rc == 0, err
    want = predict.top_k(model, predict.load_images([PHOTOS[0]], 16, 16))[0]
    rows = [LINE.fullmatch(x).groups() for x in out.splitlines()[1:]]
    assert [r[2] for r in rows] == [predict.class_name(i, 1000) for i, _ in want]
    np.testing.assert_allclose(
        [float(r[1]) for r in rows], [100 * p for _, p in want], atol=0.006
    )  # printed with 2 decimals


def damage(weights: Path, where: Path, how: str) -> Path:
    """A copy of ``weights`` with its largest data file cut short, or with the arrays of another
    model under its model.json (Orbax reads them without complaint: only the checksum tells)."""
    shutil.copytree(weights, where)
    state = where / description.STATE_DIR
    if how == "truncated":
        data_file = max(state.rglob("d/*"), key=lambda p: p.stat().st_size)
        os.truncate(data_file, data_file.stat().st_size // 2)
    else:
        other = eca_flax.load_pretrained(weights)
        other.fc.bias[...] = other.fc.bias[...] + 1.0
        pretrained.save_pretrained(
            other, where.parent / "other", arch="eca_resnet18", attention="eca"
        )
        shutil.rmtree(state)
        shutil.copytree(where.parent / "other" / description.STATE_DIR, state)
    return where


@pytest.mark.parametrize("how", ["truncated", "other arrays"])
@pytest.mark.slow
def test_damaged_weights_are_one_line(converted, tmp_path, how):
    """As a user runs it: one error line naming state/, no traceback or Orbax echoes."""
    weights = damage(converted[0], tmp_path / "w", how)
    proc = subprocess.run(
        [sys.executable, "-m", "eca_flax.predict", "--weights", str(weights), PHOTOS[1]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {weights / 'state'}: "), proc.stderr
    if how == "other arrays":
        assert "do not match the checksum" in lines[0]


def test_bad_files_do_not_stop_the_others(converted, tmp_path, capsys):
    """``--weights W a.jpg bad.jpg b.jpg``: a and b classified as they are alone, one line
    ``error: FILE: reason`` for each bad file, exit 1."""
    weights = converted[0]
    missing, truncated = tmp_path / "missing.jpg", tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(PHOTOS[0]).read_bytes()[:5000])
    rc, alone, err = run(capsys, "--weights", weights, *PHOTOS)
    assert (rc, err) == (0, "") and len(alone.splitlines()) == 12
    rc, out, err = run(capsys, "--weights", weights, PHOTOS[0], missing, truncated, PHOTOS[1])
    assert rc == 1 and out == alone
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0] == f"error: {missing}: no such file", err
    assert lines[1].startswith(f"error: {truncated}: not a decodable image ("), err
    # Only bad files: one line each, nothing classified.
    rc, out, err = run(capsys, "--weights", weights, missing, ROOT / "pyproject.toml")
    assert (rc, out) == (1, "")
    assert err.splitlines() == [
        f"error: {missing}: no such file",
        f"error: {ROOT / 'pyproject.toml'}: not a decodable image (not an image, or a format "
        "PIL does not know)",
    ]
    # A wrong --weights still fails first, before any image is read: its line only.
    rc, out, err = run(capsys, "--weights", tmp_path / "nowhere", missing, PHOTOS[0])
    assert (rc, out) == (1, "") and len(err.splitlines()) == 1
    assert err.startswith(f"error: {tmp_path / 'nowhere'}") and "missing.jpg" not in err, err


def test_exif_orientation_is_applied_in_predict_only(tmp_path):
    """Issue 31, finding 5: a phone photo stored sideways with EXIF Orientation 6 ("rotate 90
    clockwise to view") is classified as it is viewed, upright; the datasets keep the stored
    pixels, as torchvision's ImageFolder loader reads them (the original's training)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    upright = Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8))  # 16 x 24
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 24 x 16
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to view
    path = tmp_path / "phone.png"  # lossless, so the pixels compare exactly
    stored.save(path, exif=exif)
    want = np.asarray(upright.resize((16, 24)).crop((0, 4, 16, 20)))  # shorter side 16, crop
    np.testing.assert_array_equal(predict.load_image(str(path), 16, 16), want)
    as_stored = np.asarray(stored.crop((4, 0, 20, 16)))
    np.testing.assert_array_equal(
        data.transforms.eval_transform(path.read_bytes(), 16, 16), as_stored
    )


def test_files_that_are_no_images_say_what_they_are(converted, tmp_path, capsys):
    """Issue 31, finding 14: a FIFO, a symlink loop, /dev/zero or /dev/null was "no such file"
    (reading a FIFO or /dev/zero would block or never end); each is named for what it is."""
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    broken = tmp_path / "broken.jpg"
    broken.symlink_to(tmp_path / "gone.jpg")
    want = {
        fifo: "is a FIFO (named pipe), not an image file",
        loop: "a symlink loop, no image file",
        broken: f"a broken symlink (to {tmp_path / 'gone.jpg'}), no image file",
        "/dev/zero": "is a character device, not an image file",
        "/dev/null": "is a character device, not an image file",
        tmp_path / "missing.jpg": "no such file",
    }
    rc, out, err = run(capsys, "--weights", converted[0], *want)
    assert (rc, out) == (1, "")
    assert err.splitlines() == [f"error: {name}: {line}" for name, line in want.items()]


def test_too_large_images_say_so_and_a_flag_reads_them(converted, tmp_path, capsys):
    """Issue 31, finding 13: an image over PIL's limit against decompression bombs (178,956,970
    pixels) was "not a decodable image"; the line says it is too large and names the flag that
    lifts the limit. Here a PNG of 20000 x 10000 (1-bit) cut after its header: with the flag
    PIL reads on, and finds it truncated."""
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("1", (20000, 10000)).save(path)
    path.write_bytes(path.read_bytes()[:200])
    limit = Image.MAX_IMAGE_PIXELS
    rc, _, err = run(capsys, "--weights", converted[0], path)
    assert rc == 1 and err.splitlines() == [
        f"error: {path}: too large (200,000,000 pixels, over PIL's limit of 178,956,970 against "
        "decompression bombs); --allow-large-images reads it"
    ]
    rc, _, err = run(capsys, "--weights", converted[0], path, "--allow-large-images")
    assert rc == 1 and err.splitlines() == [
        f"error: {path}: not a decodable image (image file is truncated)"
    ]
    assert limit == Image.MAX_IMAGE_PIXELS  # lifted for that image only, not for the process
