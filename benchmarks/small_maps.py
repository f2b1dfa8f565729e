"""3x3 convolutions on maps of 1-4 pixels (ResNet's last stages on 16-64 px images): XLA:CPU's
own convolution, eca_flax's CPU formulation (``cpu_kernels``: matrix products) and PyTorch.

Times, in one process with the same threads, the forward and the gradients (input and weights,
of ``sum(sin(conv))``) of single layers at batch 64, and prints ms per call:

    python benchmarks/small_maps.py
"""

from __future__ import annotations

import argparse
import os
import time

from eca_flax.cli import xla_flags

# (input size, in, out, stride): ECA-ResNet-18's layers 3-4 at 16-64 px, ResNet-50's 3x3 of layer 4.
SHAPES = [
    (4, 128, 256, 2),
    (2, 256, 256, 1),
    (2, 256, 512, 2),
    (1, 512, 512, 1),
    (4, 512, 512, 2),
    (2, 512, 512, 1),
    (3, 512, 512, 1),  # 9 output pixels: above cpu_kernels._SMALL_MAP, XLA's convolution
]


def best_ms(fn, repeats: int, calls: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    xla_flags.use_recommended()
    import jax
    import numpy as np
    import torch

    from eca_flax.models import cpu_kernels

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, batch {args.batch}, ms per call")
    print(
        "| map | in -> out | stride | XLA fwd | eca_flax fwd | torch fwd "
        "| XLA grad | eca_flax grad | torch grad |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for size, cin, cout, s in SHAPES:
        x = rng.standard_normal((args.batch, size, size, cin), np.float32)
        w = 0.05 * rng.standard_normal((3, 3, cin, cout), np.float32)
        xla_f, xla_g = jax_ms(jax.lax.conv_general_dilated, x, w, s, args.repeats)
        ours_f, ours_g = jax_ms(cpu_kernels.conv_general_dilated, x, w, s, args.repeats)
        pt_f, pt_g = torch_ms(torch, x, w, s, args.repeats)
        print(
            f"| {size}x{size} | {cin} -> {cout} | {s} | {xla_f:.2f} | {ours_f:.2f} | "
            f"{pt_f:.2f} | {xla_g:.2f} | {ours_g:.2f} | {pt_g:.2f} |"
        )


def jax_ms(conv, x, w, stride: int, repeats: int) -> tuple[float, float]:
    """ms of ``conv``'s forward and of its gradients (input and weights) of sum(sin(y))."""
    import jax
    import jax.numpy as jnp

    dn = ("NHWC", "HWIO", "NHWC")
    x, w = jnp.asarray(x), jnp.asarray(w)
    f = lambda x, w: conv(x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=dn)
    fwd = jax.jit(f)
    grad = jax.jit(jax.grad(lambda x, w: jnp.sin(f(x, w)).sum(), (0, 1)))
    return (
        best_ms(lambda: jax.block_until_ready(fwd(x, w)), repeats),
        best_ms(lambda: jax.block_until_ready(grad(x, w)), repeats),
    )


def torch_ms(torch, x, w, stride: int, repeats: int) -> tuple[float, float]:
    """The same for PyTorch's ``F.conv2d`` (NCHW; the forward under inference_mode)."""
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    tw = torch.from_numpy(w.transpose(3, 2, 0, 1).copy()).requires_grad_()
    conv = lambda: torch.nn.functional.conv2d(tx, tw, stride=stride, padding=1)

    def forward() -> None:
        with torch.inference_mode():
            conv()

    def gradients() -> None:
        torch.autograd.grad(torch.sin(conv()).sum(), (tx, tw))

    return best_ms(forward, repeats), best_ms(gradients, repeats)


if __name__ == "__main__":
    main()
