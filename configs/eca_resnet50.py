"""ECA-ResNet-50 with the original recipe; the paper reports ImageNet top-1 77.42, top-5 93.62.

    python train.py --config configs/eca_resnet50.py --config.data_dir=TFDS_DIR

SGD momentum 0.9, learning rate 0.1 per 256 images (scaled linearly with batch_size), weight
decay 1e-4 on every parameter, 100 epochs, lr x0.1 every 30 epochs, plain cross-entropy;
random resized crops to 224 (area 0.08-1) and flips. ECA kernel sizes 3,5,5,7 as released.
Add --config.recipe=modern for warmup + cosine, label smoothing, Nesterov and no decay on
BatchNorm/biases. Evaluate the released weights (python convert_torch_weights.py FILE DIR) with
--config.eval_only=True --config.init_from=DIR; expect top1 about 0.7742.
"""

import ml_collections

from eca_flax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "eca_resnet50"
    config.k_size = "3557"
    return config
