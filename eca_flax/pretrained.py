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

Training checkpoints store their weights in the same layout and describe their model with the
same keys (``MODEL_KEYS``), so ``restore_model`` (head replacement, compute dtype, placement)
and ``read_weights`` (checked Orbax reading) serve both. Loading needs jax, flax and orbax only
(no torch). Models are built without random initialisation (``empty_model``) and filled from
the checkpoint, which makes loading ResNet-152 take seconds rather than the half minute its
random init costs on a CPU.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from eca_flax.data.transforms import default_resize_size
from eca_flax.layers import attention_choice
from eca_flax.registry import arch_of, count_params, create_model, list_models, resolve_k_size

FORMAT = "eca_flax.pretrained/1"
MODEL_JSON = "model.json"
STATE_DIR = "state"
WEIGHTS = (nnx.Param, nnx.BatchStat)  # what a pretrained model stores
MODEL_KEYS = ("arch", "k_size", "num_classes", "attention")  # every weights file's description
_CORE_KEYS = ("format", *MODEL_KEYS, "image_size", "resize_size", "params", "source",
              "checksum")  # fmt: skip
_EXTRA_DEFAULTS = {"epoch": None, "best_prec1": None}

Path_ = str | os.PathLike[str]
Flat = dict[tuple, Any]  # {('layer1', 0, 'conv1', 'kernel'): value}


class PretrainedError(Exception):
    """A pretrained-model directory that cannot be read or written; the message says why."""


# --------------------------------------------------------------------------------------------
# Models, their weights and their description.


def weight_paths(model: nnx.Module) -> dict[tuple, nnx.Variable]:
    """The model's weights and BN statistics by Flax path (the variables a checkpoint holds)."""
    return {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, WEIGHTS))}


def num_classes_of(model: nnx.Module) -> int:
    """The number of logits the model's classifier produces."""
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


@functools.lru_cache(maxsize=16)
def _abstract(arch: str, k_size: tuple, num_classes: int, attention: str | None, dtype: str):
    """``nnx.eval_shape(create_model(...))``: tracing ResNet-152's construction takes seconds,
    and one process often builds a model repeatedly (convert, load, export). Callers clone it."""
    return nnx.eval_shape(
        lambda: create_model(
            arch, k_size=k_size, num_classes=num_classes, attention=attention,
            dtype=jnp.dtype(dtype)
        )
    )  # fmt: skip


@functools.lru_cache(maxsize=16)
def _initialised(key: tuple, seed: int, init: frozenset) -> tuple[nnx.State, Flat]:
    """What ``create_model(*key, rngs=nnx.Rngs(seed))`` gives the non-weight state (dropout RNG)
    and the weight paths in ``init``; under jit the unused initialisers are dropped."""
    arch, k_size, num_classes, attention, dtype = key

    def concrete() -> tuple[nnx.State, Flat]:
        made = create_model(
            arch,
            k_size=k_size,
            num_classes=num_classes,
            attention=attention,
            dtype=jnp.dtype(dtype),
            rngs=nnx.Rngs(seed),
        )
        _, weights, others = nnx.split(made, WEIGHTS, ...)
        return others, {p: v.get_value() for p, v in nnx.to_flat_state(weights) if p in init}

    return jax.jit(concrete)()


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
    the values ``create_model(..., rngs=nnx.Rngs(seed))`` would give them.
    """
    key = (arch, resolve_k_size(arch, k_size), int(num_classes), attention_choice(attention),
           jnp.dtype(dtype).name)  # fmt: skip
    model = nnx.clone(_abstract(*key))
    _, _, rest = nnx.split(model, WEIGHTS, ...)
    if init or jax.tree.leaves(rest):
        others, fresh = _initialised(key, seed, frozenset(map(tuple, init)))
        nnx.update(model, others)
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


def abstract(tree: Any, sharding: Any = None) -> Any:
    """``jax.ShapeDtypeStruct`` placeholders of ``tree``'s arrays, placed by ``sharding`` (default:
    each array's own sharding): the target Orbax restores into."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree
    )


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
    fine-tuning. ``dtype`` is the compute dtype; parameters stay float32.
    """
    arch, saved_classes = meta["arch"], int(meta["num_classes"])
    num_classes = saved_classes if num_classes is None else int(num_classes)
    if num_classes < 1:
        raise PretrainedError(f"num_classes must be positive, got {num_classes}")
    spec = dict(k_size=meta["k_size"], attention=meta["attention"])
    try:
        saved = _weight_shapes(arch, num_classes=saved_classes, **spec)
        shapes = _weight_shapes(arch, num_classes=num_classes, **spec)
        fresh = {p for p, s in shapes.items() if saved[p].shape != s.shape}
        model = empty_model(arch, num_classes=num_classes, dtype=dtype, seed=seed, init=fresh,
                            **spec)  # fmt: skip
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
    model = _abstract(arch, resolve_k_size(arch, k_size), num_classes,
                      attention_choice(attention), "float32")  # fmt: skip
    return {p: v.get_value() for p, v in weight_paths(model).items()}


# --------------------------------------------------------------------------------------------
# Orbax: reading and writing the weights as one pure dict.


def flatten(tree: Any) -> Flat:
    """{path: leaf} of a nested dict (or Orbax tree metadata); digit keys become list indices."""
    flat = traverse_util.flatten_dict(dict(tree), is_leaf=lambda _, v: not hasattr(v, "items"))
    return {tuple(int(k) if isinstance(k, str) and k.isdigit() else k for k in p): v
            for p, v in flat.items()}  # fmt: skip


def _checkpointer() -> ocp.StandardCheckpointer:
    """An Orbax checkpointer for this process alone: in a multi-process job, pretrained
    directories are written by one process and read by each process independently."""
    if jax.process_count() == 1:
        return ocp.StandardCheckpointer()
    me = jax.process_index()
    options = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    return ocp.StandardCheckpointer(multiprocessing_options=options)


def one_line(error: BaseException) -> str:
    """'Type: first line of the message', without the spec dump TensorStore appends."""
    first = (str(error).strip().splitlines() or [""])[0]
    first = re.split(r"\.? *(?:See full TensorStore details|\[tensorstore_spec)", first)[0][:300]
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


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


def disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` (or what caused it) is a full disk, however Orbax / TensorStore wrap it."""
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Ctrl-C inside the block waits for its end, so writes are never cut half-way: the block
    gets a function saying whether one came (to undo its work), and it is raised after it."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)
    if hits:
        raise KeyboardInterrupt


def remove_unfinished(path: Path_, settle: float = 0.5) -> None:
    """Removes what a failed Orbax save left: TensorStore writes still in flight may land after
    a first removal, so it is removed again until the directory stays gone for ``settle`` s."""
    for _ in range(20):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(settle)
        if not os.path.lexists(path):
            return


def private_to_umask(path: Path_) -> None:
    """A directory or file made private by mkdtemp / mkstemp gets the umask's usual mode."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def read_weights(
    state_dir: Path_, target: Flat, *, what: str = MODEL_JSON, expected: str | None = None
) -> Flat:
    """Read the Orbax checkpoint ``state_dir`` into arrays shaped like ``target``; one-line errors.

    The stored shapes are checked against ``target`` first, from the checkpoint's metadata: a
    description (``what``) that does not match the stored arrays gets a message naming the array.
    With ``expected`` (what ``checksum`` gave when they were written), the arrays must match it.
    """
    state_dir = Path(state_dir).absolute()
    checkpointer = _checkpointer()
    try:
        try:
            metadata = checkpointer.metadata(state_dir)
        except Exception as e:  # noqa: BLE001 - Orbax raises many types for damaged checkpoints
            raise PretrainedError(
                f"{state_dir}: not a readable checkpoint ({one_line(e)})"
            ) from None
        tree = getattr(metadata, "item_metadata", metadata)
        if not hasattr(tree, "items"):
            raise PretrainedError(f"{state_dir}: not a readable checkpoint (no array metadata)")
        stored = flatten(tree)
        if set(stored) != set(target):
            diff = sorted("/".join(map(str, p)) for p in set(stored) ^ set(target))
            raise PretrainedError(
                f"{state_dir}: the arrays do not match {what} (e.g. {', '.join(diff[:3])})"
            )
        for p, leaf in sorted(stored.items(), key=lambda kv: str(kv[0])):
            if tuple(leaf.shape) != tuple(target[p].shape):
                raise PretrainedError(
                    f"{state_dir}: {'/'.join(map(str, p))} is stored with shape "
                    f"{tuple(leaf.shape)} but {what} implies {tuple(target[p].shape)}"
                )
        try:
            restored = checkpointer.restore(state_dir, traverse_util.unflatten_dict(target))
        except Exception as e:  # noqa: BLE001
            raise PretrainedError(
                f"{state_dir}: cannot restore the checkpoint ({one_line(e)})"
            ) from None
    finally:
        with contextlib.suppress(Exception):
            checkpointer.close()
    if expected is not None and checksum(restored) != expected:
        raise PretrainedError(
            f"{state_dir}: the arrays do not match the checksum recorded when they were written "
            "(a damaged or changed file)"
        )
    return flatten(restored)


def host_array(x: Any) -> np.ndarray:
    """A weight as a host numpy array (replicated multi-process arrays: this process's copy)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.sharding.is_fully_replicated:
            raise PretrainedError("save_pretrained needs replicated (or host-local) weights")
        x = x.addressable_data(0)
    return np.asarray(x)


# --------------------------------------------------------------------------------------------
# Pretrained directories.


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
) -> None:
    """Write ``model`` as a pretrained directory (model.json + Orbax ``state/``), atomically.

    Everything is written into a temporary directory beside ``path`` and renamed into place
    at the end, so a failure leaves no ``path`` (or the previous one, untouched). An existing
    ``path`` is refused unless ``overwrite``, and even then only a pretrained directory (one
    with a model.json) or an empty directory is replaced. ``arch`` / ``attention`` must be what
    the model is. ``source`` is {"file", "sha256"} of a converted file; ``extra`` adds keys to
    model.json (``epoch`` and ``best_prec1`` default to null). ``image_size`` / ``resize_size``
    record the eval preprocessing the model expects (center crop after resizing the shorter
    side; default the 256/224 ratio): predict uses them. In a multi-process job, call it on
    process 0 only.
    """
    path = Path(path).expanduser().absolute()
    if jax.process_index() != 0:  # Orbax writes host arrays from process 0 only
        raise PretrainedError("save_pretrained runs on process 0 of a multi-process job")
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
        raise PretrainedError(f"the model is not {arch} with attention={attention!r}: its {key} "
                              f"is {value!r}")  # fmt: skip
    extra = dict(extra or {})
    if clash := sorted(set(extra) & {*_CORE_KEYS, "converter_version"}):
        raise PretrainedError(f"extra may not set {', '.join(clash)}")
    import eca_flax  # the package is fully imported by the time this runs

    meta = {
        "format": FORMAT,
        **have,
        "image_size": int(image_size),
        "resize_size": int(resize_size or default_resize_size(image_size)),
        "params": count_params(model),
        "source": dict(source) if source is not None else None,
        **_EXTRA_DEFAULTS,
        **extra,
        "converter_version": eca_flax.__version__,
    }
    state = jax.tree.map(host_array, nnx.to_pure_dict(nnx.state(model, WEIGHTS)))
    meta["checksum"] = checksum(state)
    text = json.dumps(meta, indent=2) + "\n"  # fails here, before anything is written
    check_destination(path, overwrite)
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with deferred_interrupt() as interrupted:
            _write_atomically(path, state, text, interrupted)
    except (KeyboardInterrupt, PretrainedError):
        raise
    except Exception as e:  # noqa: BLE001 - OSError, or Orbax / TensorStore wrapping one
        reason = "no space left on the device" if disk_full(e) else one_line(e)
        kept = f"; the previous {path} is untouched" if existed else ""
        raise PretrainedError(
            f"{path}: could not write it ({reason}); nothing written{kept}"
        ) from None


def _write_atomically(path: Path, state: dict, text: str, interrupted: Callable) -> None:
    """state/ and model.json into a temporary directory beside ``path``, renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = None
    try:
        private_to_umask(tmp)  # others may read what they could read of any file here
        checkpointer = _checkpointer()
        try:
            checkpointer.save(tmp / STATE_DIR, state)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        (tmp / MODEL_JSON).write_text(text)
        if interrupted():  # Ctrl-C came while writing: undo, then let it through
            raise KeyboardInterrupt
        if path.exists():
            old = tmp.with_suffix(".old")
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.rename(old, path)
            old = None
        remove_unfinished(tmp)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
    check_description(meta, file)
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
    state_dir = Path(path).expanduser() / STATE_DIR
    if not state_dir.is_dir():
        raise PretrainedError(f"{path}: no {STATE_DIR}/ checkpoint beside {MODEL_JSON}")
    return restore_model(
        meta,
        lambda target: read_weights(state_dir, target, expected=meta.get("checksum")),
        num_classes=num_classes,
        dtype=dtype,
        seed=seed,
        where=str(Path(path) / MODEL_JSON),
    )
