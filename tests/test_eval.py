"""Evaluation through the trainer (train.py's eval_only path) and train.py's error handling.

Real components throughout: the miniature TFDS ImageNet prepared by TFDS's own builder,
checkpoints converted from the PyTorch reference, the PIL pipeline of the original.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import imagenet_fixture
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
import torch
from test_config import load_config
from test_data import pil_eval_reference

import eca_flax
from eca_flax.cli import shell
from eca_flax.models import torch_reference
from eca_flax.training import config as cfg
from eca_flax.training import loop
from eca_flax.training.mesh import make_mesh
from eca_flax.weights import convert, pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    """eca_resnet18 with random weights in PyTorch, converted to a pretrained directory."""
    reference = torch_reference.random_reference("eca_resnet18", 3)
    model = eca_flax.create_model("eca_resnet18")
    convert.load_state_dict(model, torch_reference.numpy_state_dict(reference))
    path = tmp_path_factory.mktemp("converted") / "eca_resnet18"
    pretrained.save_pretrained(model, path, arch="eca_resnet18", attention="eca")
    return str(path), reference


def eval_config(init_from: str, **overrides):
    c = cfg.default_config()
    c.update(
        model="eca_resnet18",
        k_size="",
        dataset="imagenet2012",
        eval_only=True,
        data_dir=imagenet_fixture.shared_mini_imagenet(),
        init_from=init_from,
    )
    c.update(overrides)
    return c


@pytest.mark.fast_compile
@pytest.mark.slow
def test_eval_counts_each_image_once_on_1_and_8_devices(converted, tmp_path) -> None:
    """7 validation images (odd): batch 2 on 1 device, batch 8 / 16 on 8 devices; each image
    is counted exactly once and the metrics are the same, equal to those of the logits."""
    # A head whose bias ranks the val labels first (gaps far above the image-dependent part):
    # every image predicts labels[0], so top-1 = 1/7 and top-5 = 5/7 exactly if each image
    # counts once (a double-counted or unmasked padding image changes both).
    _, reference = converted
    labels = imagenet_fixture.expected_val_labels()
    model = eca_flax.create_model("eca_resnet18")
    state = torch_reference.numpy_state_dict(reference)
    state["fc.weight"] = state["fc.weight"] * 0.01
    state["fc.bias"] = np.zeros(1000, np.float32)
    state["fc.bias"][labels] = 10.0 - np.arange(len(labels))
    convert.load_state_dict(model, state)
    path = tmp_path / "biased"
    pretrained.save_pretrained(model, path, arch="eca_resnet18", attention="eca")

    results = []
    for n, batch in ((1, 2), (8, 8), (8, 16)):
        mesh = make_mesh(jax.devices()[:n])
        config = eval_config(str(path), image_size=64, eval_batch_size=batch)
        run = loop.evaluate_logits(config, str(tmp_path / "w"), mesh=mesh)
        r = run.eval
        assert r.images == imagenet_fixture.NUM_VAL == len(r.logits)
        assert sorted(r.labels.tolist()) == sorted(labels)  # Every image once, none twice.
        assert (r.top1, r.top5) == (1 / 7, 5 / 7)
        top5 = np.argsort(-r.logits, axis=1)[:, :5]
        assert r.top1 == np.mean(r.logits.argmax(1) == r.labels)
        assert r.top5 == np.mean((top5 == r.labels[:, None]).any(1))
        results.append(r)
    for r in results[1:]:
        np.testing.assert_array_equal(r.labels, results[0].labels)
        np.testing.assert_allclose(r.logits, results[0].logits, rtol=1e-5, atol=1e-5)
    assert not (tmp_path / "w").exists(), "eval_only writes nothing to the workdir"


@pytest.mark.slow
def test_eval_only_matches_pytorch_with_pil_pipeline(converted, tmp_path) -> None:
    """The converted checkpoint evaluated by the trainer at 224 px predicts what the PyTorch
    original predicts on the same images through PIL Resize(256) + CenterCrop(224)."""
    path, reference = converted
    run = loop.evaluate_logits(eval_config(path, image_size=224, eval_batch_size=8), str(tmp_path))
    got = run.eval
    # The same images: the bytes TFDS stored, each labelled uniquely in the fixture.
    source = tfds.data_source(
        "imagenet2012",
        split="validation",
        data_dir=imagenet_fixture.shared_mini_imagenet(),
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    by_label = {int(r["label"]): r["image"] for r in (source[i] for i in range(len(source)))}
    images = np.stack([pil_eval_reference(by_label[int(y)]) for y in got.labels])
    with torch.no_grad():
        want = reference(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_array_equal(got.logits.argmax(1), want.argmax(1))
    # Measured: max |diff| ~7e-4 with max |logit| ~2 (TF vs PIL resize and JPEG decode); the
    # smallest top-1/top-2 margin of these images is 0.016.
    np.testing.assert_allclose(got.logits, want, atol=0.005 * np.abs(want).max())
    top1 = np.mean(want.argmax(1) == got.labels)
    assert got.top1 == top1 and got.images == 7


def run_cli(*args: str, cwd=REPO, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=cwd,
        text=True,
        env={
            **os.environ,
            "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


@pytest.mark.slow
def test_cli_errors_are_one_line(converted, tmp_path, capsys) -> None:
    """Bad configs: one 'error:' line naming the problem, exit 1, no traceback, no workdir.

    Four through train.py itself (a flag parsing error, the workdir lock, the distributed
    start, a config check: the process's exit code and stderr); the other config checks
    through train.py's own handler (``shell.run`` around the trainer) in this process, the
    same line and exit code without starting JAX thirteen times."""
    path, _ = converted
    digits = "folder:" + imagenet_fixture.shared_digits_folder(32)
    work = tmp_path / "w"
    base = ["--config", "configs/eca_resnet18.py", "--workdir", str(work)]
    base += [f"--config.dataset={digits}", "--config.image_size=32"]
    (tmp_path / "file").write_text("")
    (tmp_path / "w2").mkdir()
    (tmp_path / "w2" / "checkpoints").write_text("")
    procs = {
        "batch_size=12 is not divisible by the 8 devices": run_cli(*base, "--config.batch_size=12"),
        "error: unknown config field 'batchsize' (did you mean 'batch_size'?); the fields are": (
            run_cli(*base, "--config.batchsize=3")
        ),
        f"--workdir {tmp_path / 'file'} is a file, not a directory": run_cli(
            *base, f"--workdir={tmp_path / 'file'}"
        ),
        "JAX_NUM_PROCESSES='two' is not a whole number": run_cli(
            *base, "--config.distributed=True", JAX_NUM_PROCESSES="two"
        ),
    }
    cases = {
        "unknown model 'resnet50'; choices: eca_resnet18, ": dict(model="resnet50"),
        "unknown dataset 'cifar10'; choose one of: imagenet2012, folder:PATH": dict(
            dataset="cifar10"
        ),
        "holds 'eca_resnet18' but the config's model is 'eca_resnet34'": dict(
            model="eca_resnet34", k_size="", init_from=path, eval_only=True
        ),
        "eval_only: the checkpoint has 1000 classes but folder:": dict(
            init_from=path, eval_only=True
        ),
        "no such directory": dict(init_from=str(tmp_path / "missing")),
        "augment='pad_crop:x': choose 'inception_crop' or 'pad_crop:N'": dict(augment="pad_crop:x"),
        "min_crop_area must be in (0, 1], got 0.0": dict(min_crop_area=0.0),
        "eval_resize_size=16 is below eval_image_size=32": dict(eval_resize_size=16),
        f"{tmp_path / 'w2' / 'checkpoints'} is a file": dict(workdir=tmp_path / "w2"),
    }
    for want, fields in cases.items():
        config = load_config("eca_resnet18")
        config.update(dataset=digits, image_size=32)
        workdir = str(fields.pop("workdir", work))
        config.update(fields)
        capsys.readouterr()
        code = shell.run(functools.partial(loop.train_and_evaluate, config, workdir), where=workdir)
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1, f"{want}: {err}"
        assert err.startswith("error: ") and want in err and "\\" not in err, err
    for want, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, f"{want}: {out}\n{err}"
        last = err.strip().splitlines()[-1]
        assert last.startswith("error: ") and want in last, err
        assert "Traceback" not in err and "\\" not in last  # no escaped repr
    assert not work.exists()
