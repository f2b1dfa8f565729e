"""Classify images with a converted or trained model: top-5 ImageNet classes with names.

    python -m eca_flax.predict --weights DST IMAGE [IMAGE ...]

DST is a pretrained directory (``convert_torch_weights.py SRC DST``). Images go through the
original eval preprocessing (shorter side to 256 bilinear with antialiasing, center crop 224,
ImageNet mean/std; ``eca_flax.data.preprocess_for_eval``). The 1000 ImageNet class names ship
with the package (``imagenet_classes.txt``: synset id and name, in class-index order), so this
works offline.
"""

from __future__ import annotations

import argparse
import functools
import io
import logging
import re
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
    """(class index, probability) of the ``k`` most likely classes for each NHWC image."""
    model.eval()
    forward = nnx.jit(lambda m, x: jax.nn.softmax(m(x), axis=-1))
    out = []
    for start in range(0, len(images), BATCH):
        probs = np.asarray(forward(model, jnp.asarray(images[start : start + BATCH])))
        for row in probs:
            best = np.argsort(-row)[:k]
            out.append([(int(i), float(row[i])) for i in best])
    return out


def _check_image(name: str) -> bytes:
    """The file's bytes, after PIL decoded it fully: clean one-line errors before TensorFlow."""
    from PIL import Image, UnidentifiedImageError

    path = Path(name)
    if not path.is_file():
        raise ValueError(f"{name}: no such file")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt image data
        raise ValueError(f"{name}: not a decodable image ({e})") from None
    return data


def _preprocess(paths: Sequence[str], image_size: int) -> np.ndarray:
    """Read and preprocess every image; a missing or undecodable file is a one-line error."""
    import tensorflow as tf

    from eca_flax.data import preprocess_for_eval

    images = []
    for name in paths:
        data = _check_image(name)
        try:
            images.append(preprocess_for_eval(data, image_size))
        except tf.errors.InvalidArgumentError as e:  # a format PIL reads but TensorFlow not
            reason = re.sub(r"\{\{.*?\}\}|\[Op:\w+\]|name:", "", e.message)
            reason = " ".join(reason.split())[:160]
            raise ValueError(f"{name}: not a decodable image ({reason})") from None
    return np.stack(images)


def main(argv: Sequence[str] | None = None) -> int:
    """Print the top-k classes of each image; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m eca_flax.predict", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="image files")
    parser.add_argument("--weights", required=True, help="pretrained directory (model.json)")
    parser.add_argument("--top", type=int, default=5, help="classes to show per image")
    parser.add_argument("--image-size", type=int, default=224, help="center crop size")
    args = parser.parse_args(argv)
    if args.top < 1 or args.image_size < 1:
        parser.error("--top and --image-size must be positive")
    logging.getLogger("absl").setLevel(logging.ERROR)
    from eca_flax import xla_flags

    xla_flags.use_recommended()  # Takes effect only before the first computation.
    from eca_flax.pretrained import (
        PretrainedError,
        load_pretrained,
        num_classes_of,
        read_model_json,
    )

    try:
        read_model_json(args.weights)  # a wrong --weights fails before decoding images
        images = _preprocess(args.images, args.image_size)
        model = load_pretrained(args.weights)
    except (PretrainedError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    num_classes = num_classes_of(model)
    for name, best in zip(args.images, top_k(model, images, min(args.top, num_classes))):
        print(f"{name}:")
        for rank, (index, prob) in enumerate(best, 1):
            print(f"  {rank}. {100 * prob:6.2f}%  {class_name(index, num_classes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
