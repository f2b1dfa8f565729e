"""Single-file weights: one ``.safetensors`` file, through the safetensors package's numpy API,
so that loading one needs neither Orbax nor torch.

Two kinds of file, told apart by their metadata (string values only, as the format requires):

* eca_flax models (``save_pretrained(..., format="safetensors")``, ``convert_torch_weights.py
  SRC DST.safetensors``): the arrays of a pretrained directory's ``state/`` named by Flax path
  ('layer1/0/conv1/kernel', Flax layouts), and metadata {"format": "eca_flax.pretrained/1",
  "model.json": the text of the directory's model.json}; ``load_pretrained`` reads them, with
  the same checks (description, array paths and shapes, checksum) as a directory.
* PyTorch state_dicts (``convert_torch_weights.py --to-torch DST OUT.safetensors``): the
  original keys and layouts, metadata {"format": "pt"} (what Hugging Face's loaders look for),
  for ``safetensors.torch.load_file`` and ``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from eca_flax.errors import PretrainedError
from eca_flax.files import one_line, write_file
from eca_flax.weights.description import (
    FORMAT,
    HINT,
    MODEL_JSON,
    Flat,
    check_checksum,
    check_stored,
    parse_description,
)

SEPARATOR = "/"  # joins a Flax path into a tensor name: ('layer1', 0, 'conv1', 'kernel')
TORCH_FORMAT = "pt"  # the metadata "format" of PyTorch state_dicts


def write_tensors(
    path: Path, tensors: Mapping[str, Any], metadata: Mapping[str, str], error: type[Exception]
) -> None:
    """``tensors`` (numpy arrays by name) and ``metadata`` as a .safetensors file, atomically:
    written beside ``path`` and renamed, so there is never a partial one (``files.write_file``).
    Failures, a dtype the format cannot hold among them, are one-line ``error``."""
    # np.asarray(order="C"), not ascontiguousarray: that turns 0-dim arrays into 1-dim ones
    arrays = {name: np.asarray(value, order="C") for name, value in tensors.items()}
    write_file(path, lambda tmp: save_file(arrays, tmp, metadata=dict(metadata)), error)


def write_model(path: Path, arrays: Flat, text: str) -> None:
    """A model's arrays (by Flax path) and its model.json ``text`` as one .safetensors file."""
    named = {SEPARATOR.join(map(str, p)): value for p, value in arrays.items()}
    write_tensors(path, named, {"format": FORMAT, MODEL_JSON: text}, PretrainedError)


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Any]:
    """``safe_open`` on ``path`` (numpy arrays); a missing, truncated or foreign file is a
    one-line PretrainedError."""
    if not path.exists():
        raise PretrainedError(f"{path}: no such file {HINT}")
    if path.is_dir():
        raise PretrainedError(f"{path}: is a directory, not a .safetensors file")
    try:
        handle = safe_open(path, framework="np")
    except Exception as e:  # noqa: BLE001 - SafetensorError for a bad header, OSError
        raise PretrainedError(
            f"{path}: not a readable safetensors file, truncated or corrupt ({one_line(e)})"
        ) from None
    with handle as f:
        yield f


def read_description(path: Path) -> dict:
    """The model.json stored in a .safetensors model file's metadata, checked like a
    directory's (``description.parse_description``)."""
    path = Path(path).expanduser()
    with _opened(path) as f:
        metadata = f.metadata() or {}
    got = metadata.get("format")
    if got != FORMAT or MODEL_JSON not in metadata:
        kind = "a PyTorch state_dict, " if got == TORCH_FORMAT else ""
        raise PretrainedError(
            f"{path}: not an eca_flax model file ({kind}metadata format {got!r}, expected "
            f"{FORMAT!r} with {MODEL_JSON}) {HINT}"
        )
    return parse_description(metadata[MODEL_JSON], f"{path} (metadata {MODEL_JSON})")


def _flax_path(name: str) -> tuple[str | int, ...]:
    """('layer1', 0, 'conv1', 'kernel') from 'layer1/0/conv1/kernel'."""
    return tuple(int(k) if k.isdigit() else k for k in name.split(SEPARATOR))


def read_weights(path: Path, target: Flat, *, expected: str | None = None) -> Flat:
    """Arrays shaped, typed and placed like ``target`` (placeholders) from a .safetensors model
    file. The stored names and shapes are checked against ``target`` before any array is read,
    and with ``expected`` (model.json's checksum) the arrays as stored must match it."""
    path = Path(path).expanduser()
    with _opened(path) as f:
        names = {_flax_path(name): name for name in f.keys()}  # noqa: SIM118 - not a dict
        shapes = {
            p: types.SimpleNamespace(shape=f.get_slice(n).get_shape()) for p, n in names.items()
        }
        check_stored(path, shapes, target)
        stored = {}
        for p, name in names.items():
            try:
                stored[p] = f.get_tensor(name)
            except Exception as e:  # noqa: BLE001 - e.g. a dtype this numpy cannot represent
                raise PretrainedError(f"{path}: cannot read {name} ({one_line(e)})") from None
    check_checksum(path, traverse_util.unflatten_dict(stored), expected)
    return {
        p: jax.device_put(np.asarray(value, dtype=target[p].dtype), target[p].sharding)
        for p, value in stored.items()
    }
