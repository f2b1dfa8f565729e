"""eca_vovnet39b (timm's ECA-VoVNet-39b: One-Shot Aggregation blocks, ECA per stage).

    python train.py --config configs/eca_vovnet39b.py --config.data_dir=TFDS_DIR

timm has no weights for it (tag ``untrained``; its cfg: 224, crop 0.875, bicubic), so no top-1
is published; the nearest published sibling, ese_vovnet39b.ra_in1k (eSE attention instead of
ECA), has 79.312 at 224 and 80.378 at 288 (timm's results-imagenet.csv). The optimisation is
eca_flax's ``recipe="modern"`` (cosine, 5 warmup epochs, Nesterov SGD, label smoothing 0.1, no
weight decay on BatchNorm and biases).
"""

import ml_collections

from eca_flax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "eca_vovnet39b"
    config.recipe = "modern"
    config.image_size = 224
    config.eval_resize_size = 256  # floor(224 / crop 0.875)
    config.eval_interpolation = "bicubic"
    config.batch_size = 256
    config.num_epochs = 100
    return config
