"""eca_flax: ECA-Net (Efficient Channel Attention, CVPR 2020) in JAX / Flax NNX.

``eca_flax.create_model("eca_resnet50")`` builds a model with the released ECA kernel sizes;
``model.eval()`` then ``model(images)`` maps ImageNet-normalized NHWC images to logits.
``eca_flax.load_pretrained(DIR)`` loads weights converted by ``convert_torch_weights.py``.
"""

from eca_flax.models.layers import ECA, adaptive_kernel_size
from eca_flax.models.mobilenetv2 import ECAMobileNetV2
from eca_flax.models.registry import (
    ModelInfo,
    count_params,
    create_model,
    list_models,
    model_info,
    resolve_k_size,
)
from eca_flax.models.resnet import ECAResNet
from eca_flax.version import __version__  # noqa: F401
from eca_flax.weights.pretrained import load_pretrained

__all__ = [
    "ECA",
    "ECAMobileNetV2",
    "ECAResNet",
    "ModelInfo",
    "adaptive_kernel_size",
    "count_params",
    "create_model",
    "list_models",
    "load_pretrained",
    "model_info",
    "resolve_k_size",
]
