"""The PyTorch reference for tests: the architectures live in eca_flax.torch_reference (the
converter's ``--verify`` uses the same code); the test-only helpers to fill them live here."""

from __future__ import annotations

import torch
from torch import nn

from eca_flax.torch_reference import *  # noqa: F403  (build, ECALayer, ECANSLayer, ...)
from eca_flax.torch_reference import ECABasicBlock, ECABottleneck


def randomize(model: nn.Module, seed: int = 0, residual_scale: float = 1.0) -> nn.Module:
    """Random weights and BN statistics, so parity tests exercise every tensor.

    ``residual_scale`` damps each residual branch's last BN weight: ResNet-101/152 with random
    weights otherwise amplify float32 rounding until even PyTorch disagrees with itself.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
                m.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=g)))
            elif isinstance(m, nn.Conv1d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    last_bns = [m.bn3 if hasattr(m, "bn3") else m.bn2 for m in model.modules()
                if isinstance(m, ECABottleneck | ECABasicBlock)]  # fmt: skip
    with torch.no_grad():
        for bn in last_bns:
            bn.weight.mul_(residual_scale)
    return model


def numpy_state_dict(model: nn.Module) -> dict:
    """The state_dict as numpy arrays (what eca_flax.convert.load_state_dict takes)."""
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
