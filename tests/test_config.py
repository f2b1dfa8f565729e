"""training.config: the recipes as they resolve, and the errors that name a bad field."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import imagenet_fixture
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
        checkpoints.check_resume("w/checkpoints/22", saved, schedule_record(kind, **fields))
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
        checkpoints.check_resume("w/checkpoints/22", saved, schedule_record("cosine", **fields))
    assert set(saved) == set(steps.SCHEDULE_KEYS) <= set(checkpoints.RESUME_KEYS)
