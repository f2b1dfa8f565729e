"""training.config: the recipes as they resolve, and the errors that name a bad field."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import jax
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
