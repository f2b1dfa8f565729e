"""What a PyTorch state_dict's tensors say about the network they came from: ``ArchSpec`` and
the readings both inferences share (the original's in ``convert``, timm's in ``hub``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from eca_flax.errors import ConversionError


@dataclasses.dataclass(frozen=True)
class ArchSpec:
    """Everything needed to rebuild the network a state_dict came from."""

    arch: str
    k_size: tuple[int, ...]  # per stage (ResNet) or per inverted residual block (MobileNetV2)
    num_classes: int
    attention: str | None  # "eca", "eca_ns", "se" or None (no ECA layers: the plain baseline)

    def describe(self) -> str:
        """E.g. 'eca_resnet50, k=3,5,5,7, 1000 classes'."""
        classes = f"{self.num_classes} classes" if self.num_classes else "backbone (no classifier)"
        if self.attention is None:
            return f"{self.arch} without ECA layers (attention=None, the plain baseline), {classes}"
        if self.attention == "se":
            return f"{self.arch} with SE blocks instead of ECA (attention='se'), {classes}"
        ns = " with non-shared ECA (eca_ns)" if self.attention == "eca_ns" else ""
        if not self.k_size:  # timm's other families: kernels fixed by the channels
            return f"{self.arch}{ns}, {classes}"
        return f"{self.arch}{ns}, k={format_k_size(self.k_size)}, {classes}"


def format_k_size(k_size: Sequence[int]) -> str:
    """'3,5,5,7' for ResNets; MobileNetV2's 17 per-block sizes as runs, '1x10,3x7'."""
    if len(k_size) <= 4:
        return ",".join(map(str, k_size))
    runs: list[list[int]] = []
    for k in k_size:
        if runs and runs[-1][0] == k:
            runs[-1][1] += 1
        else:
            runs.append([k, 1])
    return ",".join(f"{k}x{n}" for k, n in runs)


def eca_kernel(key: str, shape: tuple[int, ...]) -> tuple[str, int]:
    """('eca' | 'eca_ns', k) from an ECA conv weight's shape: (1, 1, k) or (C, 1, k)."""
    if len(shape) != 3 or shape[1] != 1 or shape[2] % 2 == 0:
        raise ConversionError(
            f"{key} has shape {shape}; an ECA kernel is (1, 1, k) (or (C, 1, k) for ECA-NS) "
            "with k odd"
        )
    return ("eca" if shape[0] == 1 else "eca_ns"), shape[2]


def head_classes(sd: Mapping[str, np.ndarray], prefix: str) -> int:
    """The classes of the linear head under ``prefix`` (1000 when it is missing)."""
    for leaf, axis in (("weight", 0), ("bias", 0)):
        value = sd.get(f"{prefix}.{leaf}")
        if value is not None and np.ndim(value) >= 1:
            return int(np.shape(value)[axis])
    return 1000  # no head: load_state_dict reports the missing keys
