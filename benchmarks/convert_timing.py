"""Time convert_torch_weights.py on a file shaped like a released checkpoint (default ResNet-152).

Writes what the original training script saved -- {'epoch', 'arch', 'state_dict' with
'module.' keys, 'best_prec1', 'optimizer' with momentum buffers} in torch.save's legacy
format -- for the PyTorch reference with random weights, then runs the converter command end
to end (a fresh process: imports, reading, conversion, Orbax write), with and without --verify.

    python benchmarks/convert_timing.py [--model eca_resnet152] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from eca_flax.models import torch_reference

REPO = pathlib.Path(__file__).resolve().parent.parent


def write_released_style(name: str, path: pathlib.Path) -> None:
    """The original main.py's checkpoint dict for ``name``, legacy torch.save format."""
    # Random weights with damped residual branches: from-scratch init of ResNet-152 gives
    # logits ~1e3 that --verify rejects.
    model = torch_reference.random_reference(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for p in model.parameters():  # one step, so the optimizer holds momentum buffers
        p.grad = torch.zeros_like(p)
    optimizer.step()
    checkpoint = {
        "epoch": 100,
        "arch": name,
        "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
        "best_prec1": torch.tensor(78.92),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)


def run_converter(src: pathlib.Path, dst: pathlib.Path, *extra: str) -> float:
    """Wall time of one ``python convert_torch_weights.py SRC DST ...`` run."""
    cmd = [sys.executable, str(REPO / "convert_torch_weights.py"), str(src), str(dst), *extra]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="eca_resnet152")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp, f"{args.model}.pth.tar")
        write_released_style(args.model, src)
        size = src.stat().st_size / 2**20
        print(f"{src.name}: {size:.0f} MiB (weights, BN statistics and SGD momentum buffers)")
        print(f"{len(os.sched_getaffinity(0))} CPU cores, load average {os.getloadavg()[0]:.2f}")
        for extra in ((), ("--verify",)):
            times = []
            for i in range(args.repeats):
                times.append(run_converter(src, pathlib.Path(tmp, f"out{len(extra)}_{i}"), *extra))
            label = "convert_torch_weights.py SRC DST " + " ".join(extra)
            runs = ", ".join(f"{t:.1f}" for t in times)
            print(f"{label:45s} median {statistics.median(times):6.1f} s  (runs: {runs})")


if __name__ == "__main__":
    main()
