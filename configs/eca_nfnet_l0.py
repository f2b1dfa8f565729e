"""eca_nfnet_l0 (timm's normalization-free ECA network) on ImageNet, with adaptive gradient
clipping.

    python train.py --config configs/eca_nfnet_l0.py --config.data_dir=TFDS_DIR

Mirrors the tag timm/eca_nfnet_l0.ra2_in1k in its resolutions: train 224, test 288 at crop 1.0
(bicubic); its published top-1 is 82.590 at 288 (81.762 at 224), timm's results-imagenet.csv.
The optimisation is eca_flax's ``recipe="nfnet"`` (config.RECIPES: cosine with 5 warmup epochs,
Nesterov SGD, label smoothing 0.1, no weight decay on biases, adaptive gradient clipping at
0.01 with the classifier unclipped), not timm's own ra2 procedure; no result is published for it.
The network has no BatchNorm: checkpoints and the EMA hold parameters only.
"""

import ml_collections

from eca_flax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "eca_nfnet_l0"
    config.recipe = "nfnet"
    config.image_size = 224
    config.eval_image_size = 288
    config.eval_resize_size = 288  # floor(288 / test crop 1.0)
    config.eval_interpolation = "bicubic"
    config.batch_size = 256
    config.num_epochs = 100
    config.weight_decay = 5e-5
    config.ema_decay = 0.9999
    return config
