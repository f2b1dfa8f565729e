"""ECA-ResNet-50's convolution shapes, one at a time: XLA:CPU against PyTorch's oneDNN.

Times the forward of single convolutions (NHWC ``lax.conv_general_dilated`` jitted; PyTorch
``F.conv2d`` in NCHW under ``inference_mode``), interleaved in one process with the same
threads, and prints ms per call, GFLOP/s and the ratio PyTorch time / XLA time (above 1: XLA
is faster). XLA flags apply to the whole process, so compare
XLA:CPU's convolution kernels by running it twice:

    python benchmarks/conv_layers.py                 # train.py's flags: Eigen convolutions
    python benchmarks/conv_layers.py --xla-flags ''  # XLA's defaults: YNNPACK convolutions
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from eca_flax.cli import xla_flags

# (name, batch, size, in, out, kernel, stride): the stem and the 3x3 layers of ResNet-50.
SHAPES = [
    ("stem 7x7/2", 16, 224, 3, 64, 7, 2),
    ("3x3 layer1", 16, 56, 64, 64, 3, 1),
    ("3x3/2 layer2[0]", 16, 56, 128, 128, 3, 2),
    ("3x3 layer2", 16, 28, 128, 128, 3, 1),
    ("3x3 layer3", 16, 14, 256, 256, 3, 1),
    ("3x3 layer4", 16, 7, 512, 512, 3, 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--xla-flags", default=" ".join(xla_flags.recommended()))
    args = parser.parse_args()
    xla_flags.add(args.xla_flags)
    import jax
    import numpy as np
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    header = ("layer", "XLA ms", "GFLOP/s", "torch ms", "GFLOP/s", "ratio")
    print("{:16s} {:>8s} {:>8s} {:>9s} {:>8s} {:>6s}".format(*header))
    rng = np.random.default_rng(0)
    for name, n, size, cin, cout, k, s in SHAPES:
        x = rng.standard_normal((n, size, size, cin), np.float32)
        w = rng.standard_normal((k, k, cin, cout), np.float32)
        xla, pt = time_pair(jax, torch, x, w, s, (k - 1) // 2, args.repeats)
        out = (size + 2 * ((k - 1) // 2) - k) // s + 1
        gflop = 2 * n * out * out * k * k * cin * cout / 1e9
        print(
            f"{name:16s} {xla * 1e3:8.2f} {gflop / xla:8.1f} {pt * 1e3:9.2f} {gflop / pt:8.1f} "
            f"{pt / xla:5.2f}x"
        )


def time_pair(jax, torch, x, w, stride: int, pad: int, repeats: int) -> tuple[float, float]:
    """Median seconds per call of the XLA and the PyTorch convolution, calls alternating."""
    conv = jax.jit(
        lambda x, w: jax.lax.conv_general_dilated(
            x,
            w,
            (stride, stride),
            ((pad, pad), (pad, pad)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
    )
    xj, wj = jax.device_put(x), jax.device_put(w)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
    calls = (
        lambda: conv(xj, wj).block_until_ready(),
        lambda: torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad),
    )
    times: tuple[list[float], list[float]] = ([], [])
    with torch.inference_mode():
        for call in calls:
            call(), call()  # warm-up
        for _ in range(repeats):
            for call, samples in zip(calls, times):
                start = time.perf_counter()
                call()
                samples.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


if __name__ == "__main__":
    main()
