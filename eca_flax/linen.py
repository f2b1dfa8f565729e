"""Linen wrapper of the NNX models (through ``flax.nnx.bridge``) for code written with flax.linen.

    net = eca_flax.linen.ECANet("eca_resnet50", num_classes=1000)
    variables = net.init(jax.random.key(0), images)             # {'params', 'batch_stats'}
    logits = net.apply(variables, images)                       # eval: running BN statistics
    logits, updates = net.apply(variables, images, train=True,
                                mutable=["batch_stats"], rngs={"dropout": key})

Variables sit at the same paths as the NNX model's (``params/layer1/0/eca/conv/kernel``), so
weights converted for NNX load into Linen by path.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.core import FrozenDict
from flax.nnx import bridge

from eca_flax.models.registry import create_model


def _forward(module: nnx.Module, x: jax.Array, *, train: bool) -> jax.Array:
    """Run the NNX model in train or eval mode (BatchNorm statistics, dropout)."""
    if train:
        module.train()
    else:
        module.eval()
    return module(x)


class ECANet(nn.Module):
    """A Linen module holding ``eca_flax.create_model(arch, **model_kwargs)``."""

    arch: str
    k_size: Any = None
    num_classes: int = 1000
    attention: str | None = "eca"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        kwargs = FrozenDict(
            k_size=self.k_size if not isinstance(self.k_size, list) else tuple(self.k_size),
            num_classes=self.num_classes,
            attention=self.attention,
            dtype=self.dtype,
        )
        model = bridge.ToLinen(create_model, args=(self.arch,), kwargs=kwargs, name="model")
        return model(x, train=train, nnx_method=_forward)
