"""Convert the authors' PyTorch ECA-Net checkpoints to eca_flax, check them, and export back.

    python convert_torch_weights.py SRC DST [--verify] [--arch NAME] [--k-size 3557]
    python convert_torch_weights.py SRC DST.safetensors
    python convert_torch_weights.py --to-torch DST OUT.pth   (or OUT.safetensors)
    python convert_torch_weights.py eca_resnet50 DST          (a released model by name)

SRC is a released file (eca_resnet50_k3557.pth.tar, ...) or a checkpoint of the original
training script, in torch.save's legacy or zip format or as a safetensors state_dict (what
--to-torch OUT.safetensors writes), with or without 'module.', a Hub folder, or a released
model's name (eca_resnet50, ecaresnet50t.ra2_in1k, hf-hub:ORG/NAME: its original files are
fetched into the cache and checked first, ``eca_flax.weights.download.fetch``). The
architecture, ECA kernel sizes and number of classes are read from the tensors; --arch and
--k-size only confirm them. DST becomes a directory (model.json + Orbax state/) or, for a
name ending in .safetensors, one safetensors file (model.json in its metadata), for
``eca_flax.load_pretrained(DST)``; it is written atomically and never half-written.
--to-torch writes DST's weights as a state_dict the original PyTorch model loads strictly
(torch.load, or safetensors.torch.load_file for OUT.safetensors).

SRC may also be an mmdetection v1 detector (the COCO releases: Faster/Mask R-CNN, RetinaNet):
it converts whole (kind, depth and ECA kernel sizes from the tensors; DST holds model.json and
weights.safetensors for eca_flax.detection.load_detector). With --backbone-only its ECA-ResNet
under 'backbone.' alone becomes a backbone without classifier (stage_features gives C2-C5);
the neck and heads are reported and left out, and --to-torch writes the backbone back under
'backbone.' for a detector to load with strict=False.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from eca_flax.cli import shell  # no JAX: convert() imports it, under shell.run


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Example: python convert_torch_weights.py eca_resnet50_k3557.pth.tar "
        "weights/eca_resnet50 --verify",
    )
    parser.add_argument(
        "src",
        metavar="SRC",
        help=".pth / .pth.tar / .safetensors state_dict, Hub folder, or a released model's name "
        "(DST with --to-torch)",
    )
    dst = "output directory, or a .safetensors file (OUT.pth / OUT.safetensors with --to-torch)"
    parser.add_argument("dst", metavar="DST", help=dst)
    parser.add_argument(
        "--to-torch",
        action="store_true",
        help="export the converted model SRC=DST back to a PyTorch state_dict file",
    )
    parser.add_argument("--arch", help="confirm the architecture (an error if the file differs)")
    parser.add_argument(
        "--k-size",
        metavar="K",
        help="confirm the ECA kernel sizes, e.g. 3557 or 13 (an error if the file differs)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="compare logits with the PyTorch reference on real and random images before "
        "writing (needs torch, tensorflow, scikit-learn); fails above 1e-4 relative",
    )
    parser.add_argument(
        "--backbone-only",
        action="store_true",
        help="of a detector (mmdetection checkpoint), convert only its ECA-ResNet backbone",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="load SRC with full pickle (can run arbitrary code): only for files you trust",
    )
    args = parser.parse_args(argv)
    if args.to_torch:
        flags = ("arch", "k_size", "verify", "allow_unsafe_pickle", "backbone_only")
        used = [f for f in flags if getattr(args, f)]
        if used:
            parser.error(f"--to-torch does not take --{used[0].replace('_', '-')}")
    return args


INTERRUPTED = "interrupted; nothing written"


def released_source(src: str) -> str:
    """SRC itself, or for a released model's name (eca_resnet50, ecaresnet50t.ra2_in1k,
    hf-hub:ORG/NAME) its original files, fetched into the cache and checked."""
    if os.path.exists(os.path.expanduser(src)):
        return src
    from eca_flax.errors import PretrainedError
    from eca_flax.weights import download

    try:
        source = download.parse_source(src)
    except PretrainedError:
        return src  # not a name: the converter names the missing file
    return src if source.kind == "local" else str(download.fetch(src))


def convert(args: argparse.Namespace) -> None:
    """The conversion (or export) ``args`` ask for."""
    from eca_flax.detection.io import convert_detector
    from eca_flax.weights.convert import convert_file, export_torch

    if args.to_torch:
        export_torch(args.src, args.dst, overwrite=args.overwrite)
        return
    if args.allow_unsafe_pickle:
        print(
            f"WARNING: --allow-unsafe-pickle: unpickling {args.src} without restrictions; "
            "a malicious file runs arbitrary code now. Use only files you trust.",
            file=sys.stderr,
        )
    convert_file(
        released_source(args.src),
        args.dst,
        arch=args.arch,
        k_size=args.k_size,
        verify=args.verify,
        overwrite=args.overwrite,
        allow_unsafe_pickle=args.allow_unsafe_pickle,
        detector=None if args.backbone_only else convert_detector,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (0 ok, 1 error, 130 Ctrl-C) instead of raising."""
    args = parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)  # Orbax's progress chatter
    return shell.run(lambda: convert(args), interrupted=INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
