"""training.config: the recipes as they resolve, and the errors that name a bad field."""

from __future__ import annotations

import importlib.util
import math
import pathlib
import sys

import imagenet_fixture
import jax
import numpy as np
import pytest

from eca_flax import errors
from eca_flax.training import checkpoints, steps
from eca_flax.training import config as cfg
from eca_flax.training.mesh import make_mesh

REPO = pathlib.Path(__file__).resolve().parents[1]


def small_config(**overrides):
    """eca_resnet18 at 32 px, global batch 8: a few steps take seconds on CPU."""
    c = cfg.default_config()
    c.model = "eca_resnet18"
    c.image_size = 32
    c.batch_size = 8
    c.eval_batch_size = 24
    c.log_every_steps = 1
    c.checkpoint_every_steps = 1000
    c.update(overrides)
    return c


def load_config(name: str):

    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def test_modern_recipe_warmup_cosine() -> None:
    config = small_config(recipe="modern", num_epochs=20)
    config = cfg.resolve_config(config)
    assert (config.schedule, config.nesterov, config.decay_bn_bias) == ("cosine", True, False)
    assert config.label_smoothing == 0.1 and config.warmup_epochs == 5
    spe = 10
    plan = cfg.Plan(10, spe, 20 * spe, 100, 8, 8, 0.4)
    schedule = steps.make_schedule(config, plan)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(25)), 0.2, rtol=1e-6)  # Halfway through warmup.
    np.testing.assert_allclose(float(schedule(50)), 0.4, rtol=1e-6)  # Peak after 5 epochs.
    np.testing.assert_allclose(float(schedule(125)), 0.2, rtol=1e-5)  # Cosine midpoint.
    assert float(schedule(200)) == pytest.approx(0.0, abs=1e-9)


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(errors.ConfigError, match="unknown model 'eca_resnet17'.*eca_resnet18"):
        cfg.resolve_config(small_config(model="eca_resnet17"))
    with pytest.raises(errors.ConfigError, match="unknown schedule 'linear'.*step, cosine"):
        cfg.resolve_config(small_config(schedule="linear"))
    with pytest.raises(errors.ConfigError, match="k_size"):
        cfg.resolve_config(small_config(k_size="35"))
    assert cfg.resolve_config(small_config(attention="se")).attention == "se"  # the SE baseline
    with pytest.raises(errors.ConfigError, match="unknown attention 'sk'.*eca_ns, se, none"):
        cfg.resolve_config(small_config(attention="sk"))
    with pytest.raises(errors.ConfigError, match="'se' .* ResNets, not eca_mobilenet_v2"):
        cfg.resolve_config(small_config(attention="se", model="eca_mobilenet_v2"))
    config = cfg.resolve_config(small_config(batch_size=12))
    with pytest.raises(errors.ConfigError, match="batch_size=12 is not divisible by the 8"):
        cfg.make_plan(config, make_mesh())


def test_config_file_faults_are_one_line_naming_the_file(tmp_path) -> None:
    """A config file that raises (in get_config() or while loading), has no get_config, or
    returns something other than a ConfigDict: one ConfigError line naming the file (and the
    line that raised); a good file's get_config(ARG) gets "FILE:ARG"'s ARG."""
    files = {
        "raises.py": "def get_config():\n    return 1 / 0\n",
        "a_dict.py": "def get_config():\n    return {'model': 'eca_resnet18'}\n",
        "none.py": "def get_config():\n    pass\n",
        "no_get_config.py": "import ml_collections\n",
        "broken.py": "import ml_collections\nundefined_name\n",
        "syntax.py": "def get_config(:\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    f = lambda name: str(tmp_path / name)
    cases = {
        "raises.py": f"config file {f('raises.py')}, line 2: get_config() raised "
        "ZeroDivisionError: division by zero",
        "a_dict.py": f"config file {f('a_dict.py')}: get_config() returned a dict, not an "
        "ml_collections.ConfigDict (start from eca_flax.training.config.default_config())",
        "none.py": f"config file {f('none.py')}: get_config() returned None, not an",
        "no_get_config.py": f"config file {f('no_get_config.py')} has no get_config(); a config "
        "file defines get_config() returning an ml_collections.ConfigDict",
        "broken.py": f"config file {f('broken.py')}, line 2: NameError: name 'undefined_name' "
        "is not defined",
        "syntax.py": f"config file {f('syntax.py')}: SyntaxError: ",
        "missing.py": f"config file {f('missing.py')} not found",
    }
    for name, want in cases.items():
        with pytest.raises(errors.ConfigError) as e:
            cfg.load_config_file(f(name))
        assert str(e.value).startswith(want) and "\n" not in str(e.value), (name, str(e.value))
    assert not [m for m in sys.modules if m.startswith("broken_config")]  # no half-loaded module
    (tmp_path / "sized.py").write_text(
        "from eca_flax.training.config import default_config\n\n"
        "def get_config(size='32'):\n    c = default_config()\n    c.image_size = int(size)\n"
        "    return c\n"
    )
    assert cfg.load_config_file(f("sized.py")).image_size == 32
    assert cfg.load_config_file(f("sized.py") + ":48").image_size == 48
    assert cfg.load_config_file(str(REPO / "configs" / "quickstart.py")) == load_config(
        "quickstart"
    )


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("learning_rate", float("nan"), "learning_rate must be > 0 and finite, got nan"),
        ("learning_rate", float("inf"), "learning_rate must be > 0 and finite, got inf"),
        ("learning_rate", -1.0, "learning_rate must be > 0 and finite, got -1.0"),
        ("learning_rate", 0.0, "learning_rate must be > 0 and finite, got 0.0"),
        ("momentum", 2.0, "momentum must be in [0, 1), got 2.0"),
        ("momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
        ("momentum", float("nan"), "momentum must be in [0, 1), got nan"),
        ("weight_decay", -1.0, "weight_decay must be >= 0 and finite, got -1.0"),
        ("weight_decay", float("inf"), "weight_decay must be >= 0 and finite, got inf"),
        ("label_smoothing", 1.5, "label_smoothing must be in [0, 1), got 1.5"),
        ("label_smoothing", -0.1, "label_smoothing must be in [0, 1), got -0.1"),
        (
            "seed",
            -1,
            "seed must be in [0, 9223372036854775807] (2**63 - 1: the seeds numpy "
            "and JAX take), got -1",
        ),
        ("seed", 2**63, "seed must be in [0, 9223372036854775807]"),
        ("lr_decay_factor", 0.0, "lr_decay_factor must be in (0, 1], got 0.0"),
        ("lr_decay_epochs", 0, "lr_decay_epochs must be positive, got 0"),
        ("warmup_epochs", -1, "warmup_epochs must be >= 0, got -1"),
        ("mixup_alpha", float("nan"), "mixup_alpha must be >= 0 and finite (0: off), got nan"),
        ("bce_target_thresh", float("nan"), "bce_target_thresh=nan must be < 1 (-1: off)"),
        # Issue 31, finding 6: 0 trained the whole schedule (only -1 means no cap).
        ("num_train_steps", 0, "num_train_steps must be positive (the step the run stops at)"),
        ("num_train_steps", -2, "num_train_steps must be positive (the step the run stops at)"),
    ],
)
def test_numeric_fields_are_checked_before_anything_runs(field, value, message) -> None:
    """Every numeric field is checked by resolve_config, before a model is built or a step
    compiled: one line naming the field and the value."""
    with pytest.raises(errors.ConfigError) as e:
        cfg.resolve_config(small_config(**{field: value}))
    assert str(e.value) == message or str(e.value).startswith(message), str(e.value)


def test_numeric_ranges_are_what_runs() -> None:
    """The edges accepted are ones a run takes: a finite huge learning rate (the NaN-loss test
    trains with 1e30), momentum 0, and the seeds 0 and 2**63 - 1, which the data order (numpy)
    and the initialisation (jax.random.key) take; the first seeds outside are ones they refuse."""
    for fields in ({"learning_rate": 1e30}, {"momentum": 0.0}, {"seed": 2**63 - 1}):
        config = cfg.resolve_config(small_config(**fields))
        assert all(config[k] == v for k, v in fields.items())
    for seed in (0, 2**63 - 1):
        np.random.default_rng([seed, 0]).permutation(4)
        jax.random.key(seed)
    with pytest.raises(ValueError):
        np.random.default_rng([-1, 0])
    with pytest.raises(OverflowError):
        jax.random.key(2**63)


# ------------------------------------------------------------------------------------------
# num_train_steps caps a run on its schedule; resuming keeps the schedule.


def test_num_train_steps_stops_a_run_early_on_the_uncapped_schedule() -> None:
    """Issue 20's case: the quick start (22 steps per epoch, 176 in 8) capped at 22 steps, then
    resumed with 25. The cap only says where the run stops: on every step of a capped run the
    learning rate is the uncapped run's, so steps 23-25 continue from step 22 (before, the
    cosine was squeezed into the cap: lr 0.0005 at step 22, then 0.0035 at step 23)."""
    digits = "folder:" + imagenet_fixture.shared_digits_folder(16)

    def plan_and_schedule(cap: int):
        config = load_config("quickstart")
        config.update(dataset=digits, num_train_steps=cap)
        config = cfg.resolve_config(config)
        plan = cfg.make_plan(config, make_mesh())
        return plan, steps.make_schedule(config, plan)

    runs = {cap: plan_and_schedule(cap) for cap in (-1, 22, 25)}
    full_plan, full = runs[-1]
    assert (full_plan.steps_per_epoch, full_plan.total_steps) == (22, 176)  # "final step=176"
    for cap in (22, 25):
        plan, capped = runs[cap]
        assert plan.total_steps == cap
        # The lr of step s is that of update s - 1: the same function, bit for bit.
        assert [float(capped(t)) for t in range(cap)] == [float(full(t)) for t in range(cap)]
    resumed = runs[25][1]
    # Steps 22-25: 0.1 * (1 + cos(pi * t / 176)) / 2 at updates t = 21..24, 0.0965 to 0.0955.
    # float32 optax against float64 here: a few roundings of values near 0.1, far below rtol
    # 1e-6 (the squeezed schedule gave 0.0035 at step 23, 27 times too low).
    want = [0.05 * (1 + math.cos(math.pi * t / 176)) for t in (21, 22, 23, 24)]
    np.testing.assert_allclose([float(resumed(t)) for t in (21, 22, 23, 24)], want, rtol=1e-6)


def test_warmup_spans_num_epochs_not_the_cap() -> None:
    """A cap inside the warmup stops the run there, on the warmup of the whole run (it used to
    shrink the warmup to the cap)."""
    config = cfg.resolve_config(small_config(recipe="modern", num_epochs=20, num_train_steps=30))
    spe = 10
    capped = steps.make_schedule(config, cfg.Plan(10, spe, 30, 100, 8, 8, 0.4))
    full = steps.make_schedule(config, cfg.Plan(10, spe, 20 * spe, 100, 8, 8, 0.4))
    assert [float(capped(t)) for t in range(30)] == [float(full(t)) for t in range(30)]
    np.testing.assert_allclose(float(capped(25)), 0.2, rtol=1e-6)  # halfway through 50 steps


# The checkpoint's run: the quick start at one steps-per-epoch count, with a cosine or a step
# schedule; each case changes one field on resume and names it with both values.
SCHEDULE_CHANGES = [
    ("cosine", dict(num_epochs=10), "num_epochs 8 (checkpoint) vs 10 (config)"),
    ("cosine", dict(learning_rate=0.2), "learning_rate 0.1 (checkpoint) vs 0.2 (config)"),
    ("cosine", dict(base_batch_size=128), "base_batch_size 64 (checkpoint) vs 128 (config)"),
    ("cosine", dict(warmup_epochs=2), "warmup_epochs 0 (checkpoint) vs 2 (config)"),
    ("cosine", dict(schedule="step"), "schedule cosine (checkpoint) vs step (config)"),
    (
        "cosine",
        dict(recipe="modern"),
        "recipe original (checkpoint) vs modern (config), warmup_epochs 0 (checkpoint) vs 5 "
        "(config)",
    ),
    ("cosine", dict(steps_per_epoch=23), "steps_per_epoch 22 (checkpoint) vs 23 (config)"),
    ("step", dict(lr_decay_epochs=3), "lr_decay_epochs 30 (checkpoint) vs 3 (config)"),
    ("step", dict(lr_decay_factor=0.5), "lr_decay_factor 0.1 (checkpoint) vs 0.5 (config)"),
]


def schedule_record(kind: str, **fields) -> dict:
    """What a checkpoint of the quick start (schedule ``kind``, then ``fields``) records of its
    schedule; ``steps_per_epoch`` stands for a training set of another size."""
    spe = fields.pop("steps_per_epoch", 22)
    config = load_config("quickstart")
    config.update({"schedule": kind, **fields})
    config = cfg.resolve_config(config)
    lr = config.learning_rate * config.batch_size / config.base_batch_size
    plan = cfg.Plan(10, spe, config.num_epochs * spe, 360, 64, 64, lr)  # total_steps: unread
    return steps.schedule_settings(config, plan)


@pytest.mark.parametrize("kind, fields, message", SCHEDULE_CHANGES)
def test_resume_refuses_another_schedule(kind: str, fields: dict, message: str) -> None:
    """Resuming with anything the learning rate of the coming steps depends on is refused in
    one line naming both values, as another batch size is."""
    saved = schedule_record(kind, num_train_steps=22)
    with pytest.raises(errors.ConfigError) as e:
        checkpoints.check_resume("w/checkpoints/22", 22, saved, schedule_record(kind, **fields))
    assert len(str(e.value).splitlines()) == 1
    assert str(e.value).startswith(
        f"w/checkpoints/22 was trained with another configuration: {message}; "
    )
    assert "num_train_steps may change" in str(e.value)


def test_resume_takes_another_num_train_steps() -> None:
    """num_train_steps is the cap only: another one (or none) resumes on the same schedule, as
    does a field the schedule kind ignores."""
    saved = schedule_record("cosine", num_train_steps=22)
    for fields in (dict(num_train_steps=25), dict(num_train_steps=-1), dict(lr_decay_epochs=3)):
        checkpoints.check_resume("w/checkpoints/22", 22, saved, schedule_record("cosine", **fields))
    assert set(saved) == set(steps.SCHEDULE_KEYS) <= set(checkpoints.RESUME_KEYS)


def test_resume_mid_epoch_refuses_another_seed() -> None:
    """Issue 31, finding 7: another seed orders an epoch's images otherwise, so resuming inside
    an epoch with it would train some twice and skip others: refused in one line naming both
    seeds; at an epoch boundary (22 steps per epoch here) the new seed takes over."""
    saved = {**schedule_record("cosine"), "seed": 0}
    other = {**schedule_record("cosine"), "seed": 1}
    with pytest.raises(errors.ConfigError) as e:
        checkpoints.check_resume("w/checkpoints/23", 23, saved, other)
    assert str(e.value).startswith(
        "w/checkpoints/23 was trained with seed 0 (checkpoint) vs 1 (config), and step 23 is "
        "inside epoch 2 (22 steps each): "
    )
    assert "--config.seed=0" in str(e.value) and "\n" not in str(e.value)
    for step in (22, 44):
        checkpoints.check_resume(f"w/checkpoints/{step}", step, saved, other)
    checkpoints.check_resume("w/checkpoints/23", 23, saved, {**other, "seed": 0})
