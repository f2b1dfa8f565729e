"""The trainer's configuration: every field with its default, the recipes, the checks, the Plan.

``default_config()`` is the schema (the files in configs/ start from it; ``--config.FIELD=V``
overrides any field; ``load_config_file`` runs a file's ``get_config()``). ``resolve_config``
checks every field before anything runs and applies the recipe; ``make_plan`` derives the sizes
that need the dataset and the device count.

Reading a config loads no JAX (the models and weights modules are imported where a config is
checked): train.py's supervisor of a multi-process run reads the config and starts nothing else.
"""

from __future__ import annotations

import dataclasses
import importlib.machinery
import importlib.util
import math
import os
import re
import sys
import traceback
from typing import TYPE_CHECKING, Any

import ml_collections

from eca_flax import data
from eca_flax.data import pipeline, randaugment
from eca_flax.data.transforms import eval_settings, override_eval
from eca_flax.errors import ConfigError, PretrainedError

if TYPE_CHECKING:
    import jax

SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "lamb")
LOSSES = ("softmax_ce", "bce")
# Each recipe sets these fields over the config's own values ("original": none).
RECIPES: dict[str, dict[str, Any]] = {
    "original": {},
    # Warmup + cosine, label smoothing, Nesterov momentum, no weight decay on BatchNorm
    # parameters and biases.
    "modern": {
        "schedule": "cosine",
        "warmup_epochs": 5,
        "label_smoothing": 0.1,
        "nesterov": True,
        "decay_bn_bias": False,
    },
    # The normalization-free ECA networks (eca_nfnet_l*, nf_ecaresnet*): the modern recipe
    # with adaptive gradient clipping at 0.01 (Brock et al. 2021's lambda; no BatchNorm to
    # keep large-batch gradients in check); no weight decay on biases (1-D parameters).
    "nfnet": {
        "schedule": "cosine",
        "warmup_epochs": 5,
        "label_smoothing": 0.1,
        "nesterov": True,
        "decay_bn_bias": False,
        "agc_clip": 0.01,
    },
    # "ResNet strikes back" (Wightman, Touvron, Jegou 2021, arXiv:2110.00476), procedure A3
    # (Table 1; ResNet-50 top-1 78.1 at 224): LAMB at 8e-3 per 2048 images, weight decay 0.02
    # (none on BatchNorm and biases), 5 warmup epochs + cosine, binary cross-entropy with targets
    # thresholded at 0.2, no label smoothing, Mixup 0.1 / CutMix 1.0 (switch 0.5, every batch),
    # RandAugment m6 std 0.5 (increasing ops), random resized crops and flips. Its resolutions,
    # batch and epochs (train 160, test 224 at crop 0.95, 2048, 100) are the config file's:
    # configs/eca_resnet50_rsb_a3.py.
    "rsb_a3": {
        "optimizer": "lamb",
        "learning_rate": 8e-3,
        "base_batch_size": 2048,
        "weight_decay": 0.02,
        "decay_bn_bias": False,
        "schedule": "cosine",
        "warmup_epochs": 5,
        "loss": "bce",
        "bce_target_thresh": 0.2,
        "label_smoothing": 0.0,
        "mixup_alpha": 0.1,
        "cutmix_alpha": 1.0,
        "mixup_switch_prob": 0.5,
        "mixup_prob": 1.0,
        "randaugment": "rand-m6-mstd0.5-inc1",
        "augment": "inception_crop",
        "min_crop_area": 0.08,
        "hflip": True,
    },
}
POSITIVE_FIELDS = (
    "batch_size",
    "image_size",
    "num_epochs",
    "base_batch_size",
    "log_every_steps",
    "checkpoint_every_steps",
    "keep_checkpoints",
    "eval_every_epochs",
    "distributed_timeout_s",
    "distributed_heartbeat_s",
    "lr_decay_epochs",
)
# The other numeric fields: (low, high, the bounds included "[]", "[)", "(]" or "()", a note).
# A value must be a finite number within; a finite learning rate however large is a recipe's
# choice. Seeds: numpy's SeedSequence (the data order and augmentation) takes integers >= 0,
# jax.random.key (initialisation, dropout, mixing) a 64-bit signed one.
RANGES: dict[str, tuple[float, float, str, str]] = {
    "learning_rate": (0, math.inf, "()", ""),
    "momentum": (0, 1, "[)", ""),
    "weight_decay": (0, math.inf, "[)", ""),
    "label_smoothing": (0, 1, "[)", ""),
    "agc_clip": (0, math.inf, "[)", ""),
    "lr_decay_factor": (0, 1, "(]", ""),
    "warmup_epochs": (0, math.inf, "[)", ""),
    "min_crop_area": (0, 1, "(]", ""),
    "mixup_alpha": (0, math.inf, "[)", " (0: off)"),
    "cutmix_alpha": (0, math.inf, "[)", " (0: off)"),
    "mixup_switch_prob": (0, 1, "[]", ""),
    "mixup_prob": (0, 1, "[]", ""),
    "ema_decay": (0, 1, "[)", " (0: no EMA)"),
    "seed": (0, 2**63 - 1, "[]", " (2**63 - 1: the seeds numpy and JAX take)"),
}


def default_config() -> ml_collections.ConfigDict:
    """Every config field with its default: the original ResNet recipe on ImageNet."""
    c = ml_collections.ConfigDict()
    # Model.
    c.model = "eca_resnet50"  # One of eca_flax.list_models().
    c.k_size = ""  # "": released sizes (or init_from's); "adaptive"; "3557"; "3,5,5,7".
    c.attention = "eca"  # "eca", "eca_ns" (non-shared ablation), "se" (SE, ResNets) or "none".
    c.num_classes = -1  # -1: the dataset's number of classes.
    c.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (params stay float32).
    # A converter output dir, a training workdir or one of its checkpoints, or a released model's
    # name (ecaresnet50t.ra2_in1k, eca_resnet50, hf-hub:ORG/NAME): downloaded, converted, cached.
    c.init_from = ""
    # Data.
    c.dataset = "imagenet2012"  # "imagenet2012" (TFDS), "folder:PATH" (train/, val/), "digits:16".
    c.data_dir = ""  # TFDS data dir ("": TFDS's default).
    c.batch_size = 256  # Global: over all devices of all hosts.
    c.eval_batch_size = -1  # -1: batch_size.
    c.image_size = 224  # Train crops.
    c.eval_image_size = -1  # Eval center crops; -1: image_size (RSB A3 trains at 160, tests 224).
    c.eval_resize_size = -1  # Eval: resize the shorter side to this, center crop eval_image_size;
    # -1: round(eval_image_size * 256 / 224), the original's Resize(256) + CenterCrop(224).
    c.eval_interpolation = ""  # Eval resize filter: "bilinear" or "bicubic"; "": bilinear, or
    # with eval_only, init_from's own eval preprocessing (its model.json: timm's bicubic, sizes).
    c.augment = "inception_crop"  # Or "pad_crop:N" (shifts of up to N px, for small images).
    c.min_crop_area = 0.08  # Random resized crop area range [min_crop_area, 1].
    c.hflip = True  # Random horizontal flips.
    c.randaugment = ""  # timm's spec, e.g. "rand-m6-mstd0.5-inc1" (data/randaugment.py); "": off.
    c.mixup_alpha = 0.0  # Mixup lam ~ Beta(a, a) (training/mixing.py); 0: off.
    c.cutmix_alpha = 0.0  # CutMix lam ~ Beta(a, a); 0: off.
    c.mixup_switch_prob = 0.5  # Both on: the chance a batch takes CutMix instead of Mixup.
    c.mixup_prob = 1.0  # The chance a batch is mixed at all.
    c.skip_damaged_images = False  # Skip unreadable images (counted per epoch) instead of stopping.
    # Read images over PIL's limit against decompression bombs (178,956,970 pixels), refused
    # as too large by default.
    c.allow_large_images = False
    c.data_threads = 0  # Decoding threads per process; 0: one per core.
    # grain worker processes (each with data_threads; 0: threads only). "auto": threads while
    # the GIL lets them scale, else one worker per core (data.pipeline.auto_workers).
    c.data_workers = ml_collections.FieldReference("auto", field_type=object)
    c.seed = 0  # Initialisation, data order, augmentation and dropout.
    # Evaluation.
    c.eval_only = False  # Evaluate init_from (or the workdir's latest checkpoint) and stop.
    c.eval_every_epochs = 1
    # Optimisation: the original recipe (SGD, step decay); RECIPES lists the others.
    c.recipe = "original"
    c.optimizer = "sgd"  # "sgd" (momentum, nesterov below) or "lamb" (steps.lamb).
    c.num_epochs = 100
    c.num_train_steps = -1  # Stop at this step (a cap: the schedule stays num_epochs'); -1: none.
    c.learning_rate = 0.1  # At base_batch_size images; scaled linearly with batch_size.
    c.base_batch_size = 256
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 1e-4
    c.decay_bn_bias = True  # The original decays every parameter, BatchNorm and biases too.
    c.agc_clip = 0.0  # Adaptive gradient clipping (NFNets): clip each gradient unit to this
    # times its weight's norm, the classifier excepted; 0: off. The "nfnet" recipe: 0.01.
    c.schedule = "step"  # "step": x lr_decay_factor every lr_decay_epochs; "cosine".
    c.lr_decay_epochs = 30
    c.lr_decay_factor = 0.1
    c.warmup_epochs = 0  # Linear warmup (cosine schedule).
    c.loss = "softmax_ce"  # Or "bce": a sigmoid binary cross-entropy per class.
    c.bce_target_thresh = -1.0  # bce: targets above it become 1, the others 0; -1: soft targets.
    c.label_smoothing = 0.0
    # Exponential moving average (EMA) of the weights: params and BatchNorm statistics.
    c.ema_decay = 0.0  # 0: off; e.g. 0.9998 (timm's ResNet recipes). Evaluated beside the raw
    # weights every epoch and exported beside them: pretrained_ema/ and best_ema/.
    c.ema_warmup = False  # Decay min(ema_decay, (1 + t) / (10 + t)) at update t (0-based).
    # Checkpoints, logging, hosts.
    c.checkpoint_every_steps = 1000  # Also at every epoch end and at the end.
    c.keep_checkpoints = 3  # The latest few; the best by top-1 is kept as well.
    c.log_every_steps = 100
    c.profile_steps = ""  # "START,END": a jax.profiler trace of those steps into tensorboard/.
    c.distributed = False  # jax.distributed.initialize() (multi-host; see README).
    c.distributed_timeout_s = 300  # How long to wait for all processes before giving up.
    c.distributed_heartbeat_s = 30  # A process silent this long is lost: all the others stop
    # (train.py: with one line naming it and the last good checkpoint; JAX's default is 100).
    return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """The ``get_config()`` of the config file ``path`` ("FILE", or "FILE:ARG" to pass ARG, as
    ml_collections' config flags do). Every fault of the file is one ConfigError naming it (and
    the line, when one of its lines raised): missing, failing to load, no ``get_config``,
    ``get_config()`` raising, or returning something that is not a ConfigDict."""
    file, *args = path.split(":", 1)
    if not os.path.isfile(file):
        raise ConfigError(f"config file {file} not found")
    name = f"{os.path.splitext(os.path.basename(file))[0]}_config"
    loader = importlib.machinery.SourceFileLoader(name, file)  # any file name, as ml_collections
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    try:
        sys.modules[name] = module  # as an import does (dataclasses in config files need it)
        loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"config file {_where(file, e)}: {type(e).__name__}: {e}") from e
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(
            f"config file {file} has no get_config(); a config file defines get_config() "
            "returning an ml_collections.ConfigDict (as configs/*.py do)"
        )
    try:
        config = get_config(*args)
    except Exception as e:
        raise ConfigError(
            f"config file {_where(file, e)}: get_config() raised {type(e).__name__}: {e}"
        ) from e
    if not isinstance(config, ml_collections.ConfigDict):
        got = "None" if config is None else f"a {type(config).__name__}"
        raise ConfigError(
            f"config file {file}: get_config() returned {got}, not an ml_collections.ConfigDict "
            "(start from eca_flax.training.config.default_config())"
        )
    return config


def _where(file: str, error: BaseException) -> str:
    """``file``, with the line of it that raised ``error`` (its innermost frame in the file)."""
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__) if f.filename == file]
    return f"{file}, line {lines[-1]}" if lines else file


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes derived from the config and the dataset."""

    num_classes: int
    steps_per_epoch: int
    total_steps: int  # Where the run stops: num_epochs' steps, or num_train_steps if fewer.
    num_eval: int
    batch_size: int
    eval_batch_size: int
    learning_rate: float  # Peak learning rate at this batch size.


def resolve_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks every field and applies the recipe preset; returns a new, locked config."""
    from eca_flax.models import registry  # JAX: only where a run is checked (module docstring)

    c = ml_collections.ConfigDict(config.to_dict())
    unknown = sorted(set(c.keys()) - set(default_config().keys()))
    if unknown:
        raise ConfigError(f"unknown config fields: {', '.join(unknown)}")
    _choice("model", c.model, tuple(registry.list_models()))
    try:
        registry.model_attention(c.model, c.attention)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _choice("dtype", c.dtype, tuple(registry.DTYPES))
    _choice("recipe", c.recipe, tuple(RECIPES))
    c.update(RECIPES[c.recipe])
    _choice("schedule", c.schedule, SCHEDULES)
    for name in POSITIVE_FIELDS:
        if c[name] <= 0:
            raise ConfigError(f"{name} must be positive, got {c[name]}")
    if c.num_train_steps <= 0 and c.num_train_steps != -1:
        raise ConfigError(
            f"num_train_steps must be positive (the step the run stops at) or -1 (no cap: "
            f"num_epochs' schedule), got {c.num_train_steps}"
        )
    for name in RANGES:
        _check_range(name, c[name])
    if c.k_size:
        try:
            registry.resolve_k_size(c.model, c.k_size)
        except ValueError as e:
            raise ConfigError(f"k_size: {e}") from None
    if c.eval_batch_size <= 0:
        c.eval_batch_size = c.batch_size
    if c.augment != "inception_crop" and not re.fullmatch(r"pad_crop:\d+", c.augment):
        raise ConfigError(
            f"augment={c.augment!r}: choose 'inception_crop' or 'pad_crop:N' (N pixels)"
        )
    if c.init_from:
        _resolve_init_from(c)
    if c.eval_only and c.init_from:
        _eval_from_init(c)
    if not c.eval_interpolation:
        c.eval_interpolation = "bilinear"
    _choice("eval_interpolation", c.eval_interpolation, ("bilinear", "bicubic"))
    if c.eval_image_size <= 0:
        c.eval_image_size = c.image_size
    for field in ("image_size", "eval_image_size"):
        try:
            registry.check_input_size(c.model, c[field])
        except ValueError as e:
            raise ConfigError(f"{field}={c[field]}: {e}") from None
    if 0 < c.eval_resize_size < c.eval_image_size:
        raise ConfigError(
            f"eval_resize_size={c.eval_resize_size} is below eval_image_size="
            f"{c.eval_image_size}: the center crop would not fit (-1 gives the original's 256/224 "
            "ratio)"
        )
    if c.ema_warmup and not c.ema_decay:
        raise ConfigError("ema_warmup=True needs an ema_decay > 0")
    _resolve_workers(c)
    _check_procedure(c)
    profile_range(c)
    c.lock()
    return c


def _resolve_workers(c: ml_collections.ConfigDict) -> None:
    """data_threads >= 0; data_workers a count >= 0, or "auto": data.pipeline.auto_workers for
    this process's cores (the count then replaces "auto")."""
    workers = c.data_workers
    if workers == "auto":
        workers = pipeline.auto_workers(len(os.sched_getaffinity(0)))[0]
    if isinstance(workers, str) and workers.strip().isdigit():
        workers = int(workers)
    if isinstance(workers, bool) or not isinstance(workers, int):
        raise ConfigError(f"data_workers must be 'auto' or a count >= 0, got {workers!r}")
    with c.ignore_type():
        c.data_workers = workers
    for name in ("data_threads", "data_workers"):
        if c[name] < 0:
            raise ConfigError(f"{name} must be >= 0, got {c[name]}")


def _resolve_init_from(c: ml_collections.ConfigDict) -> None:
    """A released model's name in init_from becomes its converted file in the cache (fetched,
    checked and converted on first use: ``weights.download.resolve``); paths stay as they are."""
    from eca_flax.weights import download  # here: only a name needs it

    if os.path.exists(os.path.expanduser(c.init_from)):
        return
    try:
        source = download.parse_source(c.init_from)
    except PretrainedError:
        return  # not a name either: build_model names the missing path
    if source.kind != "local":
        c.init_from = str(download.resolve(c.init_from))


def _eval_from_init(c: ml_collections.ConfigDict) -> None:
    """eval_only: the eval fields left at their defaults take init_from's recorded eval
    preprocessing (a converter output of a timm model: test size, crop_pct, bicubic). The
    original's models, workdirs and checkpoints keep the config's."""
    from eca_flax.weights import pretrained  # JAX: only where a run is checked

    path = os.path.expanduser(c.init_from)
    if not (pretrained.is_safetensors(path) or os.path.isfile(os.path.join(path, "model.json"))):
        return
    try:
        meta = pretrained.read_model_json(path)
    except PretrainedError:
        return  # build_model reports it
    if "preprocessing" not in meta:  # the original's models: the config's fields, as always
        return
    settings = eval_settings(meta)
    if c.eval_image_size > 0:
        settings = override_eval(settings, c.eval_image_size)
    c.eval_image_size = settings["image_size"]
    if c.eval_resize_size <= 0:
        c.eval_resize_size = settings["resize_size"]
    if not c.eval_interpolation:
        c.eval_interpolation = settings["interpolation"]


def _check_procedure(c: ml_collections.ConfigDict) -> None:
    """The optimizer, loss and RandAugment fields (the numbers: RANGES)."""
    _choice("optimizer", c.optimizer, OPTIMIZERS)
    _choice("loss", c.loss, LOSSES)
    if not c.bce_target_thresh < 1.0:  # NaN too
        raise ConfigError(f"bce_target_thresh={c.bce_target_thresh} must be < 1 (-1: off)")
    try:
        randaugment.parse(c.randaugment)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_range(name: str, value: Any) -> None:
    """ConfigError unless ``value`` is a finite number within ``RANGES[name]``."""
    low, high, bounds, note = RANGES[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and not (isinstance(value, float) and not math.isfinite(value))
    ok = ok and (low <= value if bounds[0] == "[" else low < value)
    ok = ok and (value <= high if bounds[1] == "]" else value < high)
    if ok:
        return
    if high == math.inf:
        finite = " and finite" if isinstance(value, float) else ""
        rule = f"{'>=' if bounds[0] == '[' else '>'} {low}{finite}"
    else:
        rule = f"in {bounds[0]}{low}, {high}{bounds[1]}"
    raise ConfigError(f"{name} must be {rule}{note}, got {value}")


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choices: {', '.join(map(str, choices))}")


def profile_range(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
    """(first, last) step of ``profile_steps="START,END"``, or None when not profiling."""
    if not config.profile_steps:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", str(config.profile_steps))
    if not m or not 0 < int(m[1]) <= int(m[2]):
        raise ConfigError(
            f"profile_steps={config.profile_steps!r}: give START,END with 1 <= START <= END"
        )
    return int(m[1]), int(m[2])


def make_plan(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Plan:
    """Checks batch sizes against the device count and reads the dataset's sizes."""

    n = mesh.devices.size
    for name in ("batch_size", "eval_batch_size"):
        if config[name] % n:
            raise ConfigError(
                f"{name}={config[name]} is not divisible by the {n} devices; use a multiple of {n}"
            )
    data_dir = config.data_dir or None
    info = data.dataset_info(config.dataset, data_dir)
    num_classes = config.num_classes if config.num_classes > 0 else info.num_classes
    if num_classes < info.num_classes:
        raise ConfigError(
            f"num_classes={num_classes} but {config.dataset} has {info.num_classes} classes"
        )
    if config.eval_only:
        spe = total = 0
    else:
        spe = data.steps_per_epoch(config.dataset, data_dir, config.batch_size)
        total = config.num_epochs * spe  # what the schedule spans (steps.make_schedule)
        if config.num_train_steps > 0:  # a cap: stops early, on that same schedule
            total = min(total, config.num_train_steps)
    lr = config.learning_rate * config.batch_size / config.base_batch_size
    return Plan(
        num_classes, spe, total, info.num_eval, config.batch_size, config.eval_batch_size, lr
    )
