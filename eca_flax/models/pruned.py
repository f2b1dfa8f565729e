"""The released widths of timm's two pruned ECA-ResNets, as data.

Read from timm's pruning specs (huggingface/pytorch-image-models,
timm/models/_pruned/ecaresnet50d_pruned.txt and ecaresnet101d_pruned.txt; from "Knapsack
pruning with inner distillation", arXiv:2002.08258). Per stage: the output channels of every
block (conv3, the shortcut and the ECA layer) and, per block, the output channels of conv1 and
conv2. The stems are unpruned (32, 32, 64); the classifier reads the last stage's width.
"""

from __future__ import annotations

# name -> ((stage output width, ((conv1, conv2) per block)), ... 4 stages)
PRUNED: dict[str, tuple[tuple[int, tuple[tuple[int, int], ...]], ...]] = {
    "ecaresnet50d_pruned": (
        (19, ((47, 18), (52, 22), (64, 35))),
        (171, ((85, 37), (107, 80), (120, 85), (125, 87))),
        (818, ((198, 126), (255, 232), (256, 233), (253, 235), (256, 225), (256, 239))),
        (2022, ((492, 237), (512, 500), (512, 490))),
    ),
    "ecaresnet101d_pruned": (
        (26, ((45, 25), (53, 20), (60, 27))),
        (142, ((81, 24), (93, 49), (102, 54), (122, 78))),
        (278, ((101, 25), (239, 160), (234, 156), (250, 176), (253, 191), (251, 175), (230, 128),
               (244, 154), (244, 159), (238, 97), (244, 149), (253, 181), (245, 119), (255, 216),
               (256, 201), (253, 149), (254, 141), (256, 190), (256, 217), (255, 156), (256, 155),
               (256, 232), (256, 214))),
        (2042, ((499, 289), (512, 512), (512, 502))),
    ),
}  # fmt: skip


def block_widths(name: str) -> tuple[tuple[tuple[int, int, int], ...], ...]:
    """Per stage, per block (conv1, conv2, conv3) output channels of pruned model ``name``."""
    return tuple(tuple((w1, w2, out) for w1, w2 in blocks) for out, blocks in PRUNED[name])
