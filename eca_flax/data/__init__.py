"""Input pipelines for ECA-Net training and evaluation, without TensorFlow.

- ``sources``: the datasets (TFDS ``imagenet2012`` in ArrayRecord, ``folder:PATH``,
  ``digits:SIZE``) as random-access records, their sizes, and ``prepare``.
- ``transforms``: the original's torchvision transforms on PIL images, in uint8.
- ``randaugment``: timm's RandAugment on PIL images (the "ResNet strikes back" recipes).
- ``pipeline``: deterministic, resumable, per-process train / eval batches on grain.

``python -m eca_flax.data prepare --data_dir DIR`` prepares TFDS imagenet2012 (the one step that
needs TensorFlow); ``python -m eca_flax.data digits PATH`` writes the quick-start digits.
"""

from eca_flax.data.pipeline import eval_iterator, preprocess_for_eval, train_iterator
from eca_flax.data.sources import (
    DATASET_CHOICES,
    IMAGENET,
    DatasetInfo,
    dataset_info,
    prepare,
    steps_per_epoch,
    write_digits_folder,
)
from eca_flax.data.transforms import MEAN_RGB, STD_RGB, default_resize_size

__all__ = [
    "DATASET_CHOICES",
    "IMAGENET",
    "MEAN_RGB",
    "STD_RGB",
    "DatasetInfo",
    "dataset_info",
    "default_resize_size",
    "eval_iterator",
    "preprocess_for_eval",
    "prepare",
    "steps_per_epoch",
    "train_iterator",
    "write_digits_folder",
]
