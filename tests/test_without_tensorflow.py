"""train.py's eval_only on TFDS data, predict and the converter run where TensorFlow cannot be
imported (training: the quick start's test in tests/test_train.py; the benchmark's train mode:
tests/test_benchmark.py). Only preparing TFDS data needs TensorFlow."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import imagenet_fixture
import no_tensorflow
import pytest
import torch
from faults import FAST_COMPILE
from sklearn.datasets import load_sample_images

from eca_flax.models import torch_reference

REPO = pathlib.Path(__file__).resolve().parents[1]
PHOTO = load_sample_images().filenames[1]


def popen(target: str, *args: str, **env: str) -> subprocess.Popen:
    """``no_tensorflow.run`` in the background."""
    return subprocess.Popen(
        [sys.executable, "-c", no_tensorflow.HOOK + no_tensorflow.RUN, target, *args],
        cwd=REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, f"{out}\n{err}"
    assert err.strip().endswith("tensorflow imported: False"), err
    return out, err


@pytest.mark.slow
def test_the_commands_run_without_tensorflow(tmp_path: pathlib.Path) -> None:
    data_dir = imagenet_fixture.shared_mini_imagenet()  # prepared here, with TensorFlow
    src = tmp_path / "eca_resnet18_k3577.pth.tar"
    reference = torch_reference.random_reference("eca_resnet18", 2)
    torch.save({"state_dict": reference.state_dict()}, src, _use_new_zipfile_serialization=False)
    weights = tmp_path / "weights"
    out, _ = finished(popen("convert_torch_weights.py", str(src), str(weights), "--verify"))
    assert re.search(r"verify .*: OK", out) and weights.is_dir()

    # What is imported is the subject, not the numbers: XLA compiles for speed of compiling
    # (faults.FAST_COMPILE). Training on a folder dataset without TensorFlow: the quick start's
    # own test (tests/test_train.py) runs the whole quick start so.
    fast = {"XLA_FLAGS": " ".join([os.environ.get("XLA_FLAGS", ""), *FAST_COMPILE])}
    jobs = {
        "eval": popen(
            "train.py", "--config", "configs/eca_resnet18.py", "--workdir", str(tmp_path / "ev"),
            "--config.eval_only=True", f"--config.init_from={weights}",
            f"--config.data_dir={data_dir}", "--config.image_size=64", "--config.batch_size=8",
            **fast,
        ),
        "predict": popen("eca_flax.predict", "--weights", str(weights), PHOTO, **fast),
    }  # fmt: skip
    outputs = {name: finished(proc)[0] for name, proc in jobs.items()}
    assert re.search(r"eval top1=[0-9.]+ top5=[0-9.]+ images=7$", outputs["eval"].strip())
    assert outputs["predict"].splitlines()[0] == f"{PHOTO}:"
    assert len(outputs["predict"].splitlines()) == 6
