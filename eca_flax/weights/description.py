"""What every stored model has, below the formats that store it: its description (the
``MODEL_KEYS`` of model.json and of training checkpoints' metadata, checked) and the checks of its
arrays (paths, shapes, CRC-32 checksums). Depends on the models only; ``orbax_io``,
``safetensors_io``, ``pretrained`` and the trainer's checkpoints build on it.
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx, traverse_util

from eca_flax.errors import PretrainedError
from eca_flax.models import resnet
from eca_flax.models.layers import attention_choice
from eca_flax.models.registry import arch_of, list_models, resolve_k_size

FORMAT = "eca_flax.pretrained/1"
MODEL_JSON = "model.json"
STATE_DIR = "state"
SAFETENSORS = ".safetensors"  # the suffix of single-file weights (safetensors_io)
HINT = "(convert a .pth file with convert_torch_weights.py SRC DST)"
MODEL_KEYS = ("arch", "k_size", "num_classes", "attention")  # every weights file's description

Path_ = str | os.PathLike[str]
Flat = dict[tuple, Any]  # {('layer1', 0, 'conv1', 'kernel'): value}


def num_classes_of(model: nnx.Module) -> int:
    """The number of logits the model's classifier produces (0: a backbone without one)."""
    if isinstance(model, resnet.ECAResNet) and model.fc is None:
        return 0  # built with num_classes=0: a backbone, e.g. converted from a detector
    if hasattr(model, "head") and hasattr(model, "stages"):  # timm's other families
        return 0 if model.head is None else int(model.head.fc.out_features)
    head = getattr(model, "fc", None) or getattr(model, "classifier", [None, None])[1]
    if not isinstance(head, nnx.Linear):
        raise TypeError(f"not an eca_flax model: {type(model).__name__}")
    return int(head.out_features)


def describe(model: nnx.Module) -> dict:
    """The ``MODEL_KEYS`` description of a model, read from its structure."""
    return {
        "arch": arch_of(model),
        "k_size": [int(k) for k in model.k_size],
        "num_classes": num_classes_of(model),
        "attention": model.attention,
    }


def differences(have: Mapping, want: Mapping, keys: Collection[str]) -> list[tuple[str, Any, Any]]:
    """[(key, have's value, want's value)] for the description keys that differ.

    The one comparison of model descriptions (a checkpoint against a config, a model against
    what it is saved as); callers phrase the message. k_size values compare after
    ``resolve_k_size`` ("3577" equals [3, 5, 7, 7]), attention after ``attention_choice``.
    """

    def norm(key: str, d: Mapping) -> Any:
        value = d.get(key)
        with contextlib.suppress(ValueError, TypeError):
            if key == "k_size" and value is not None:
                return list(resolve_k_size(have.get("arch") or want.get("arch"), value))
            if key == "attention":
                return attention_choice(value)
        return value

    return [(k, norm(k, have), norm(k, want)) for k in keys if norm(k, have) != norm(k, want)]


def abstract(tree: Any, sharding: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` placeholders of ``tree``'s arrays, placed by ``sharding`` (default:
    each array's own sharding): the target Orbax restores into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree
    )


def flatten(tree: Any) -> Flat:
    """{path: leaf} of a nested dict (or Orbax tree metadata); digit keys become list indices."""
    flat = traverse_util.flatten_dict(dict(tree), is_leaf=lambda _, v: not hasattr(v, "items"))
    return {
        tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in p): v
        for p, v in flat.items()
    }


def checksum(tree: Any) -> str:
    """CRC-32 of a pytree's arrays in path order (this process's copy of replicated arrays):
    recorded when weights are written and checked when they are read, since Orbax checks no
    bytes (a changed data file restores silently otherwise)."""
    crc = 0
    leaves = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    for path, leaf in sorted(leaves.items()):
        array = np.ascontiguousarray(host_array(leaf))
        crc = zlib.crc32(f"{path}{array.dtype}{array.shape}".encode(), crc)
        crc = zlib.crc32(array.reshape(-1).view(np.uint8), crc)
    return f"crc32:{crc:08x}"


def check_stored(where: Path_, stored: Flat, target: Flat, what: str = MODEL_JSON) -> None:
    """Stored arrays (anything with a shape, by path) must have ``target``'s paths and shapes:
    PretrainedError naming an array that differs from what the description ``what`` implies."""
    if set(stored) != set(target):
        diff = sorted("/".join(map(str, p)) for p in set(stored) ^ set(target))
        raise PretrainedError(
            f"{where}: the arrays do not match {what} (e.g. {', '.join(diff[:3])})"
        )
    for p, leaf in sorted(stored.items(), key=lambda kv: str(kv[0])):
        if tuple(leaf.shape) != tuple(target[p].shape):
            raise PretrainedError(
                f"{where}: {'/'.join(map(str, p))} is stored with shape {tuple(leaf.shape)} but "
                f"{what} implies {tuple(target[p].shape)}"
            )


def check_checksum(where: Path_, tree: Any, expected: str | None) -> None:
    """With ``expected`` (what ``checksum`` gave when they were written), ``tree`` must match."""
    if expected is not None and checksum(tree) != expected:
        raise PretrainedError(
            f"{where}: the arrays do not match the checksum recorded when they were written "
            "(a damaged or changed file)"
        )


def host_array(x: Any) -> np.ndarray:
    """A weight as a host numpy array (replicated multi-process arrays: this process's copy)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.sharding.is_fully_replicated:
            raise PretrainedError("save_pretrained needs replicated (or host-local) weights")
        x = x.addressable_data(0)
    return np.asarray(x)


def is_safetensors(path: Path_) -> bool:
    """Whether ``path`` is a single safetensors file rather than a pretrained directory: named
    *.safetensors, or a file that starts like one (a little-endian 8-byte header length, then
    its JSON header) whatever its name: a converted model or --to-torch's output renamed."""
    path = Path(path).expanduser()
    if path.suffix.lower() == SAFETENSORS:
        return True
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False  # the reader names the problem
    return len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


def parse_description(text: str, where: Path_) -> dict:
    """model.json's text as a dict, checked: our format, a known model (``check_description``)."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise PretrainedError(f"{where}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise PretrainedError(f"{where}: format {got!r}, expected {FORMAT!r}")
    check_description(meta, where)
    return meta


def check_description(meta: Mapping, where: Path_) -> None:
    """A stored model description must name a known model: PretrainedError otherwise."""
    if missing := [k for k in MODEL_KEYS if k not in meta]:
        raise PretrainedError(f"{where}: missing {', '.join(missing)}")
    if meta["arch"] not in list_models():
        raise PretrainedError(f"{where}: unknown arch {meta['arch']!r}")
    try:
        attention_choice(meta["attention"])
    except ValueError as e:
        raise PretrainedError(f"{where}: {e}") from None
