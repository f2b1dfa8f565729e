"""ECA-MobileNetV2 with the original recipe; the paper reports ImageNet top-1 72.56, top-5 90.81.

    python train.py --config configs/eca_mobilenet_v2.py --config.data_dir=TFDS_DIR

SGD momentum 0.9, learning rate 0.045 at batch 96 (stored as learning_rate=0.045 with
base_batch_size=96 and scaled linearly with batch_size), weight decay 4e-5 on every
parameter, 400 epochs, lr = 0.045 * 0.98 ** epoch, plain cross-entropy; random resized crops to
224 and flips; dropout 0.25 before the classifier. ECA kernel size 1 where the block table's
c < 96, else 3 ("13", as released). Add --config.recipe=modern for warmup + cosine, label
smoothing, Nesterov and no decay on BatchNorm/biases. Evaluate the released weights (python
convert_torch_weights.py FILE DIR) with --config.eval_only=True --config.init_from=DIR; expect
top1 about 0.7256.
"""

import ml_collections

from eca_flax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    config = default_config()
    config.model = "eca_mobilenet_v2"
    config.k_size = "13"
    config.batch_size = 96
    config.learning_rate = 0.045
    config.base_batch_size = 96
    config.weight_decay = 4e-5
    config.num_epochs = 400
    config.schedule = "step"
    config.lr_decay_epochs = 1
    config.lr_decay_factor = 0.98
    return config
