"""The trainer behind train.py, one module per concern (read in this order):

- ``config``: every field (``default_config``), the recipes, the checks, the derived ``Plan``.
- ``mesh``: hosts, the device mesh, shardings, host <-> device transfers.
- ``steps``: optimizer (SGD, LAMB), schedule, loss and the jitted train / eval steps (no
  input pipeline); ``mixing``: Mixup / CutMix inside the train step.
- ``lock``: the workdir, created and locked for one run at a time.
- ``checkpoints``: the Orbax manager (checksums, damaged checkpoints set aside, resume checks).
- ``start``: the weights a run starts from (fresh or ``init_from``) and a checkpoint's EMA.
- ``reporting``: log lines, progress bar, TensorBoard scalars, profiler trace.
- ``evaluation``: one pass over the validation split (raw weights and EMA).
- ``loop``: ``train_and_evaluate``, the loop itself, ``eval_only`` and ``evaluate_logits``.

Parallelism is plain data parallelism with XLA SPMD: one ``jax.jit`` over a mesh of every
device of every process, parameters replicated, the batch sharded; BatchNorm statistics are
computed over the global batch.
"""
