"""The trainer behind train.py, one module per concern (read in this order):

- ``config``: every field (``default_config``), the recipes, the checks, the derived ``Plan``.
- ``mesh``: hosts, the device mesh, shardings, host <-> device transfers.
- ``steps``: optimizer (SGD, LAMB), schedule, loss and the jitted train / eval steps (no
  input pipeline); ``mixing``: Mixup / CutMix inside the train step.
- ``checkpoints``: Orbax checkpoints of the train state and the weights a run starts from.
- ``reporting``: log lines, progress bar, TensorBoard scalars, profiler trace.
- ``loop``: ``train_and_evaluate``, the loop itself, and evaluation.

Parallelism is plain data parallelism with XLA SPMD: one ``jax.jit`` over a mesh of every
device of every process, parameters replicated, the batch sharded; BatchNorm statistics are
computed over the global batch.
"""
