"""The CPU train-step fixes one at a time, interleaved in one process with the PyTorch step.

Runs train.py's jitted step (``eca_flax.training.steps.make_train_step``) for the same model
compiled with ``eca_flax.models.cpu_kernels`` switched off (plain ``lax`` convolutions and max-pool:
what XLA does by itself) and on (the default), next to the PyTorch reference's step, and
prints images/s and process CPU seconds per step. XLA flags apply to the whole process, so
compare them by running this twice:

    python benchmarks/cpu_train_ablation.py                       # train.py's XLA flags
    python benchmarks/cpu_train_ablation.py --xla-flags ''        # XLA's defaults
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from eca_flax import benchmark
from eca_flax.cli import xla_flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="eca_resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--xla-flags", default=" ".join(xla_flags.recommended()))
    args = parser.parse_args()
    xla_flags.add(args.xla_flags)
    import jax
    import torch

    import eca_flax
    from eca_flax.models import cpu_kernels

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    print(f"machine: {benchmark.machine_description()}")
    images, labels = benchmark.synthetic_batch(args.batch_size, 224, 1000)
    timers, cpu = [], {}
    for name, kernels in (("lax convolutions", False), ("CPU path", True)):
        step, state, _ = benchmark.train_step_fn(eca_flax.create_model(args.model), 1000)
        batch = {"image": jax.device_put(images), "label": jax.device_put(labels)}
        with cpu_kernels.switch(kernels):  # the switch acts while the step is traced
            step = step.lower(state, batch).compile()
        holder, cpu[name] = {"state": state}, []

        def once(step=step, batch=batch, holder=holder, seconds=cpu[name]) -> None:
            start = time.process_time()
            holder["state"], metrics = step(holder["state"], batch)
            jax.block_until_ready(metrics["loss"])
            seconds.append(time.process_time() - start)

        timers.append(benchmark.Timer(f"eca_flax, {name}", once))
    _, torch_timers = benchmark.build_torch(args.model, images, labels, "cpu", mode="train")
    timers += torch_timers
    print(f"load average {os.getloadavg()[0]:.2f} at start")
    benchmark.interleave(timers, args.repeats, warmup=1, min_sample_s=0.0)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    for t in timers:
        name = t.name.removeprefix("eca_flax, ")
        cpu_s = statistics.median(cpu[name][-args.repeats :]) if name in cpu else float("nan")
        print(
            f"{t.name:32s} {args.batch_size / t.median:6.2f} images/s   "
            f"{cpu_s:5.2f} CPU s per step   (samples: "
            + ", ".join(f"{args.batch_size / s:.2f}" for s in t.samples)
            + ")"
        )


if __name__ == "__main__":
    main()
