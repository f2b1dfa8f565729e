"""training.config: the recipes as they resolve, and the errors that name a bad field."""

from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest

from eca_flax import errors
from eca_flax.training import config as cfg
from eca_flax.training import steps
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
