"""eca_resnext26ts (timm's ECA ByobNet: tiered stem, grouped 3x3s, ECA on the middle width).

    python train.py --config configs/eca_resnext26ts.py --config.data_dir=TFDS_DIR

Mirrors the tag timm/eca_resnext26ts.ch_in1k in its resolutions: train 256, test 288 at crop 1.0
(bicubic); its published top-1 is 78.020 at 288 (77.446 at 256), timm's results-imagenet.csv.
The optimisation is eca_flax's ``recipe="modern"`` (cosine, 5 warmup epochs, Nesterov SGD, label
smoothing 0.1, no weight decay on BatchNorm and biases), not timm's own procedure for the tag.
The same file trains eca_resnet33ts or, at 256 px only, eca_botnext26ts_256 and
eca_halonext26ts (--config.model=...; their attention needs 256, or multiples of 256 for Halo).
"""

import ml_collections

from eca_flax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "eca_resnext26ts"
    config.recipe = "modern"
    config.image_size = 256
    config.eval_image_size = 288
    config.eval_resize_size = 288  # floor(288 / test crop 1.0)
    config.eval_interpolation = "bicubic"
    config.batch_size = 256
    config.num_epochs = 100
    config.weight_decay = 5e-5
    return config
