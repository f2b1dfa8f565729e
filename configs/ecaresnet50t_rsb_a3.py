"""timm's ecaresnet50t.a3_in1k: ECA-ResNet-50-T with procedure A3 of "ResNet strikes back".

    python train.py --config configs/ecaresnet50t_rsb_a3.py --config.data_dir=TFDS_DIR

timm publishes 79.548 top-1 for these weights (results-imagenet.csv; ResNet-50 A3: 78.052,
SE-ResNet-50 A3: 77.036), trained at 160 px and tested at 224 with crop_pct 0.95 (resize the
shorter side to floor(224 / 0.95) = 235, bicubic). The network is timm's ecaresnet50t (tiered
3x3 stem 24-32-64, avg-down shortcuts, ECA with timm's kernel sizes 5,5,5,7; 25,573,814
parameters); the procedure is ``recipe="rsb_a3"`` (eca_flax.training.config.RECIPES: LAMB 8e-3
per 2048, weight decay 0.02, cosine with 5 warmup epochs, BCE with targets thresholded at 0.2,
RandAugment m6 / 0.5, Mixup 0.1 / CutMix 1.0), 100 epochs at batch 2048. Known differences
from timm's run are those of configs/eca_resnet50_rsb_a3.py (BatchNorm over the global batch,
bilinear train-time resizing, PyTorch's init without zeroed last-BN scales).
"""

import ml_collections

from eca_flax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "ecaresnet50t"
    config.recipe = "rsb_a3"
    config.image_size = 160
    config.eval_image_size = 224
    config.eval_resize_size = 235  # timm: floor(224 / test crop_pct 0.95)
    config.eval_interpolation = "bicubic"  # timm's test resize
    config.batch_size = 2048
    config.num_epochs = 100
    return config
