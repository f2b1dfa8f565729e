"""The released models and the cache, from the command line.

    python -m eca_flax.weights list                  every released model: source, params, top-1,
                                                     whether the cache holds it converted
    python -m eca_flax.weights download NAME [...]   fetch, check, convert and cache (then usable
                                                     offline: create_model(NAME, pretrained=True))

NAME is a timm tag (ecaresnet50t.ra2_in1k, or ecaresnet50t for its first tag), an original model
(eca_resnet50: the authors' file on Google Drive), a COCO detector (mask_rcnn_ecanet50_k3377:
the authors' mmdetection file on Google Drive, converted whole) or hf-hub:ORG/NAME[@REVISION].
``--cache-dir ROOT`` uses ROOT/hub and ROOT/eca_flax instead of the Hugging Face cache.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from eca_flax.cli import shell  # no JAX before shell.run


def show_list(cache_dir: str | None) -> None:
    """One row per released model, as a table."""
    from eca_flax.weights.download import Cache, releases

    rows = [("name", "source", "params", "float32 MB", "published", "cached")]
    for r in releases(cache_dir):
        size = f"{r.params * 4 / 1e6:.0f}"
        cached = "yes" if r.cached else "no"
        rows.append((r.name, r.where, f"{r.params:,}", size, r.published, cached))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    cache = Cache.at(cache_dir)
    print(f"\ncache: {cache.own} (converted, Drive files) and {cache.hub} (Hub files)")


def download(names: Sequence[str], cache_dir: str | None, force: bool) -> None:
    """Fetch and convert each name into the cache, saying where it is."""
    from eca_flax.detection.io import convert_detector
    from eca_flax.weights.download import resolve

    for name in names:
        path = resolve(
            name, cache_dir=cache_dir, force_download=force, log=print, detector=convert_detector
        )
        print(f"{name}: {path}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m eca_flax.weights", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--cache-dir", metavar="ROOT", help="cache root (default: HF_HOME)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the released models and what the cache holds")
    fetch = commands.add_parser("download", help="fetch, check, convert and cache models")
    fetch.add_argument("names", metavar="NAME", nargs="+")
    fetch.add_argument(
        "--force-download", action="store_true", help="fetch and convert again (a damaged cache)"
    )
    args = parser.parse_args(argv)
    logging.getLogger("absl").setLevel(logging.ERROR)
    if args.command == "list":
        return shell.run(lambda: show_list(args.cache_dir))
    return shell.run(lambda: download(args.names, args.cache_dir, args.force_download))


if __name__ == "__main__":
    sys.exit(main())
