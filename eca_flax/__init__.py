"""eca_flax: ECA-Net (Efficient Channel Attention, CVPR 2020) in JAX / Flax NNX.

``eca_flax.create_model("eca_resnet50")`` builds a model with the released ECA kernel sizes;
``model.eval()`` then ``model(images)`` maps ImageNet-normalized NHWC images to logits.
``eca_flax.create_model("ecaresnet50t.ra2_in1k", pretrained=True)`` (or ``eca_resnet50``,
``hf-hub:ORG/NAME``) downloads, checks, converts and caches released weights in one call;
``eca_flax.load_pretrained(SOURCE)`` takes the same names or a directory converted by
``convert_torch_weights.py`` or trained by ``train.py``; ``eca_flax.save_pretrained(model, DIR,
...)`` writes one.

The names below are loaded on first use, so that ``import eca_flax.cli.shell`` (what a command
line imports first, to install its hooks before JAX starts) or ``eca_flax.errors`` costs no JAX
import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from eca_flax.errors import Error
from eca_flax.lazy import module_getattr
from eca_flax.version import __version__

_HOMES = {
    "ECA": "eca_flax.models.layers",
    "adaptive_kernel_size": "eca_flax.models.layers",
    "ECAMobileNetV2": "eca_flax.models.mobilenetv2",
    "ECAResNet": "eca_flax.models.resnet",
    "ModelInfo": "eca_flax.models.registry",
    "count_params": "eca_flax.models.registry",
    "create_model": "eca_flax.weights.download",
    "list_models": "eca_flax.models.registry",
    "model_info": "eca_flax.models.registry",
    "resolve_k_size": "eca_flax.models.registry",
    "load_pretrained": "eca_flax.weights.download",
    "save_pretrained": "eca_flax.weights.pretrained",
}

if TYPE_CHECKING:
    from eca_flax.models.layers import ECA, adaptive_kernel_size
    from eca_flax.models.mobilenetv2 import ECAMobileNetV2
    from eca_flax.models.registry import (
        ModelInfo,
        count_params,
        list_models,
        model_info,
        resolve_k_size,
    )
    from eca_flax.models.resnet import ECAResNet
    from eca_flax.weights.download import create_model, load_pretrained
    from eca_flax.weights.pretrained import save_pretrained


__getattr__ = module_getattr(__name__, _HOMES)


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


__all__ = [
    "ECA",
    "ECAMobileNetV2",
    "ECAResNet",
    "Error",
    "ModelInfo",
    "__version__",
    "adaptive_kernel_size",
    "count_params",
    "create_model",
    "list_models",
    "load_pretrained",
    "model_info",
    "resolve_k_size",
    "save_pretrained",
]
