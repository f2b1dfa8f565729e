"""Speed of eca_flax models, measured against the PyTorch original in the same process.

    python -m eca_flax.benchmark --models eca_resnet50 --batch-size 16 --mode both --torch

Per model it prints a table: learnable parameters; FLOPs from XLA's cost analysis of the
compiled forward, as GMACs and in the original README's unit (MACs / 1024^3, next to the
README's own figure); compile time; inference and training-step images/s; the buffers XLA
allocates for the compiled program (and the device's peak where the backend reports one). The
training step is ``eca_flax.training.steps.make_train_step``, the jitted step train.py runs (SGD
with momentum 0.9 and weight decay 1e-4, BatchNorm statistics, donated state).

With ``--torch`` the PyTorch reference (``eca_flax.models.torch_reference``) runs the same batch
with as many threads as XLA uses (all cores): inference under ``torch.inference_mode`` in eval
mode, and a train step of forward, cross-entropy, backward and SGD(momentum 0.9, weight decay
1e-4). Runs alternate between the frameworks and the table gives medians after warm-up, so
load from other processes hits both alike; the ratio is eca_flax / PyTorch throughput (> 1:
eca_flax is faster). Every model is also run with ``attention=None`` (the plain network) for
the time and parameters ECA adds; ``--se`` adds the paper's SE baseline (``attention="se"``,
ResNets) for the time and parameters SE adds (ResNet-50: 80 against 2,530,992).
``--dispatch`` shows the per-call cost outside the compiled program at batch 1. XLA flags go in
``--xla-flags`` (or the XLA_FLAGS environment variable); by default the benchmark adds
``eca_flax.cli.xla_flags.recommended()``, the XLA:CPU flags train.py also sets (docs/benchmarks.md).
"""

from eca_flax.benchmark.cli import main, parse_args, run
from eca_flax.benchmark.runs import (
    Result,
    build_jax,
    build_torch,
    inference_fn,
    synthetic_batch,
    train_step_fn,
)
from eca_flax.benchmark.timing import (
    Timer,
    cost_flops,
    interleave,
    machine_description,
)
from eca_flax.training.memory import buffer_bytes

__all__ = [
    "Result",
    "Timer",
    "buffer_bytes",
    "build_jax",
    "build_torch",
    "cost_flops",
    "inference_fn",
    "interleave",
    "machine_description",
    "main",
    "parse_args",
    "run",
    "synthetic_batch",
    "train_step_fn",
]
