"""Train or evaluate an ECA-Net: ``python train.py --config configs/X.py [--config.F=V ...]``.

    python train.py --config configs/quickstart.py                   # digits on CPU, minutes
    python train.py --config configs/eca_resnet50.py --config.data_dir=TFDS_DIR
    python train.py --config configs/eca_resnet50.py --config.eval_only=True \\
        --config.init_from=weights/eca_resnet50 --config.data_dir=TFDS_DIR

The workdir (default workdirs/<config name>) receives checkpoints, TensorBoard logs, the
resolved config and the final model; running the same command again resumes from its latest
checkpoint. The trainer is the eca_flax.training package; every config field is listed in
``eca_flax.training.config.default_config()``, and each file in configs/ gives its recipe and
the published top-1 it targets. Problems are reported as one ``error:`` line and exit code 1.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator

from eca_flax.cli import shell, supervise  # no JAX yet: hooks in place before JAX starts

BEFORE_START = "before the first training step, no checkpoint written"
if supervise.is_child():  # a process of a multi-process run: JAX's C++ output to its log
    supervise.to_log()
shell.install()


@contextlib.contextmanager
def loading() -> Iterator[None]:
    """Ctrl-C while Python loads modules (JAX's take seconds) is acted on once they are loaded,
    as one line and exit 130."""
    try:
        with shell.ctrl_c_deferred():
            yield
    except BaseException as e:
        if not shell.by_ctrl_c(e):
            raise
        shell.report(f"interrupted: {BEFORE_START}", e)
        shell.exit_now(130)


with loading():  # what reads the command line and the config file; none of it loads JAX
    from absl import app, flags, logging
    from ml_collections import config_flags

    from eca_flax import errors
    from eca_flax.training.config import load_config_file


class ConfigFile(flags.ArgumentParser):
    """--config FILE read by ``load_config_file``: a fault of the file is one line naming it."""

    def parse(self, argument: str) -> object:
        config = load_config_file(argument)
        config.lock()
        return config

    def flag_type(self) -> str:
        return "config object"


FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
FLAGS["config"].parser = ConfigFile()  # the flag's file parser (its overrides stay config_flags')
flags.DEFINE_string("workdir", None, "Checkpoints and logs (default: workdirs/<config name>).")
flags.mark_flags_as_required(["config"])


def fail(message: object) -> None:
    """One line on stderr (an exception's: ECA_FLAX_TRACEBACK=1 shows its traceback), exit 1."""
    shell.report(shell.error_line(message), message if isinstance(message, Exception) else None)
    sys.exit(1)


def unknown_field(error: AttributeError) -> str:
    """ml_collections' message for --config.FIELD of a field the config lacks, as one line."""
    text = str(error).strip("'\"").replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
    field = re.match(r"'?([\w.]+)'?", text)
    hint = re.search(r'Did you mean "([\w.]+)"', text)
    name = field.group(1) if field else text
    return (
        f"unknown config field {name!r}"
        + (f" (did you mean {hint.group(1)!r}?)" if hint else "")
        + "; the fields are those of eca_flax.training.config.default_config()"
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing; a bad flag, config file or config field is a one-line error."""
    try:
        return FLAGS(argv)
    except flags.Error as e:  # absl's; a ConfigError of ConfigFile (a ValueError) it wraps
        fail(e.__context__ if isinstance(e.__context__, errors.ConfigError) else e)
    except AttributeError as e:  # --config.FIELD=... for a field the config does not have
        fail(unknown_field(e))
    return []


def last_good(workdir: str) -> str | None:
    """The workdir's last good checkpoint (None: none yet), for the line of a process that
    JAX's runtime ended."""
    from eca_flax.training import checkpoints  # the supervisor's, only when a process is lost

    root = os.path.join(workdir, checkpoints.CHECKPOINT_DIR)
    return checkpoints.last_good(root) if checkpoints.finished_steps(root) else None


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:  # Orbax and JAX log much at INFO; -v 0 shows it.
        logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    path = config_flags.get_config_filename(FLAGS["config"]).split(":", 1)[0]
    name = os.path.splitext(os.path.basename(path))[0]
    workdir = FLAGS.workdir or os.path.join("workdirs", name)
    if config.distributed and not supervise.is_child():  # this command again, guarded
        return supervise.run(sys.orig_argv[1:], os.path.abspath(workdir), last_good)
    if supervise.is_child():
        supervise.dumps_to_log()  # absl's app.run enabled faulthandler on the terminal
    with loading():  # a process that trains: JAX, Flax, Orbax (a supervisor needs none of them)
        from eca_flax.cli import xla_flags

        xla_flags.use_recommended()  # XLA:CPU flags measured faster (docs/benchmarks.md); first
        from eca_flax.cli import preemption
        from eca_flax.training import loop, mesh, reporting

    def train() -> None:
        reporting.setup_logging(all_processes=True)
        mesh.initialize_distributed(config)
        stop = preemption.Preemption()
        with stop.outside_the_loop():  # SIGTERM writing digits:N: as Ctrl-C, nothing left
            try:
                loop.train_and_evaluate(config, workdir, stop=stop)
            except errors.Interrupted:
                stop.leave_together()  # exit 130 below skips the interpreter's own shutdown
                raise

    body = supervise.guarded(train) if supervise.is_child() else train
    code = shell.run(body, interrupted=f"interrupted: {BEFORE_START}", where=workdir)
    # Now: after Ctrl-C, finalizing with JAX's threads cut mid-way can crash the interpreter; a
    # process of a multi-process run that failed would wait in jax.distributed's shutdown for
    # the others (up to 5 minutes), which lose it (their heartbeats tell) and stop too.
    if code == 130 or (code and supervise.is_child()):
        shell.exit_now(code)
    return code


if __name__ == "__main__":
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt as e:  # loading the config, starting: outside the shell's run
        shell.report(f"interrupted: {BEFORE_START}", e)
        shell.exit_now(130)
