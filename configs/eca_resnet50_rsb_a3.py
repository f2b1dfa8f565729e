"""ECA-ResNet-50 with procedure A3 of "ResNet strikes back" (Wightman, Touvron, Jegou 2021).

    python train.py --config configs/eca_resnet50_rsb_a3.py --config.data_dir=TFDS_DIR

The paper (arXiv:2110.00476, Table 1) reports ImageNet top-1 78.1 at 224 for a plain ResNet-50
with A3; nothing is published for ECA-ResNet-50 with it (the original recipe gives 77.42). A3:

    train / test resolution   160 / 224, test crop ratio 0.95 (resize 235 = floor(224 / 0.95))
    epochs, batch             100, 2048
    optimizer                 LAMB, lr 8e-3 (at 2048), weight decay 0.02, cosine, 5 warmup epochs
    loss                      binary cross-entropy (targets thresholded at 0.2), no smoothing
    augmentation              random resized crop, horizontal flip, RandAugment 6 / 0.5
                              (rand-m6-mstd0.5-inc1), Mixup 0.1, CutMix 1.0 (switch 0.5)
    not used by A3            repeated augmentation, stochastic depth, dropout, EMA,
                              gradient clipping (beyond LAMB's own), label smoothing

``recipe="rsb_a3"`` (eca_flax.training.config.RECIPES) sets the optimisation and augmentation;
this file adds the resolutions, batch and epochs. Known differences from the paper's runs: the
network (ECA-ResNet-50, kernel sizes 3,5,5,7, PyTorch's ResNet init; timm's ResNet-50 starts each
block's last BatchNorm scale at 0); BatchNorm statistics over the global batch (timm's default:
per GPU); bilinear resizing throughout (timm: bilinear or bicubic at random when training,
bicubic for the test resize); warmup from 0 and cosine per step; Mixup/CutMix over the global
batch (timm: per GPU). With another ``batch_size`` the learning rate scales linearly
(8e-3 x batch / 2048).
"""

import ml_collections

from eca_flax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "eca_resnet50"
    config.k_size = "3557"
    config.recipe = "rsb_a3"
    config.image_size = 160
    config.eval_image_size = 224
    config.eval_resize_size = 235  # timm: floor(224 / test crop ratio 0.95)
    config.batch_size = 2048
    config.num_epochs = 100
    return config
