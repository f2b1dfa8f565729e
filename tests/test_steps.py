"""training.steps: the schedules are the original's formulas, the optimizer is PyTorch's SGD."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch
from test_config import load_config, small_config

from eca_flax.training import config as cfg
from eca_flax.training import steps


@pytest.mark.parametrize("name", ["eca_resnet18", "eca_resnet50", "eca_resnet152"])
def test_resnet_schedule_is_original_step_decay(name: str) -> None:
    config = cfg.resolve_config(load_config(name))
    spe = 5005  # ImageNet at batch 256 has 5004 steps per epoch; any count works.
    for batch in (256, 1024):
        with config.unlocked():
            config.batch_size = batch
        plan = cfg.Plan(
            1000, spe, 100 * spe, 50000, batch, batch, config.learning_rate * batch / 256
        )
        schedule = steps.make_schedule(config, plan)
        for epoch in range(100):
            want = 0.1 * batch / 256 * 0.1 ** (epoch // 30)  # The original adjust_learning_rate.
            for step in (epoch * spe, epoch * spe + spe - 1):  # First and last step of the epoch.
                np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, err_msg=epoch)


def test_mobilenet_schedule_is_original_exponential_decay() -> None:
    config = cfg.resolve_config(load_config("eca_mobilenet_v2"))
    assert config.batch_size == 96 and config.base_batch_size == 96
    spe = 13346  # ImageNet at batch 96.
    plan = cfg.Plan(1000, spe, 400 * spe, 50000, 96, 96, config.learning_rate)
    schedule = steps.make_schedule(config, plan)
    for epoch in range(400):
        want = 0.045 * 0.98**epoch
        for step in (epoch * spe, epoch * spe + spe - 1):
            np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-5, err_msg=epoch)


@pytest.mark.parametrize("recipe", ["original", "modern"])
def test_optimizer_equals_pytorch_sgd(recipe: str) -> None:
    """optax.chain(add_decayed_weights, sgd) == torch.optim.SGD(momentum, weight_decay)."""
    config = cfg.resolve_config(small_config(recipe=recipe, weight_decay=1e-2))
    lrs = [0.1, 0.1, 0.05, 0.05, 0.01]
    schedule = lambda step: np.asarray(lrs)[step]  # noqa: E731
    tx = steps.make_optimizer(config, schedule)
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(3, 4)).astype(np.float32),
        "bias": rng.normal(size=(4,)).astype(np.float32),
    }
    grads = [
        jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in lrs
    ]

    torch_params = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    groups = [
        {"params": [torch_params["kernel"]]},
        {"params": [torch_params["bias"]], "weight_decay": 0.0 if recipe == "modern" else 1e-2},
    ]
    sgd = torch.optim.SGD(
        groups, lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=recipe == "modern"
    )
    state = tx.init(params)
    for lr, g in zip(lrs, grads):
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
        for group in sgd.param_groups:
            group["lr"] = lr
        for k, p in torch_params.items():
            p.grad = torch.tensor(g[k])
        sgd.step()
    for k, p in torch_params.items():
        np.testing.assert_allclose(params[k], p.detach().numpy(), rtol=1e-5, atol=1e-6)
