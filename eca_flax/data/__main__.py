"""``python -m eca_flax.data prepare --data_dir DIR`` | ``digits PATH [--image_size N]`` (progress
lines for large sizes; Ctrl-C or SIGTERM: nothing left behind, exit 130)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from eca_flax.cli import shell
from eca_flax.data import sources


def main(argv: Sequence[str] | None = None) -> int:
    """Prepare TFDS imagenet2012 or write the quick-start digits; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m eca_flax.data", description="Prepare eca_flax's datasets."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser(
        "prepare",
        help="prepare TFDS imagenet2012 (ArrayRecord) from <data_dir>/downloads/manual, or "
        "convert a TFRecord preparation in place (needs TensorFlow)",
    )
    p.add_argument("--data_dir", default=None, help="TFDS data dir (default: TFDS's default)")
    g = sub.add_parser(
        "digits",
        help="write scikit-learn's digits as a folder dataset (progress lines on stderr for "
        "large sizes; Ctrl-C or SIGTERM removes what was written)",
    )
    g.add_argument("path")
    g.add_argument("--image_size", type=int, default=32)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("eca_flax").setLevel(logging.INFO)  # its progress; others' INFO stays out
    if args.command == "prepare":
        return shell.run(lambda: run(args), where=args.command)
    with shell.sigterm_as_ctrl_c():  # the temporary folder is removed, exit 130
        return shell.run(
            lambda: run(args), interrupted="interrupted; nothing written", where=args.command
        )


def run(args: argparse.Namespace) -> None:
    """The command ``args`` name."""
    if args.command == "prepare":
        info = sources.prepare(args.data_dir)
        print(
            f"imagenet2012 ready in {sources.tfds_root(args.data_dir)}: {info.num_train} "
            f"train, {info.num_eval} validation images, {info.num_classes} classes"
        )
    else:
        print(f"folder:{sources.write_digits_folder(args.path, args.image_size)}")


if __name__ == "__main__":
    sys.exit(main())
