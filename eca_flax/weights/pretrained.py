"""Pretrained ECA-Net weights on disk, and the one path that turns stored weights into a model.

A pretrained model is a directory (what ``convert_torch_weights.py`` writes and training
exports)::

    model.json   how to rebuild the model: {"format": "eca_flax.pretrained/1", "arch",
                 "k_size" (one per ECA layer group), "num_classes", "attention", "image_size"
                 and "resize_size" (its eval preprocessing), "params", "source" ({"file",
                 "sha256"} of a converted .pth, or null), "epoch", "best_prec1",
                 "converter_version", "checksum" (CRC-32 of the arrays, checked on load)}
    state/       an Orbax checkpoint of the weights and BatchNorm statistics as one pure dict
                 (``nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))``)

or one ``NAME.safetensors`` file holding the same arrays and model.json (``safetensors_io``);
the suffix tells them apart. Training checkpoints store their weights in the layout of
``state/`` and describe their model with the same keys (``MODEL_KEYS``), so ``restore_model``
(head replacement, compute dtype, placement) and ``orbax_io.read_weights`` (checked reading) serve
both. Loading needs jax, flax and orbax (safetensors for a file), never torch. Models are built
without random initialisation (``registry.empty_model``) and filled from the checkpoint, which makes
loading ResNet-152 take seconds rather than the half minute its random init costs on a CPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from eca_flax.errors import PretrainedError
from eca_flax.files import write_directory
from eca_flax.models.layers import attention_choice
from eca_flax.models.registry import (
    WEIGHTS,
    abstract_model,
    abstract_paths,
    count_params,
    empty_model,
    list_models,
    resolve_k_size,
    weight_paths,
)
from eca_flax.version import __version__
from eca_flax.weights import safetensors_io
from eca_flax.weights.description import (
    FORMAT,
    HINT,
    MODEL_JSON,
    MODEL_KEYS,
    SAFETENSORS,
    STATE_DIR,
    Flat,
    Path_,
    abstract,
    checksum,
    describe,
    differences,
    flatten,
    host_array,
    is_safetensors,
    parse_description,
)
from eca_flax.weights.eval_resize import default_resize_size

_CORE_KEYS = ("format", *MODEL_KEYS, "image_size", "resize_size", "params", "source", "checksum")
_EXTRA_DEFAULTS = {"epoch": None, "best_prec1": None}


# --------------------------------------------------------------------------------------------
# Models, their weights and their description.


def restore_model(
    meta: Mapping,
    read: Callable[[Flat], Flat],
    *,
    num_classes: int | None = None,
    dtype: Any = jnp.float32,
    seed: int = 0,
    where: str = "",
) -> nnx.Module:
    """The model ``meta`` describes (``MODEL_KEYS``), in eval mode, its weights from ``read``.

    ``read(target)`` returns arrays for the flat ``target`` of placeholders (the stored shapes,
    on this process's first device). A ``num_classes`` other than the stored one replaces every
    weight whose shape differs (the classifier) by a fresh initialisation (``seed``), for
    fine-tuning; ``num_classes=0`` gives an ECA-ResNet backbone without one (``stage_features``).
    ``dtype`` is the compute dtype; parameters stay float32.
    """
    arch, saved_classes = meta["arch"], int(meta["num_classes"])
    num_classes = saved_classes if num_classes is None else int(num_classes)
    backbone = num_classes == 0 and arch.startswith("eca_resnet")  # stage_features only
    if num_classes < 1 and not backbone:
        raise PretrainedError(f"num_classes must be positive, got {num_classes}")
    spec = dict(k_size=meta["k_size"], attention=meta["attention"])
    try:
        saved = _weight_shapes(arch, num_classes=saved_classes, **spec)
        shapes = _weight_shapes(arch, num_classes=num_classes, **spec)
        # the head where its shape differs, or where the saved model is a backbone without one
        fresh = {p for p, s in shapes.items() if p not in saved or saved[p].shape != s.shape}
        model = empty_model(
            arch, num_classes=num_classes, dtype=dtype, seed=seed, init=fresh, **spec
        )
    except ValueError as e:  # k_size / arch combinations that create_model rejects
        raise PretrainedError(f"{where}: {e}") from None
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = read(abstract(saved, device))
    for p, var in weight_paths(model).items():
        if p not in fresh:
            var.set_value(restored[p])
    model.eval()
    return model


def _weight_shapes(
    arch: str, *, k_size: Any, num_classes: int, attention: str | None
) -> dict[tuple, jax.ShapeDtypeStruct]:
    """Shape and dtype of every weight of that model, without building it."""
    model = abstract_model(
        arch, resolve_k_size(arch, k_size), num_classes, attention_choice(attention), "float32"
    )
    return {p: v.get_value() for p, v in weight_paths(model).items()}


# --------------------------------------------------------------------------------------------
# The weights as one pure dict: paths, checksums, checks shared by orbax_io and safetensors_io.


# --------------------------------------------------------------------------------------------
# Pretrained directories and .safetensors files.


def save_pretrained(
    model: nnx.Module,
    path: Path_,
    *,
    arch: str,
    attention: str | None,
    source: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    image_size: int = 224,
    resize_size: int | None = None,
    format: str | None = None,
) -> None:
    """Write ``model`` as a pretrained directory (model.json + Orbax ``state/``), or with
    ``format="safetensors"`` as one ``.safetensors`` file (model.json in its metadata).

    ``format`` defaults to "safetensors" for a path ending in .safetensors and "orbax" (the
    directory) otherwise; ``load_pretrained`` tells them apart by that suffix. Either is written
    beside ``path`` and renamed into place at the end, so a failure leaves no ``path`` (or the
    previous one, untouched). An existing ``path`` is refused unless ``overwrite``, and even then
    only a pretrained directory (one with a model.json), an empty directory or, for a
    .safetensors path, a file is replaced. ``arch`` / ``attention`` must be what the model is.
    ``source`` is {"file", "sha256"} of a converted file; ``extra`` adds keys to model.json
    (``epoch`` and ``best_prec1`` default to null). ``image_size`` / ``resize_size`` record the
    eval preprocessing the model expects (center crop after resizing the shorter side; default
    the 256/224 ratio): predict uses them. In a multi-process job, call it on process 0 only.
    """
    path = Path(path).expanduser().absolute()
    if jax.process_index() != 0:  # Orbax writes host arrays from process 0 only
        raise PretrainedError("save_pretrained runs on process 0 of a multi-process job")
    single_file = _single_file(path, format)
    meta = _description(model, arch, attention, source, extra, image_size, resize_size)
    state = jax.tree.map(host_array, nnx.to_pure_dict(nnx.state(model, WEIGHTS)))
    meta["checksum"] = checksum(state)
    text = json.dumps(meta, indent=2) + "\n"  # fails here, before anything is written
    check_destination(path, overwrite)
    if single_file:
        safetensors_io.write_model(path, flatten(state), text)
    else:
        from eca_flax.weights import orbax_io  # here: a .safetensors file needs no Orbax

        write_directory(path, lambda tmp: orbax_io.write_state(tmp, state, text), PretrainedError)


def _single_file(path: Path, format: str | None) -> bool:
    """Whether ``save_pretrained(..., format)`` writes ``path`` as one .safetensors file."""
    if format not in (None, "orbax", "safetensors") or (
        format is not None and (format == "safetensors") != is_safetensors(path)
    ):
        raise PretrainedError(
            f"{path}: format={format!r}; 'safetensors' writes a file named *{SAFETENSORS}, "
            "'orbax' a directory with any other name"
        )
    return is_safetensors(path)


def _description(
    model: nnx.Module,
    arch: str,
    attention: str | None,
    source: Mapping[str, str] | None,
    extra: Mapping[str, Any] | None,
    image_size: int,
    resize_size: int | None,
) -> dict:
    """model.json for ``save_pretrained``, after checking ``model`` is what the caller says."""
    if arch not in list_models():
        raise PretrainedError(f"unknown arch {arch!r}; choices: {', '.join(list_models())}")
    try:
        attention = attention_choice(attention)
        have = describe(model)
    except (ValueError, TypeError) as e:
        raise PretrainedError(str(e)) from None
    if unfilled := abstract_paths(model):
        raise PretrainedError(f"the model has unloaded weights: {', '.join(unfilled[:5])}")
    if diff := differences(have, {"arch": arch, "attention": attention}, ("arch", "attention")):
        key, value, _ = diff[0]
        raise PretrainedError(
            f"the model is not {arch} with attention={attention!r}: its {key} is {value!r}"
        )
    extra = dict(extra or {})
    if clash := sorted(set(extra) & {*_CORE_KEYS, "converter_version"}):
        raise PretrainedError(f"extra may not set {', '.join(clash)}")
    return {
        "format": FORMAT,
        **have,
        "image_size": int(image_size),
        "resize_size": int(resize_size or default_resize_size(image_size)),
        "params": count_params(model),
        "source": dict(source) if source is not None else None,
        **_EXTRA_DEFAULTS,
        **extra,
        "converter_version": __version__,
    }


def check_destination(path: Path_, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite`` and it is a pretrained or empty dir (a
    file, for a .safetensors path)."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise PretrainedError(
            f"{path} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    if is_safetensors(path):
        if not path.is_file() or path.is_symlink():
            raise PretrainedError(f"{path} exists and is not a file; not replacing it")
        return
    if not path.is_dir() or path.is_symlink():
        raise PretrainedError(f"{path} exists and is not a directory; not replacing it")
    if not (path / MODEL_JSON).is_file() and any(path.iterdir()):
        raise PretrainedError(
            f"{path} is a non-empty directory without {MODEL_JSON}; refusing to replace it"
        )


def read_model_json(path: Path_) -> dict:
    """The model.json of a pretrained directory (or the metadata of a .safetensors file),
    checked: raises PretrainedError otherwise."""
    path = Path(path).expanduser()
    if is_safetensors(path):
        return safetensors_io.read_description(path)
    if not path.exists():
        raise PretrainedError(f"{path}: no such directory {HINT}")
    if not path.is_dir():
        raise PretrainedError(f"{path}: not a pretrained model directory {HINT}")
    file = path / MODEL_JSON
    if not file.is_file():
        raise PretrainedError(f"{path}: no {MODEL_JSON}, not a pretrained model directory {HINT}")
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{file}: unreadable ({e})") from None
    return parse_description(text, file)


def load_pretrained(
    path: Path_,
    *,
    dtype: Any = jnp.float32,
    num_classes: int | None = None,
    seed: int = 0,
) -> nnx.Module:
    """The model saved in ``path`` (a pretrained directory or .safetensors file), ready for
    inference (eval mode); no torch needed, and no Orbax for a .safetensors file.

    ``dtype`` is the compute dtype (parameters stay float32). A ``num_classes`` other than the
    file's replaces the classifier by a freshly initialised one (``seed``), for fine-tuning.
    """
    meta = read_model_json(path)
    expected = meta.get("checksum")
    if is_safetensors(path):
        read = lambda target: safetensors_io.read_weights(path, target, expected=expected)
        where = str(path)
    else:
        state_dir = Path(path).expanduser() / STATE_DIR
        if not state_dir.is_dir():
            raise PretrainedError(f"{path}: no {STATE_DIR}/ checkpoint beside {MODEL_JSON}")
        from eca_flax.weights import orbax_io  # here: a .safetensors file needs no Orbax

        read = lambda target: orbax_io.read_weights(state_dir, target, expected=expected)
        where = str(Path(path) / MODEL_JSON)
    return restore_model(meta, read, num_classes=num_classes, dtype=dtype, seed=seed, where=where)
