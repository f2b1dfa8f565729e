"""Faults a training run must survive, or report in one line without losing work: damaged
checkpoints (set aside, resume from the newest good one), a full disk, a second run on the
workdir and the locks runs leave behind, a start that fails (the workdir left as it was), a
config file that does not load, resuming with another configuration, a damaged validation image
at an epoch end, Ctrl-C, a coordinator that never answers, and the unraisable echoes of all
these.

Real components: the trainer on a 16-image folder dataset cut from scikit-learn's digits,
train.py as a user runs it, a real full disk (a small tmpfs, tests/faults.py).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import imagenet_fixture
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from faults import free_port, popen_interruptible, run_on_small_disk, trainer_env
from flax import nnx

from eca_flax import errors
from eca_flax.cli import unraisable
from eca_flax.models import registry
from eca_flax.training import checkpoints, evaluation, loop, reporting, steps
from eca_flax.training import config as cfg
from eca_flax.training.lock import LOCK_FILE, WorkdirLock
from eca_flax.training.mesh import make_mesh, replicated
from eca_flax.training.start import build_model
from eca_flax.weights import convert, description, pretrained

pytestmark = pytest.mark.fast_compile  # the trainer's behaviour under faults

REPO = pathlib.Path(__file__).resolve().parents[1]
FIELDS = dict(  # configs/quickstart.py (digits at 16 px) at batch 8: 2 steps per epoch here,
    model="test_eca_resnet",  # the trainer's behaviour is the subject: the smallest ECA-ResNet
    batch_size=8,
    eval_batch_size=8,
    base_batch_size=8,
    learning_rate=0.01,
    log_every_steps=1,
    checkpoint_every_steps=2,
    keep_checkpoints=10,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> pathlib.Path:
    """A folder dataset: 8 + 8 training and 2 + 2 validation digits (16 px), classes 0 and 1."""
    digits = pathlib.Path(imagenet_fixture.shared_digits_folder(16))
    root = tmp_path_factory.mktemp("tiny") / "digits"
    for split, n in (("train", 8), ("val", 2)):
        for label in ("0", "1"):
            (root / split / label).mkdir(parents=True)
            for png in sorted((digits / split / label).iterdir())[:n]:
                shutil.copy(png, root / split / label / png.name)
    return root


def config(dataset: pathlib.Path, **fields):
    """configs/quickstart.py on ``dataset`` with FIELDS and ``fields``."""
    spec = importlib.util.spec_from_file_location("quickstart", REPO / "configs" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.update({"dataset": f"folder:{dataset}", **FIELDS, **fields})
    return c


def train(c, workdir: pathlib.Path) -> loop.RunResult:
    return loop.train_and_evaluate(c, str(workdir), mesh=make_mesh(jax.devices()[:1]))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory) -> pathlib.Path:
    """A finished 10-step run with checkpoints 2, 4, ..., 10 (read-only: copy it to change it)."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    train(config(tiny, num_train_steps=10), workdir)
    return workdir


def weights(path: pathlib.Path) -> dict:
    """The arrays of a pretrained directory, by path."""
    state = nnx.state(pretrained.load_pretrained(path), pretrained.WEIGHTS)
    return description.flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(state)))


def cli(workdir: pathlib.Path, dataset: pathlib.Path, **fields) -> list[str]:
    """train.py's command line for configs/quickstart.py on ``dataset`` with FIELDS."""
    overrides = {"dataset": f"folder:{dataset}", **FIELDS, **fields}
    fields = [f"--config.{k}={v}" for k, v in overrides.items()]
    return [
        sys.executable,
        "train.py",
        "--config",
        "configs/quickstart.py",
        "--workdir",
        str(workdir),
        *fields,
    ]


ENV = trainer_env(devices=1)


# ------------------------------------------------------------------------------------------
# Checkpoints.


@pytest.mark.slow
def test_damaged_checkpoints_are_set_aside_and_the_run_resumes(trained, tiny, tmp_path, capfd):
    """Four damaged latest checkpoints, each in its own way, are reported in one line each,
    moved to checkpoints.damaged/ and the run resumes from the newest good one (written by an
    older eca_flax, without checksums) to exactly the weights of the undamaged run."""
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    root = work / checkpoints.CHECKPOINT_DIR
    (root / "10" / "model" / "manifest.ocdbt").unlink()  # 10: a file of the arrays deleted
    data_file = max((root / "8" / "model").rglob("d/*"), key=lambda p: p.stat().st_size)
    os.truncate(data_file, data_file.stat().st_size // 2)  # 8: a data file cut short
    (root / "6" / "meta" / "metadata").unlink()  # 6: its metadata lost
    shutil.rmtree(root / "4" / "model")  # 4: the arrays of another step. Orbax reads them
    shutil.copytree(root / "2" / "model", root / "4" / "model")  # fine; the checksum does not
    meta = root / "2" / "meta" / "metadata"  # 2: good, from before checksums were recorded
    meta.write_text(
        json.dumps({k: v for k, v in json.loads(meta.read_text()).items() if k != "checksums"})
    )
    capfd.readouterr()

    again = train(config(tiny, num_train_steps=10), work)

    out, err = capfd.readouterr()
    checks = ((10, ""), (8, ""), (6, "unreadable metadata"), (4, "do not match the checksum"))
    for step, why in checks:
        assert re.search(
            rf"checkpoint {root}/{step} is damaged \([^\n]*{why}[^\n]*\): moved "
            rf"to {work}/checkpoints.damaged/{step}-",
            out,
        ), out
    assert f"resuming from {root}/2 (step 2)" in out
    assert sorted(p.name.split("-")[0] for p in (work / checkpoints.DAMAGED_DIR).iterdir()) == [
        "10",
        "4",
        "6",
        "8",
    ]
    assert again.history[0]["step"] == 3 and again.step == 10
    assert "Traceback" not in err and "Event loop is closed" not in err, err
    want, got = weights(trained / "pretrained"), weights(work / "pretrained")
    for key in want:  # a resumed run is deterministic (test_train: resume == uninterrupted)
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-7, err_msg=str(key))
    # init_from takes the checkpoint without checksums as well.
    model, _ = build_model(cfg.resolve_config(config(tiny, init_from=str(root / "2"))), 2)
    assert model.fc.kernel[...].shape == (128, 2)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(batch_size=16), r"batch_size 8 \(checkpoint\) vs 16 \(config\)"),
        (dict(image_size=24, eval_resize_size=24), r"image_size 16 \(checkpoint\) vs 24"),
        (dict(model="eca_resnet34"), r"arch test_eca_resnet \(checkpoint\) vs eca_resnet34"),
        (dict(k_size="3333"), r"k_size \[3, 5, 7, 7\] \(checkpoint\) vs \[3, 3, 3, 3\]"),
        (dict(recipe="rsb_a3"), r"optimizer sgd \(checkpoint\) vs lamb \(config\)"),
        (dict(decay_bn_bias=False), r"optimizer_state crc32:\w+ \(checkpoint\) vs crc32:\w+"),
    ],
)
@pytest.mark.slow
def test_resume_refuses_another_configuration(trained, tiny, fields, message):
    """The step number is the data position: another batch or image size, model or k_size
    cannot continue a workdir, nor another optimizer (its state has another layout, which
    Orbax would otherwise report like damage); one line names both values, nothing is written."""
    before = sorted(p.relative_to(trained) for p in trained.rglob("*"))
    with pytest.raises(
        errors.ConfigError,
        match=f"{trained}/checkpoints/10 was trained with another configuration: {message}",
    ):
        train(config(tiny, num_train_steps=10, **fields), trained)
    assert sorted(p.relative_to(trained) for p in trained.rglob("*")) == before


@pytest.mark.slow
def test_resume_with_another_cap_continues_on_the_schedule(trained, tiny, tmp_path, capfd):
    """Issue 20: ``trained`` stopped at num_train_steps=10 of its 16-step schedule (8 epochs
    of 2 steps). Resumed with 13, steps 11-13 train at the uncapped run's learning rates (the
    cosine squeezed into each cap made them jump: 0.0013 instead of 0.0031 at step 11).
    Resuming with another num_epochs is refused in one line naming both values, nothing
    written."""
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    with pytest.raises(errors.ConfigError) as e:
        train(config(tiny, num_train_steps=13, num_epochs=10), work)
    assert len(str(e.value).splitlines()) == 1
    assert str(e.value).startswith(
        f"{work}/checkpoints/10 was trained with another configuration: num_epochs 8 "
        "(checkpoint) vs 10 (config); "
    )
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
    capfd.readouterr()

    resumed = train(config(tiny, num_train_steps=13), work)

    out = capfd.readouterr().out
    assert f"resuming from {work}/checkpoints/10 (step 10)" in out
    # Issue 31, finding 17: the last line says where the weights are and how to use them.
    assert (
        out.strip()
        .splitlines()[-1]
        .endswith(
            f"final: the trained weights are in {work}/pretrained (python -m eca_flax.predict "
            "--weights DIR IMAGE, or eca_flax.load_pretrained(DIR))"
        )
    ), out
    assert "num_train_steps stops it at step 13 of the schedule's 16 (8 epochs)" in out
    assert [h["step"] for h in resumed.history] == [11, 12, 13] and resumed.step == 13
    uncapped = cfg.resolve_config(config(tiny))
    plan = cfg.make_plan(uncapped, make_mesh(jax.devices()[:1]))
    assert (plan.steps_per_epoch, plan.total_steps) == (2, 16)
    schedule = steps.make_schedule(uncapped, plan)
    # Step s logs the lr of update s - 1, computed under jit; here eagerly. The same float32
    # operations (XLA may fuse them differently: a few roundings), far below rtol 1e-6.
    want = [float(schedule(t)) for t in (10, 11, 12)]
    np.testing.assert_allclose([h["lr"] for h in resumed.history], want, rtol=1e-6)

    # Issue 31, finding 7: step 13 is inside epoch 7; another seed there is refused, nothing
    # written (the checkpoint records its seed).
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    with pytest.raises(errors.ConfigError, match=r"seed 0 \(checkpoint\) vs 1 \(config\)"):
        train(config(tiny, num_train_steps=14, seed=1), work)
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before


@pytest.mark.slow
def test_workdir_lock(tiny, tmp_path, capfd):
    """A workdir in use by a live process is refused in one line naming it; the lock of a
    process that is gone is reported and taken over, and released at the end."""
    lock = tmp_path / LOCK_FILE
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": owner.pid, "since": "x"}))
        with pytest.raises(
            errors.ConfigError,
            match=f"workdir {tmp_path} is in use by pid {owner.pid} on {socket.gethostname()}",
        ):
            train(config(tiny, num_train_steps=1), tmp_path)
        assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]
    finally:
        owner.kill()
        owner.wait()
    with WorkdirLock(str(tmp_path)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"{lock}: left by pid {owner.pid}" in capfd.readouterr().out
    assert not lock.exists()


def test_workdir_locks_left_behind_are_taken_over(tmp_path, capfd):
    """A lock holding this process's own pid (a restarted container: same hostname, same pid)
    and one that cannot be read are reported in one line each and taken over; a live other
    process's lock, and one this process holds, are refused in one line naming the owner."""
    reporting.setup_logging()
    lock, host = tmp_path / LOCK_FILE, socket.gethostname()
    taken_over = {
        "own pid": (
            json.dumps({"host": host, "pid": os.getpid(), "since": "x"}),
            f"{lock}: left by pid {os.getpid()} on {host}, this process's own pid: taking the "
            "workdir over",
        ),
        "garbage": (
            "\x00garbage{",
            f"{lock} is unreadable (not the JSON of a lock): taking the workdir over",
        ),
        "empty": ("", f"{lock} is unreadable (not the JSON of a lock): taking the workdir over"),
        "no pid": (
            json.dumps({"host": host}),
            f"{lock} is unreadable (no host and pid): taking the workdir over",
        ),
    }
    for case, (text, line) in taken_over.items():
        lock.write_text(text)
        capfd.readouterr()
        with WorkdirLock(str(tmp_path)):
            assert json.loads(lock.read_text())["pid"] == os.getpid(), case
            with pytest.raises(  # held by this process: not a lock left behind
                errors.ConfigError, match=f"workdir {tmp_path} is in use by pid {os.getpid()}"
            ):
                WorkdirLock(str(tmp_path)).__enter__()
        logged = [x for x in capfd.readouterr().out.splitlines() if LOCK_FILE in x]
        assert len(logged) == 1 and logged[0].endswith(line), (case, logged)
        assert not lock.exists(), case
    parent = os.getppid()  # alive, and not this process
    lock.write_text(json.dumps({"host": host, "pid": parent, "since": "then"}))
    with pytest.raises(errors.ConfigError) as e:
        WorkdirLock(str(tmp_path)).__enter__()
    assert str(e.value) == (
        f"workdir {tmp_path} is in use by pid {parent} on {host} (since then); wait for that "
        f"run, or delete {lock} if it is gone"
    )
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]


@pytest.mark.slow
def test_failed_start_leaves_the_workdir_as_it_was(trained, tiny, tmp_path):
    """A start that fails (a bad init_from, a bad value, a first batch that cannot be read)
    leaves the workdir as it was found: a new one is not created, an existing one keeps its
    files and gets no config.json, tensorboard/ or empty checkpoints/, and a resumed one keeps
    its config.json and everything else as they were."""
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny, damaged)
    for image in (damaged / "train").rglob("*.png"):
        image.write_text("not an image\n")

    def tree(root: pathlib.Path) -> dict:
        return {str(p.relative_to(root)): p.is_dir() or p.read_bytes() for p in root.rglob("*")}

    new = tmp_path / "new"
    found = tmp_path / "found"
    (found / "notes").mkdir(parents=True)
    (found / "notes" / "todo.txt").write_text("try another seed\n")
    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    bad_starts = [
        (errors.ConfigError, tiny, {"init_from": str(tmp_path / "missing")}),  # a bad init_from
        (errors.ConfigError, tiny, {"momentum": 2.0}),  # a bad value
        (errors.DataError, damaged, {}),  # the first batch
    ]
    for workdir, num_steps in ((new, 6), (found, 6), (resumed, 12)):
        for error, dataset, fields in bad_starts:
            before = tree(workdir) if workdir.exists() else None
            with pytest.raises(error):
                train(config(dataset, num_train_steps=num_steps, **fields), workdir)
            assert (tree(workdir) if workdir.exists() else None) == before, (workdir, fields)


def memory_and_swap(refused: bool = True) -> int | None:
    """This machine's memory and swap in bytes (None where it cannot say); ``refused``: None
    also where Linux would grant any malloc (overcommit_memory 1), so that the figure is what a
    malloc over it is refused at once against."""
    try:
        mode = int(pathlib.Path("/proc/sys/vm/overcommit_memory").read_text())
        lines = pathlib.Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None
    kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines)}
    return None if refused and mode == 1 else 1024 * (kib["MemTotal"] + kib["SwapTotal"])


def write_checkpoint(c, workdir: pathlib.Path) -> None:
    """config.json and a step-0 checkpoint of ``c``'s run, as the trainer writes them: a run of
    this configuration started where it fits, to be resumed here. Its weights are zeros (what
    they are does not matter to a run that stops at its first step; a random ResNet-50 would
    cost 15 s of compiling its initialisers)."""
    c = cfg.resolve_config(c)
    mesh = make_mesh(jax.devices()[:1])
    plan = cfg.make_plan(c, mesh)
    model = registry.empty_model(
        c.model, k_size=c.k_size or None, num_classes=plan.num_classes, attention=c.attention
    )
    for variable in registry.weight_paths(model).values():
        variable.set_value(jnp.zeros(variable.get_value().shape, variable.get_value().dtype))
    source = "random initialisation"
    tx = steps.make_optimizer(c, steps.make_schedule(c, plan))
    state = steps.init_state(model, tx, c.seed, mesh)
    meta = checkpoints.model_meta(model, c, plan.num_classes, state["opt_state"], plan)
    ckpt = checkpoints.Checkpoints(str(workdir), c.keep_checkpoints)
    ckpt.save(state, meta)
    ckpt.close()
    reporting.save_config(str(workdir), c, plan, meta, source)


# The case of issue 20: eca_resnet50 at 2048 px, batch 16, on CPU, a train step whose buffers
# take 92.4 GiB (99205635352 bytes with train.py's XLA flags, jax 0.10.2). Refused from the
# compiled step before it runs, so nothing is allocated whatever the kernel's overcommit policy;
# the test runs where memory and swap are under that.
OUT_OF_MEMORY = dict(
    model="eca_resnet50",
    image_size=2048,
    eval_resize_size=-1,  # configs/eca_resnet50.py's: Resize(2341), CenterCrop(2048)
    augment="inception_crop",
    batch_size=16,
    base_batch_size=16,
)
HOST = memory_and_swap(refused=False)


@pytest.mark.slow
@pytest.mark.skipif(HOST is None or HOST > 90 * 2**30, reason="this machine may have 92 GiB")
def test_out_of_memory_is_one_line_and_leaves_the_workdir_as_it_was(tiny, tmp_path):
    """train.py with a train step that asks for more memory than the machine has (its buffers,
    92 GiB, over memory and swap: found from the compiled step before it runs, so also where
    Linux grants any malloc, overcommit_memory 1, and would kill the process mid-step): one line
    naming the batch, the image size and the bytes asked, and what to lower, exit 1; a new
    workdir is not left behind, an existing one (resumed: its config.json and checkpoint) is
    left exactly as it was."""

    def tree(root: pathlib.Path) -> dict:
        return {str(p.relative_to(root)): p.is_dir() or p.read_bytes() for p in root.rglob("*")}

    resumed = tmp_path / "resumed"
    write_checkpoint(config(tiny, **OUT_OF_MEMORY), resumed)
    before = tree(resumed)
    assert "checkpoints/0/commit_success.txt" in before and "config.json" in before
    line = re.compile(
        r"error: out of memory in the train step: batch 16 of 2048x2048 images asks for "
        r"(\d+\.\d) GiB \((\d+) bytes\); lower --config.batch_size or --config.image_size; "
        r"stopped, the last good checkpoint is (.*)"
    )
    for workdir, last_good in (
        (tmp_path / "new", "none (no checkpoint was saved)"),
        (resumed, f"{resumed}/checkpoints/0"),
    ):
        proc = subprocess.run(
            cli(workdir, tiny, **OUT_OF_MEMORY),
            cwd=REPO,
            env=ENV,
            text=True,
            capture_output=True,
            timeout=600,
        )
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert "Traceback" not in proc.stderr and "RESOURCE_EXHAUSTED" not in proc.stderr
        found = line.fullmatch(proc.stderr.splitlines()[-1])
        assert found, proc.stderr
        gib, asked = found.group(1), int(found.group(2))
        assert asked > HOST and gib == f"{asked / 2**30:.1f}", found.group(0)
        assert found.group(3) == last_good
    assert not (tmp_path / "new").exists()
    assert tree(resumed) == before


@jax.jit
def greedy_eval_step(params, batch_stats, batch: dict) -> dict:
    """An eval step that asks XLA for 373 GiB (a 10^5-fold copy of a 1000x1000 matrix): the
    eval step of a too large eval_batch_size or eval_image_size, which here would need a batch
    of gigabytes to do the same (the eval step asks ~30 bytes per byte of its batch)."""
    huge = jnp.sin(jnp.broadcast_to(params["w"], (100_000, *params["w"].shape)))
    ones = jnp.ones(batch["label"].shape, jnp.float32)
    total = jnp.sum(huge @ jnp.ones(params["w"].shape[-1])) * ones
    return {"top1": total, "top5": total, "count": total, "damaged": jnp.int32(0)}


@pytest.mark.skipif(HOST is None, reason="this machine does not say its memory")
def test_a_step_over_the_host_memory_is_refused_before_it_runs():
    """check_memory compiles a step and compares its buffers with the memory a device has,
    without running it: a program whose result takes a quarter of this host's memory and swap
    passes on one CPU device and is refused on eight (CPU devices share the host's memory)."""
    n = HOST // 16  # float32 elements: HOST / 4 bytes

    for devices, fits in ((1, True), (8, False)):
        mesh = make_mesh(jax.devices()[:devices])
        repl = replicated(mesh)
        grow = jax.jit(lambda x: jnp.broadcast_to(x, (n,)), in_shardings=repl, out_shardings=repl)
        about = dict(step="train", batch_size=8, image_size=32, mesh=mesh)
        if fits:
            steps.check_memory(grow, (jnp.float32(1),), **about)
            continue
        with pytest.raises(errors.OutOfMemory) as e:
            steps.check_memory(grow, (jnp.float32(1),), **about)
        assert e.value.asked >= 4 * n and e.value.devices == 8, e.value


@pytest.mark.skipif(
    (memory_and_swap() or 2**62) > 186 * 2**30, reason="this machine may grant 186 GiB"
)
def test_out_of_memory_in_the_eval_step_is_one_error(tiny):
    """An evaluation whose eval step runs out of memory (refused at once, nothing allocated)
    stops with OutOfMemory: the eval batch, eval image size, the bytes asked, what to lower."""
    c = cfg.resolve_config(config(tiny, eval_batch_size=4))
    mesh = make_mesh(jax.devices()[:1])
    plan = cfg.make_plan(c, mesh)
    state = {"params": {"w": jnp.ones((1000, 1000))}, "batch_stats": {}}
    with pytest.raises(errors.OutOfMemory) as e:
        evaluation.evaluate(greedy_eval_step, state, c, plan, mesh)
    asked = e.value.asked  # the copies' 4e11 bytes and what XLA adds (4.004e11 in jax 0.10.2)
    assert str(e.value) == (
        f"out of memory in the eval step: batch 4 of 16x16 images asks for {asked / 2**30:.1f} "
        f"GiB ({asked} bytes); lower --config.eval_batch_size or --config.eval_image_size"
    )
    assert (e.value.step, e.value.batch_size, e.value.image_size) == ("eval", 4, 16)
    assert asked >= 4 * 10**11


def test_out_of_memory_over_devices_says_per_device():
    """Over 8 devices the batch is split and XLA's ask is one device's; an ask XLA does not
    size is said so."""
    e = errors.OutOfMemory("train", batch_size=256, image_size=224, asked=3 * 2**30, devices=8)
    assert str(e) == (
        "out of memory in the train step: batch 256 (32 per device, 8 devices) of 224x224 images "
        f"asks for 3.0 GiB ({3 * 2**30} bytes) per device; lower --config.batch_size or "
        "--config.image_size"
    )
    e = errors.OutOfMemory("eval", batch_size=64, image_size=320, asked=None)
    assert str(e) == (
        "out of memory in the eval step: batch 64 of 320x320 images asks for more memory than "
        "the device has; lower --config.eval_batch_size or --config.eval_image_size"
    )


@pytest.mark.slow
def test_config_file_faults_are_one_line(tmp_path):
    """train.py with a config file whose get_config() raises, that returns a dict, or that has
    no get_config, and with --config.seed=-1: one line naming the file (the field), exit 1, no
    traceback, no workdir."""
    files = {
        "raises.py": "def get_config():\n    raise RuntimeError('no such recipe')\n",
        "a_dict.py": "def get_config():\n    return {'model': 'eca_resnet18'}\n",
        "no_get_config.py": "import ml_collections\n\nCONFIG = ml_collections.ConfigDict()\n",
    }
    lines = {
        "raises.py": ", line 2: get_config() raised RuntimeError: no such recipe",
        "a_dict.py": ": get_config() returned a dict, not an ml_collections.ConfigDict (start "
        "from eca_flax.training.config.default_config())",
        "no_get_config.py": " has no get_config(); a config file defines get_config() returning "
        "an ml_collections.ConfigDict (as configs/*.py do)",
    }
    popen = dict(cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs = {}
    for name, text in files.items():
        path = tmp_path / name
        path.write_text(text)
        cmd = [sys.executable, "train.py", "--config", str(path), "--workdir", str(tmp_path / "w")]
        procs[f"error: config file {path}{lines[name]}"] = subprocess.Popen(cmd, **popen)
    cmd = [sys.executable, "train.py", "--config", "configs/quickstart.py", "--config.seed=-1"]
    want = "error: seed must be in [0, 9223372036854775807] (2**63 - 1: the seeds numpy and JAX "
    procs[want + "take), got -1"] = subprocess.Popen(
        [*cmd, "--workdir", str(tmp_path / "w")], **popen
    )
    for want, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, f"{want}\n{out}\n{err}"
        assert err.splitlines() == [want], err
    # no workdir; beside the files only Python's own bytecode cache (without
    # PYTHONDONTWRITEBYTECODE, importing a config file writes __pycache__, as ml_collections' does)
    assert sorted(set(os.listdir(tmp_path)) - {"__pycache__"}) == sorted(files)


@pytest.mark.slow
def test_disk_full_while_saving_names_the_last_good_checkpoint(trained, tiny, tmp_path):
    """No space for the second checkpoint: one error line naming the workdir and the last good
    checkpoint, exit 1; the good one is intact and nothing half-written is left."""
    size = sum(p.stat().st_size for p in (trained / "checkpoints" / "2").rglob("*"))
    disk = tmp_path / "disk"
    workdir = disk / "run"
    cmd = cli(workdir, tiny, num_train_steps=6, eval_every_epochs=10)  # 6: the program the
    proc, left = run_on_small_disk(cmd, disk, size * 3 // 2, cwd=REPO, env=ENV)  # Ctrl-C test has
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: no space left on the disk of {workdir} while saving checkpoint 4; the last good "
        f"checkpoint is {workdir}/checkpoints/2: free space and run the same command to resume"
    )
    assert "Traceback" not in proc.stderr and "Task exception" not in proc.stderr, proc.stderr
    assert "./run/checkpoints/2/commit_success.txt" in left
    assert not [p for p in left if "tmp" in p or p.startswith("./run/checkpoints/4")], left


# ------------------------------------------------------------------------------------------
# Data.


@pytest.mark.slow
def test_damaged_validation_image_keeps_the_epoch_checkpoint(tiny, tmp_path):
    """The epoch's checkpoint is saved before its evaluation: a damaged validation image stops
    the run in one line naming the file and that checkpoint; skipping damaged images then
    resumes from it and reports what was skipped (training and validation)."""
    dataset = tmp_path / "digits"
    shutil.copytree(tiny, dataset)
    (dataset / "val" / "1" / "text.jpg").write_text("not an image\n")
    c = config(dataset, num_epochs=2, checkpoint_every_steps=100)
    with pytest.raises(errors.DataError) as error:
        train(c, tmp_path / "run")
    assert str(error.value) == (
        f"{dataset}/val/1/text.jpg: not a decodable image (not an image, or a format PIL does "
        "not know); --config.skip_damaged_images=True skips such files; stopped, the last good "
        f"checkpoint is {tmp_path}/run/checkpoints/2"
    )
    for png in sorted((dataset / "train" / "0").iterdir())[:2]:  # still 16 training files,
        png.write_bytes(b"")  # so both damaged ones are met in each epoch

    result = train(
        config(dataset, num_epochs=2, checkpoint_every_steps=100, skip_damaged_images=True),
        tmp_path / "run",
    )

    assert result.history[0]["step"] == 3
    assert sum(h["damaged"] for h in result.history) == 2
    assert (result.eval.images, result.eval.skipped) == (4, 1)


# ------------------------------------------------------------------------------------------
# Weights files: init_from a .safetensors file, eval_only on a damaged latest checkpoint.


def listing(root: pathlib.Path) -> list[tuple[str, int]]:
    """Every file under ``root`` with its size: what a run must leave as it was."""
    return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def eval_logits(dataset: pathlib.Path, workdir: pathlib.Path, **fields) -> loop.RunResult:
    """eval_only's evaluation with every validation image's logits (writes nothing)."""
    c = config(dataset, **fields)
    return loop.evaluate_logits(c, str(workdir), mesh=make_mesh(jax.devices()[:1]))


@pytest.mark.slow
def test_init_from_a_safetensors_file(trained, tiny, tmp_path, capfd):
    """An eca_flax .safetensors file (save_pretrained's, as convert_torch_weights.py writes) is
    an init_from like a pretrained directory: eval_only gives the directory's logits exactly,
    and training starts from it. A PyTorch state_dict .safetensors is one line naming it.
    Without an EMA, pretrained/ holds the raw weights and there is no pretrained_ema/."""
    raw = pretrained.read_model_json(trained / "pretrained")
    assert raw["weights"] == "raw" and "ema_top1" not in raw
    assert not (trained / "pretrained_ema").exists() and not (trained / "best_ema").exists()
    model = pretrained.load_pretrained(trained / "pretrained")
    file = tmp_path / "m.safetensors"
    pretrained.save_pretrained(model, file, arch="test_eca_resnet", attention="eca")
    capfd.readouterr()

    from_file = eval_logits(tiny, tmp_path / "w", eval_only=True, init_from=str(file))
    out, err = capfd.readouterr()
    described = "(test_eca_resnet, k_size (3, 5, 7, 7))"
    assert f"evaluating test_eca_resnet from {file} {described} on" in out
    from_dir = eval_logits(tiny, tmp_path / "w", init_from=str(trained / "pretrained"))
    # The same weights through the same program on the same images: the same logits.
    np.testing.assert_array_equal(from_file.eval.logits, from_dir.eval.logits)
    assert from_file.eval.summary() == from_dir.eval.summary()
    assert not (tmp_path / "w").exists()

    tuned = train(config(tiny, num_train_steps=2, init_from=str(file)), tmp_path / "ft")
    out, err = capfd.readouterr()
    assert tuned.step == 2 and f"starting from {file} {described}" in out
    assert pretrained.read_model_json(tmp_path / "ft" / "pretrained")["step"] == 2

    torch_file = tmp_path / "torch.safetensors"
    convert.export_torch(trained / "pretrained", torch_file, log=lambda line: None)
    with pytest.raises(
        errors.PretrainedError,
        match=f"^{torch_file}: not an eca_flax model file \\(a PyTorch state_dict, ",
    ):
        train(config(tiny, num_train_steps=2, init_from=str(torch_file)), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
def test_eval_only_falls_back_to_the_newest_good_checkpoint(trained, tiny, tmp_path, capfd):
    """eval_only on a workdir whose two latest checkpoints are damaged (10: its metadata lost,
    8: arrays that do not match their checksum) reports each in one line, evaluates the newest
    good one (6) saying so, and moves or changes nothing; with every checkpoint damaged, one
    error line."""
    work = tmp_path / "run"
    shutil.copytree(trained, work)
    root = work / checkpoints.CHECKPOINT_DIR
    (root / "10" / "meta" / "metadata").unlink()
    shutil.rmtree(root / "8" / "model")
    shutil.copytree(root / "2" / "model", root / "8" / "model")
    before = listing(work)
    capfd.readouterr()

    result = train(config(tiny, eval_only=True), work)

    out, err = capfd.readouterr()
    damaged = [line for line in out.splitlines() if " is damaged " in line]
    instead = f": left in place; reading {root}/6 instead, the newest good one"
    assert len(damaged) == 2, out
    assert re.search(
        rf"checkpoint {root}/10 is damaged \(unreadable metadata .*\){instead}$", damaged[0]
    )
    assert re.search(
        rf"checkpoint {root}/8 is damaged \(.*do not match the checksum.*\){instead}$", damaged[1]
    )
    described = "(test_eca_resnet, k_size (3, 5, 7, 7))"
    assert f"evaluating test_eca_resnet from {root}/6 {described} on" in out
    assert "Traceback" not in err
    assert listing(work) == before  # nothing set aside: eval_only changes no workdir
    # It evaluated checkpoint 6: its logits, not those of the undamaged run's latest (10).
    six = eval_logits(tiny, work, init_from=str(root / "6")).eval
    assert result.eval.summary() == six.summary()
    np.testing.assert_array_equal(eval_logits(tiny, work).eval.logits, six.logits)
    assert not np.array_equal(eval_logits(tiny, trained).eval.logits, six.logits)

    for step in (6, 4, 2):
        (root / str(step) / "meta" / "metadata").unlink()
    before = listing(work)
    with pytest.raises(errors.ConfigError, match=f"^{work}: all 5 checkpoints are damaged"):
        train(config(tiny, eval_only=True), work)
    assert listing(work) == before


# ------------------------------------------------------------------------------------------
# Signals and processes.


def start(cmd: list[str]) -> subprocess.Popen:
    return popen_interruptible(
        cmd, cwd=REPO, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def interrupt_after(proc: subprocess.Popen, pattern: str, times: int = 1) -> tuple[str, str]:
    """SIGINT once ``pattern`` is in the output (again 0.05 s later if times=2); the output."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            for i in range(times):
                time.sleep(0.05 * i)
                proc.send_signal(signal.SIGINT)
            break
    out, err = proc.communicate(timeout=300)
    return "".join(lines) + out, err


def resumes_cleanly(tiny: pathlib.Path, workdir: pathlib.Path) -> None:
    """The next run of ``workdir`` ends its 6 steps with nothing on stderr: no traceback, no
    warning about a half-written step (what an interrupted save left is removed)."""
    proc = start(cli(workdir, tiny, num_train_steps=6))
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "final step=6" in out, out + err
    assert err.strip() == "", err


@pytest.mark.slow
def test_two_ctrl_c_stop_at_once(tiny, tmp_path):
    """Two Ctrl-Cs 0.05 s apart stop at once, without saving (a save in flight is left
    unfinished), naming the last good checkpoint: none; the next run resumes cleanly (what the
    unfinished save left is removed). Two Ctrl-Cs during one step reached Python's handler once
    (it runs when the main thread is back from JAX), so the run saved. Then, now and then (3 of
    6 runs in an earlier session), the second still came too late: it was passed to the main
    thread by _thread.interrupt_main, which does not end a wait the thread is blocked in (the
    save's), so the save finished first; it is now a real SIGINT to that thread. Since, it
    passed in every full suite (stops 34-38, beside a busy core too) and in 8 of 8 runs two at
    a time beside a busy core: no longer an expected failure."""
    workdir = tmp_path / "run"
    proc = start(cli(workdir, tiny, num_train_steps=6))
    out, err = interrupt_after(proc, r"step 1/", times=2)
    assert proc.returncode == 130, out + err
    assert re.fullmatch(
        r"interrupted: stopped at step \d; the last good checkpoint is none \(no checkpoint "
        r"was saved\)",
        err.strip().splitlines()[-1],
    ), err
    assert "Traceback" not in err
    assert checkpoints.finished_steps(str(workdir / "checkpoints")) == []
    resumes_cleanly(tiny, workdir)


@pytest.mark.slow
def test_ctrl_c_saves_and_says_what(tiny, tmp_path):
    """Ctrl-C once: the step in flight finishes, a checkpoint is saved and named, exit 130.
    The next run resumes cleanly. Issue 31, finding 12: the first Ctrl-C was acted on a step
    late (two Ctrl-Cs: test_two_ctrl_c_stop_at_once)."""
    workdir = tmp_path / "run"
    finished = lambda: checkpoints.finished_steps(str(workdir / "checkpoints"))  # noqa: E731

    out, err = interrupt_after(start(cli(workdir, tiny, num_train_steps=6)), r"step 1/")
    saved = re.fullmatch(
        rf"interrupted: saved checkpoint {workdir}/checkpoints/(\d+); run the "
        "same command to resume",
        err.strip().splitlines()[-1],
    )
    assert saved, err
    # Step 1's line comes after step 1's stop check: the step in flight is 2.
    assert saved[1] == "2" and "step 3/" not in out, out
    assert "Traceback" not in err and finished() == [2]

    resumes_cleanly(tiny, workdir)


@pytest.mark.slow
def test_ctrl_c_while_starting_is_one_line(tiny, tmp_path):
    """Ctrl-C while Python loads JAX and the config: one line, exit 130, no traceback. Sent
    once jaxlib's libraries are mapped into the process (JAX loading), not after a fixed delay:
    on a loaded machine Python may still be in its own start-up then, where Ctrl-C ends the
    interpreter before train.py runs."""
    proc = start(cli(tmp_path / "run", tiny, num_train_steps=6))
    maps = pathlib.Path(f"/proc/{proc.pid}/maps")
    end = time.monotonic() + 120
    while proc.poll() is None and "/jaxlib/" not in maps.read_text():
        assert time.monotonic() < end, "train.py did not load jaxlib within 120 s"
        time.sleep(0.01)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert err == "interrupted: before the first training step, no checkpoint written\n"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_coordinator_that_never_answers_ends_in_one_line(tiny, tmp_path):
    """Process 1 of 2 with nobody at the coordinator's address: it says at once what it waits
    for, and ends after distributed_timeout_s with one line naming the address."""
    address = f"127.0.0.1:{free_port()}"
    env = {
        **ENV,
        "JAX_COORDINATOR_ADDRESS": address,
        "JAX_NUM_PROCESSES": "2",
        "JAX_PROCESS_ID": "1",
    }
    began = time.monotonic()
    cmd = cli(tmp_path / "run", tiny, distributed=True, distributed_timeout_s=5)
    proc = subprocess.run(cmd, cwd=REPO, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert time.monotonic() - began < 120  # 5 s of waiting, plus starting Python and JAX
    assert f"process 1 of 2: waiting up to 5 s for all processes at {address}" in proc.stdout
    assert proc.stderr.strip().splitlines() == [
        f"error: process 1 of 2: no answer from {address} within 5 s (distributed_timeout_s); "
        "are all processes started, with the same JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES?"
    ]


def two_processes(workdir: pathlib.Path, dataset: pathlib.Path, fields: list[dict]) -> list:
    """train.py as processes 0 and 1 of a two-process run (``fields[i]``: process i's config
    overrides), on one CPU device each; their (exit status, stdout, stderr)."""
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            cli(workdir, dataset, distributed=True, **fields[i]),
            cwd=REPO,
            env={
                **ENV,
                "JAX_COORDINATOR_ADDRESS": address,
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    ends = [p.communicate(timeout=300) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, ends)]


@pytest.mark.slow
def test_processes_started_with_different_configs_stop(tiny, tmp_path):
    """The issue's case: process 1 with --config.seed=1 beside a seed-0 process 0 trained with
    it and exited 0. Both now stop before anything is written, each with one line naming the
    field and its own value; fields a host may set for itself (data_threads) may differ."""
    work = tmp_path / "run"
    ends = two_processes(work, tiny, [{"data_threads": 2}, {"seed": 1, "data_threads": 1}])
    for i, (code, out, err) in enumerate(ends):
        assert code == 1, out + err
        assert err.strip().splitlines() == [
            f"error: process {i} of 2: the processes were started with different configs: seed "
            f"differ (here seed={i}); start every process with the same config file and "
            "--config flags"
        ]
    assert not work.exists()


# ------------------------------------------------------------------------------------------
# What Python cannot raise: eca_flax.cli.unraisable.


def test_ctrl_c_in_a_gc_callback_is_delivered(monkeypatch):
    """Ctrl-C during a garbage-collector callback (JAX has one) is not lost."""
    monkeypatch.setattr(sys, "unraisablehook", unraisable._hook)
    # Python's own Ctrl-C handler, as in a terminal: a test run in the background (CI, `&`)
    # inherits SIGINT ignored, and an ignored signal is never delivered.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    raised = []

    def callback(phase, info):
        if phase == "start" and not raised:  # once: a later collection must not raise again
            raised.append(phase)
            raise KeyboardInterrupt

    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt):
            gc.collect()
            gc.callbacks.remove(callback)
            time.sleep(2)  # it arrives here
    finally:
        signal.signal(signal.SIGINT, previous)
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)


def test_orbax_echoes_are_dropped_and_the_rest_passed_on(monkeypatch):
    seen = []
    monkeypatch.setattr(unraisable, "_previous", seen.append)
    args = lambda e: types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=None)  # noqa: E731
    unraisable._hook(args(RuntimeError("Event loop is closed")))
    other = ValueError("something else")
    unraisable._hook(args(other))
    assert [a.exc_value for a in seen] == [other]


def test_orbax_preemption_sync_point_warning_is_dropped(caplog, monkeypatch):
    """Issue 31, finding 16: Orbax's "Reached preemption sync point" warning (logged by Orbax
    itself here) is dropped by the command lines' absl filter; other warnings pass."""
    from orbax.checkpoint._src.multihost import multihost

    # Orbax's own record: without the filters a command line run in this process installed.
    monkeypatch.setattr(logging.getLogger("absl"), "filters", [])
    with caplog.at_level(logging.WARNING, logger="absl"):  # predict.main sets absl's to ERROR
        multihost._maybe_log_reached_preemption(7, True)
    [record] = [r for r in caplog.records if "preemption" in r.getMessage()]
    assert not unraisable._quiet_orbax(record)
    other = logging.LogRecord("absl", logging.WARNING, __file__, 1, "a warning", None, None)
    assert unraisable._quiet_orbax(other)


def test_asyncio_echo_of_a_failed_orbax_write_is_dropped():
    """asyncio's "Future exception was never retrieved" for TensorStore's failed write into an
    Orbax checkpoint (a future set from C++: no Python frames, as under a full disk) is an echo
    of the error already reported; another asyncio error is kept."""

    def record(exc: BaseException) -> logging.LogRecord:
        message = (
            f"Future exception was never retrieved\nfuture: <Future finished exception={exc!r}>"
        )
        return logging.LogRecord(
            "asyncio", logging.ERROR, __file__, 1, message, None, (type(exc), exc, None)
        )

    echo = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "layer2.1.bn1.var/0" in OCDBT database at local file '
        '"/d/.dst.tmp/state.orbax-checkpoint-tmp/ocdbt.process_0/": No space left on device'
    )
    assert not unraisable._orbax_task(record(echo))
    assert unraisable._orbax_task(record(ValueError("a user's own future failed")))
