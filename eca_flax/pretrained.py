"""Pretrained ECA-Net weights on disk: save_pretrained, load_pretrained, read_model_json.

A pretrained model is a directory (what ``convert_torch_weights.py`` writes and training can
export)::

    model.json   how to rebuild the model: {"format": "eca_flax.pretrained/1", "arch",
                 "k_size" (one per ECA layer group), "num_classes", "attention", "params",
                 "source" ({"file", "sha256"} of a converted .pth, or null), "epoch",
                 "best_prec1", "converter_version"}
    state/       an Orbax checkpoint of the weights and BatchNorm statistics as a pure dict
                 (``nnx.to_pure_dict(nnx.state(model, (nnx.Param, nnx.BatchStat)))``)

Loading needs jax, flax and orbax only (no torch). Models are built without random
initialisation (``empty_model``) and filled from the checkpoint, which makes loading
ResNet-152 take seconds rather than the half minute its random init costs on a CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from eca_flax.mobilenetv2 import ECAMobileNetV2
from eca_flax.registry import count_params, create_model, list_models, resolve_k_size
from eca_flax.resnet import ATTENTIONS, ECAResNet

FORMAT = "eca_flax.pretrained/1"
MODEL_JSON = "model.json"
STATE_DIR = "state"
WEIGHTS = (nnx.Param, nnx.BatchStat)  # what a pretrained model stores
_CORE_KEYS = ("format", "arch", "k_size", "num_classes", "attention", "params", "source")
_EXTRA_DEFAULTS = {"epoch": None, "best_prec1": None}
_ABSTRACT: dict[tuple, nnx.Module] = {}  # see _abstract
_REST: dict[tuple, nnx.State] = {}  # non-weight state (dropout RNG) of empty_model, by seed

Path_ = str | os.PathLike[str]


class PretrainedError(Exception):
    """A pretrained-model directory that cannot be read or written; the message says why."""


def weight_paths(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    """The model's weights and BN statistics by Flax path (the variables a checkpoint holds)."""
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def num_classes_of(model: nnx.Module) -> int:
    """The number of logits the model's classifier produces."""
    if isinstance(model, ECAResNet):
        return int(model.fc.out_features)
    if isinstance(model, ECAMobileNetV2):
        return int(model.classifier[1].out_features)
    raise TypeError(f"not an eca_flax model: {type(model).__name__}")


def empty_model(
    arch: str,
    *,
    k_size: Any = None,
    num_classes: int = 1000,
    attention: str | None = "eca",
    dtype: Any = jnp.float32,
    seed: int = 0,
    init: Collection[tuple] = (),
) -> nnx.Module:
    """``create_model(arch, ...)`` without the cost of random initialisation.

    Weights and BN statistics are left as abstract ``jax.ShapeDtypeStruct`` placeholders for
    the caller to fill (``convert.load_state_dict`` or a checkpoint); everything else (the
    dropout RNG of MobileNetV2) and the weight paths listed in ``init`` (a new head) get exactly
    the values ``create_model(..., rngs=nnx.Rngs(seed))`` would give them. Under ``jax.jit`` the
    unused random initialisers are dropped, so only what is needed is computed.
    """
    model = _abstract(arch, k_size, num_classes, attention, dtype)
    init = set(init)
    _, _, rest = nnx.split(model, WEIGHTS, ...)
    key = (arch, resolve_k_size(arch, k_size), int(num_classes), attention, seed)
    if not init and key in _REST:
        nnx.update(model, _REST[key])
    elif init or jax.tree.leaves(rest):

        def concrete() -> tuple[nnx.State, dict]:
            made = create_model(
                arch,
                k_size=k_size,
                num_classes=num_classes,
                attention=attention,
                dtype=dtype,
                rngs=nnx.Rngs(seed),
            )
            _, weights, others = nnx.split(made, WEIGHTS, ...)
            return others, {
                p: v.get_value() for p, v in nnx.to_flat_state(weights) if tuple(p) in init
            }

        others, fresh = jax.jit(concrete)()
        nnx.update(model, others)
        _REST[key] = others
        variables = weight_paths(model)
        for path, value in fresh.items():
            variables[tuple(path)].set_value(value)
    return model


def abstract_paths(model: nnx.Module) -> list[str]:
    """Weight paths of ``model`` still holding placeholders (empty when fully loaded)."""
    return [
        "/".join(map(str, p))
        for p, v in weight_paths(model).items()
        if isinstance(v.get_value(), jax.ShapeDtypeStruct)
    ]


def _abstract(
    arch: str, k_size: Any, num_classes: int, attention: str | None, dtype: Any
) -> nnx.Module:
    """A fresh copy of ``nnx.eval_shape(create_model(...))``; cached, because tracing the
    construction of ResNet-152 takes seconds and one process often builds a model repeatedly
    (convert, load, export)."""
    key = (arch, resolve_k_size(arch, k_size), int(num_classes), attention, jnp.dtype(dtype).name)
    if key not in _ABSTRACT:
        if len(_ABSTRACT) >= 16:
            _ABSTRACT.clear()
        _ABSTRACT[key] = nnx.eval_shape(
            lambda: create_model(
                arch, k_size=k_size, num_classes=num_classes, attention=attention, dtype=dtype
            )
        )
    return nnx.clone(_ABSTRACT[key])


def _weight_shapes(
    arch: str, *, k_size: Any, num_classes: int, attention: str | None
) -> dict[tuple, jax.ShapeDtypeStruct]:
    """Shape and dtype of every weight of that model, without building it."""
    model = _abstract(arch, k_size, num_classes, attention, jnp.float32)
    return {p: v.get_value() for p, v in weight_paths(model).items()}


def _structure_error(
    model: nnx.Module, arch: str, k_size: Any, num_classes: int, attention: str | None
) -> str | None:
    """Why ``model`` is not ``arch`` with these settings, or None when it is."""
    what = f"{arch} (k_size={list(k_size)}, attention={attention!r}, {num_classes} classes)"
    try:
        want = _weight_shapes(arch, k_size=k_size, num_classes=num_classes, attention=attention)
    except ValueError as e:
        return f"the model is not {what}: {e}"
    want_shapes = {p: tuple(v.shape) for p, v in want.items()}
    have = {p: tuple(v.shape) for p, v in weight_paths(model).items()}
    if want_shapes == have:
        return None
    diff = sorted("/".join(map(str, p)) for p in set(want_shapes) ^ set(have))
    diff += sorted(
        "/".join(map(str, p)) for p in set(want_shapes) & set(have) if want_shapes[p] != have[p]
    )
    more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
    return f"the model is not {what}: it differs at {', '.join(diff[:5])}{more}"


def save_pretrained(
    model: nnx.Module,
    path: Path_,
    *,
    arch: str,
    attention: str | None,
    source: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write ``model`` as a pretrained directory (model.json + Orbax ``state/``), atomically.

    Everything is written into a temporary directory beside ``path`` and renamed into place
    at the end, so a failure leaves no ``path`` (or the previous one, untouched). An existing
    ``path`` is refused unless ``overwrite``, and even then only a pretrained directory (one
    with a model.json) or an empty directory is replaced. ``source`` is {"file", "sha256"} of
    a converted file; ``extra`` adds keys to model.json (``epoch`` and ``best_prec1`` default
    to null). In a multi-process job, call it on process 0 only.
    """
    path = Path(path).expanduser().absolute()
    if jax.process_index() != 0:  # Orbax writes host arrays from process 0 only
        raise PretrainedError("save_pretrained runs on process 0 of a multi-process job")
    if arch not in list_models():
        raise PretrainedError(f"unknown arch {arch!r}; choices: {', '.join(list_models())}")
    if attention not in ATTENTIONS:
        raise PretrainedError(f"unknown attention {attention!r}; choices: {ATTENTIONS}")
    if unfilled := abstract_paths(model):
        raise PretrainedError(f"the model has unloaded weights: {', '.join(unfilled[:5])}")
    k_size = [int(k) for k in model.k_size]
    num_classes = num_classes_of(model)
    if problem := _structure_error(model, arch, k_size, num_classes, attention):
        raise PretrainedError(problem)
    extra = dict(extra or {})
    if clash := sorted(set(extra) & {*_CORE_KEYS, "converter_version"}):
        raise PretrainedError(f"extra may not set {', '.join(clash)}")
    import eca_flax  # the package is fully imported by the time this runs

    meta = {
        "format": FORMAT,
        "arch": arch,
        "k_size": k_size,
        "num_classes": num_classes,
        "attention": attention,
        "params": count_params(model),
        "source": dict(source) if source is not None else None,
        **_EXTRA_DEFAULTS,
        **extra,
        "converter_version": eca_flax.__version__,
    }
    text = json.dumps(meta, indent=2) + "\n"  # fails here, before anything is written
    check_destination(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        state = jax.tree.map(_host_array, nnx.to_pure_dict(nnx.state(model, WEIGHTS)))
        checkpointer = _checkpointer()
        try:
            checkpointer.save(tmp / STATE_DIR, state)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        (tmp / MODEL_JSON).write_text(text)
        if path.exists():
            old = tmp.with_suffix(".old")
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)
            old = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _checkpointer() -> ocp.StandardCheckpointer:
    """An Orbax checkpointer for this process alone: in a multi-process job, pretrained
    directories are written by one process and read by each process independently."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def _host_array(x: Any) -> np.ndarray:
    """A weight as a host numpy array (replicated multi-process arrays: this process's copy)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.sharding.is_fully_replicated:
            raise PretrainedError("save_pretrained needs replicated (or host-local) weights")
        x = x.addressable_data(0)
    return np.asarray(x)


def check_destination(path: Path_, overwrite: bool) -> None:
    """Refuse an existing ``path`` unless ``overwrite`` and it is a pretrained or empty dir."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise PretrainedError(
            f"{path} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    if not path.is_dir() or path.is_symlink():
        raise PretrainedError(f"{path} exists and is not a directory; not replacing it")
    if not (path / MODEL_JSON).is_file() and any(path.iterdir()):
        raise PretrainedError(
            f"{path} is a non-empty directory without {MODEL_JSON}; refusing to replace it"
        )


def read_model_json(path: Path_) -> dict:
    """The model.json of a pretrained directory, checked: raises PretrainedError otherwise."""
    path = Path(path).expanduser()
    hint = "(convert a .pth file with convert_torch_weights.py SRC DST)"
    if not path.exists():
        raise PretrainedError(f"{path}: no such directory {hint}")
    if not path.is_dir():
        raise PretrainedError(f"{path}: not a pretrained model directory {hint}")
    file = path / MODEL_JSON
    if not file.is_file():
        raise PretrainedError(f"{path}: no {MODEL_JSON}, not a pretrained model directory {hint}")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PretrainedError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise PretrainedError(f"{file}: format {got!r}, expected {FORMAT!r}")
    if missing := [k for k in ("arch", "k_size", "num_classes", "attention") if k not in meta]:
        raise PretrainedError(f"{file}: missing {', '.join(missing)}")
    if meta["arch"] not in list_models():
        raise PretrainedError(f"{file}: unknown arch {meta['arch']!r}")
    if meta["attention"] not in ATTENTIONS:
        raise PretrainedError(f"{file}: unknown attention {meta['attention']!r}")
    return meta


def load_pretrained(
    path: Path_,
    *,
    dtype: Any = jnp.float32,
    num_classes: int | None = None,
    seed: int = 0,
) -> nnx.Module:
    """The model saved in ``path``, ready for inference (eval mode); no torch needed.

    ``dtype`` is the compute dtype (parameters stay float32). A ``num_classes`` other than the
    file's replaces the classifier by a freshly initialised one (``seed``), for fine-tuning.
    """
    meta = read_model_json(path)
    path = Path(path).expanduser()
    state_dir = path / STATE_DIR
    if not state_dir.is_dir():
        raise PretrainedError(f"{path}: no {STATE_DIR}/ checkpoint beside {MODEL_JSON}")
    arch, saved_classes = meta["arch"], int(meta["num_classes"])
    num_classes = saved_classes if num_classes is None else int(num_classes)
    if num_classes < 1:
        raise PretrainedError(f"num_classes must be positive, got {num_classes}")
    kw = dict(k_size=meta["k_size"], attention=meta["attention"], dtype=dtype, seed=seed)
    try:
        if num_classes == saved_classes:
            fresh: set[tuple] = set()
            model = empty_model(arch, num_classes=num_classes, **kw)
            saved = {p: v.get_value() for p, v in weight_paths(model).items()}
        else:  # a new head: restore the saved shapes, initialise what differs
            spec = dict(k_size=meta["k_size"], attention=meta["attention"])
            saved = _weight_shapes(arch, num_classes=saved_classes, **spec)
            shapes = _weight_shapes(arch, num_classes=num_classes, **spec)
            fresh = {p for p, s in shapes.items() if saved[p].shape != s.shape}
            model = empty_model(arch, num_classes=num_classes, init=fresh, **kw)
    except ValueError as e:  # k_size / arch combinations that create_model rejects
        raise PretrainedError(f"{path / MODEL_JSON}: {e}") from None
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = {
        p: jax.ShapeDtypeStruct(tuple(v.shape), v.dtype, sharding=device) for p, v in saved.items()
    }
    restored = _restore(state_dir, target)
    for p, var in weight_paths(model).items():
        if p not in fresh:
            var.set_value(restored[p])
    model.eval()
    return model


def _unflatten(flat: Mapping[tuple, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def _flatten(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    """{path: leaf} of a nested dict (or Orbax tree metadata); digit keys become ints."""
    flat = {}
    for key, value in tree.items():
        key = int(key) if isinstance(key, str) and key.isdigit() else key
        if hasattr(value, "items"):
            flat.update(_flatten(value, (*prefix, key)))
        else:
            flat[(*prefix, key)] = value
    return flat


def _one_line(error: BaseException) -> str:
    first = (str(error).strip().splitlines() or [""])[0][:300]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _restore(state_dir: Path, target: dict[tuple, jax.ShapeDtypeStruct]) -> dict[tuple, Any]:
    """Read the Orbax checkpoint into arrays shaped like ``target``; one-line errors.

    The stored shapes are checked against ``target`` first, from the checkpoint's metadata:
    a model.json that does not match its state/ gets a clear message naming the array.
    """
    checkpointer = _checkpointer()
    try:
        try:
            metadata = checkpointer.metadata(state_dir.absolute())
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged checkpoints
            raise PretrainedError(
                f"{state_dir}: not a readable checkpoint ({_one_line(e)})"
            ) from None
        tree = getattr(metadata, "item_metadata", metadata)
        if not hasattr(tree, "items"):
            raise PretrainedError(f"{state_dir}: not a readable checkpoint (no array metadata)")
        stored = _flatten(tree)
        if set(stored) != set(target):
            diff = sorted("/".join(map(str, p)) for p in set(stored) ^ set(target))
            raise PretrainedError(
                f"{state_dir}: the arrays do not match {MODEL_JSON} (e.g. {', '.join(diff[:3])})"
            )
        for p, leaf in sorted(stored.items(), key=lambda kv: str(kv[0])):
            if tuple(leaf.shape) != tuple(target[p].shape):
                raise PretrainedError(
                    f"{state_dir}: {'/'.join(map(str, p))} is stored with shape "
                    f"{tuple(leaf.shape)} but {MODEL_JSON} implies {tuple(target[p].shape)}"
                )
        try:
            restored = checkpointer.restore(state_dir.absolute(), _unflatten(target))
        except Exception as e:  # noqa: BLE001
            raise PretrainedError(
                f"{state_dir}: cannot restore the checkpoint ({_one_line(e)})"
            ) from None
    finally:
        with contextlib.suppress(Exception):
            checkpointer.close()
    return _flatten(restored)
