"""Classify images with a converted or trained model: top-5 ImageNet classes with names.

    python -m eca_flax.predict --weights DST IMAGE [IMAGE ...]

Every image that reads is classified; each one that does not (missing, unreadable, not an
image) is one line ``error: FILE: reason`` on stderr, and the exit status is then 1.

DST is a pretrained directory (``convert_torch_weights.py SRC DST`` or a training workdir's
``pretrained/``) or .safetensors file (``convert_torch_weights.py SRC DST.safetensors``), or a
released model's name (``ecaresnet50t.ra2_in1k``, ``eca_resnet50``, ``hf-hub:ORG/NAME``:
downloaded, converted and cached on first use, ``eca_flax.weights.download``).
Images are turned as their EXIF orientation tag says (a phone photo taken upright is classified
upright), then go through the model's own eval preprocessing, as its model.json records it
(released models: shorter side to 256 bilinear with antialiasing, center crop 224, ImageNet
mean/std; timm's: their test size, floor(size / crop_pct), bicubic;
``eca_flax.data.preprocess_for_eval``).
The 1000 ImageNet class names ship with the package (``imagenet_classes.txt``: synset id and
name, in class-index order), so this works offline.
"""

from __future__ import annotations

import argparse
import errno
import functools
import logging
import os
import stat
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL.Image import DecompressionBombError

from eca_flax.cli import shell, xla_flags
from eca_flax.data.transforms import (
    DECODE_ERRORS,
    decode_problem,
    eval_settings,
    eval_transform,
    normalize,
    override_eval,
)
from eca_flax.errors import ConfigError, DataError, PretrainedError
from eca_flax.models.registry import check_input_size
from eca_flax.weights.description import num_classes_of
from eca_flax.weights.download import resolve
from eca_flax.weights.pretrained import load_pretrained, read_model_json

BATCH = 32


@functools.cache
def imagenet_classes() -> list[tuple[str, str]]:
    """The 1000 ImageNet-1k classes as (synset id, human-readable name), by class index."""
    text = resources.files("eca_flax").joinpath("imagenet_classes.txt").read_text("utf-8")
    return [tuple(line.split("\t", 1)) for line in text.splitlines() if line]


def class_name(index: int, num_classes: int) -> str:
    """'n02123045  tabby, tabby cat' for ImageNet models, 'class 7' otherwise."""
    if num_classes == 1000:
        synset, name = imagenet_classes()[index]
        return f"{synset}  {name}"
    return f"class {index}"


def top_k(model: nnx.Module, images: np.ndarray, k: int = 5) -> list[list[tuple[int, float]]]:
    """(class index, probability) of the ``k`` most likely classes for each uint8 NHWC image."""
    model.eval()
    graphdef, state = nnx.split(model)  # once: the jitted function takes arrays only
    forward = jax.jit(lambda state, x: jax.nn.softmax(nnx.merge(graphdef, state)(normalize(x)), -1))
    out = []
    for start in range(0, len(images), BATCH):
        probs = np.asarray(forward(state, jnp.asarray(images[start : start + BATCH])))
        for row in probs:
            best = np.argsort(-row)[:k]
            out.append([(int(i), float(row[i])) for i in best])
    return out


def load_image(
    name: str,
    image_size: int,
    resize_size: int | None,
    interpolation: str = "bilinear",
    allow_large: bool = False,
) -> np.ndarray:
    """One image through the eval preprocessing (uint8); a missing, unreadable or undecodable
    file is a one-line DataError naming it (``allow_large``: over PIL's pixel limit read too)."""
    path = Path(name)
    if problem := not_a_file(path):
        raise DataError(f"{name}: {problem}")
    try:
        data = path.read_bytes()
    except OSError as e:  # no permission, an I/O error
        raise DataError(f"{name}: cannot be read ({e.strerror or e})") from None
    try:
        # Turned as its EXIF orientation says: a phone photo as its owner sees it.
        oriented = dict(exif_orientation=True, allow_large=allow_large)
        return eval_transform(data, image_size, resize_size, interpolation, **oriented)
    except DECODE_ERRORS as e:  # not an image, truncated or corrupt, too large
        hint = "; --allow-large-images reads it" if isinstance(e, DecompressionBombError) else ""
        raise DataError(f"{name}: {decode_problem(e, data)}{hint}") from None


KINDS = {  # what a path that is not a regular file is, for the line naming it
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


def not_a_file(path: Path) -> str | None:
    """Why ``path`` is no image file to read (missing, a broken symlink or a symlink loop, a
    directory, FIFO or device, which would block or never end), or None for a regular file."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            return f"a broken symlink (to {os.readlink(path)}), no image file"
        return "no such file"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop, no image file"
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    return f"is {KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not an image file"


def load_images(
    paths: Sequence[str],
    image_size: int,
    resize_size: int | None,
    interpolation: str = "bilinear",
) -> np.ndarray:
    """Every image through the eval preprocessing (uint8), stacked; the first missing or
    undecodable file is a one-line DataError naming it."""
    return np.stack([load_image(p, image_size, resize_size, interpolation) for p in paths])


def eval_size(meta: dict, image_size: int | None) -> tuple[int, int | None, str]:
    """(crop, resize, interpolation) for a model: the sizes its model.json records (224 and 256
    for converted released weights, timm's test size and crop_pct), or ``image_size`` if given
    (resize by the 256/224 rule, by the crop_pct for timm's models)."""
    settings = override_eval(eval_settings(meta), image_size)
    return settings["image_size"], settings["resize_size"], settings["interpolation"]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the top-k classes of each image; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m eca_flax.predict", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    parser.add_argument(
        "--weights",
        required=True,
        help="pretrained directory or .safetensors file, or a released model's name "
        "(ecaresnet50t.ra2_in1k, eca_resnet50, hf-hub:ORG/NAME): downloaded and cached",
    )
    parser.add_argument("--top", type=int, default=5, help="classes to show per image")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="center crop size (default: the size the model was evaluated at, from model.json)",
    )
    parser.add_argument(
        "--allow-large-images",
        action="store_true",
        help="read images over PIL's limit against decompression bombs (178,956,970 pixels)",
    )
    args = parser.parse_args(argv)
    if args.top < 1 or (args.image_size is not None and args.image_size < 1):
        parser.error("--top and --image-size must be positive")
    logging.getLogger("absl").setLevel(logging.ERROR)
    xla_flags.use_recommended()  # Takes effect only before the first computation.
    return shell.run(lambda: predict(args))


def predict(args: argparse.Namespace) -> int:
    """Prints the classes of every image ``args`` name that reads, and one line ``error: FILE:
    reason`` for each that does not; returns 1 if any did not, else 0."""
    weights = resolve(args.weights)  # a released model's name: fetched, converted, cached
    meta = read_model_json(weights)  # a wrong --weights fails before decoding images
    if not meta["num_classes"]:
        raise PretrainedError(
            f"{args.weights}: a backbone without a classifier (converted from a detection "
            "checkpoint); it has no classes to predict"
        )
    size = eval_size(meta, args.image_size)
    try:
        check_input_size(meta["arch"], size[0])
    except ValueError as e:
        raise ConfigError(f"--image-size {size[0]}: {e}") from None
    names, images = [], []
    for name in args.images:
        try:
            images.append(load_image(name, *size, allow_large=args.allow_large_images))
            names.append(name)
        except DataError as e:  # reported, and the others still classified
            shell.report(shell.error_line(e), e)
    if images:
        model = load_pretrained(weights)
        num_classes = num_classes_of(model)
        best_of = top_k(model, np.stack(images), min(args.top, num_classes))
        for name, best in zip(names, best_of):
            print(f"{name}:")
            for rank, (index, prob) in enumerate(best, 1):
                print(f"  {rank}. {100 * prob:6.2f}%  {class_name(index, num_classes)}")
    return 1 if len(images) < len(args.images) else 0


if __name__ == "__main__":
    sys.exit(main())
