"""Single-file .safetensors weights: convert_torch_weights.py SRC DST.safetensors, load_pretrained
of the file (without Orbax or torch), --to-torch OUT.safetensors for PyTorch, and bad files.

The fixture is a real torch.save file of the PyTorch reference (ECA-ResNet-18 with unusual
kernel sizes and 10 classes, random weights and BatchNorm statistics).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import no_tensorflow
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from safetensors.torch import load_file
from sklearn.datasets import load_sample_images
from test_convert import CLI, assert_error, images, run, torch_logits

import eca_flax
from eca_flax import errors, predict
from eca_flax.models import torch_reference as tr
from eca_flax.weights import pretrained, safetensors_io, verify

SPEC = dict(k_size=(1, 3, 5, 9), num_classes=10)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """The reference model, its bare zip state_dict file, and that file converted by the CLI to
    DST.safetensors under umask 027."""
    model = tr.random_reference("eca_resnet18", 11, **SPEC)
    root = tmp_path_factory.mktemp("safetensors")
    torch.save(model.state_dict(), root / "bare.pth")
    old = os.umask(0o027)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert CLI.main([str(root / "bare.pth"), str(root / "model.safetensors")]) == 0
    finally:
        os.umask(old)
    assert out.getvalue().endswith(f"wrote {root / 'model.safetensors'}\n")
    return model, root / "bare.pth", root / "model.safetensors"


def weights(model) -> dict[tuple, np.ndarray]:
    return {
        p: np.asarray(v.get_value())
        for p, v in eca_flax.models.registry.weight_paths(model).items()
    }


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for path, value in a.items():
        assert value.dtype == b[path].dtype and np.array_equal(value, b[path]), path


def test_convert_to_safetensors_and_back_to_torch(small, tmp_path, capsys):
    ref, src, converted = small
    assert run(capsys, src, tmp_path / "dir")[0] == 0
    back = tmp_path / "back.safetensors"
    old = os.umask(0o027)
    try:
        rc, out, err = run(capsys, "--to-torch", converted, back)
    finally:
        os.umask(old)
    assert rc == 0, err
    assert out.strip() == f"wrote {back}: {len(ref.state_dict())} tensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.safetensors", "dir"]
    # The umask's mode (0o640 under umask 027), not mkstemp's private 0o600.
    assert converted.stat().st_mode & 0o777 == 0o640 and back.stat().st_mode & 0o777 == 0o640

    # One file: Flax paths and layouts, model.json (the directory's, byte for byte) in metadata.
    with safe_open(converted, framework="np") as f:
        metadata = f.metadata()
        assert f.get_slice("layer4/1/eca/conv/kernel").get_shape() == [9, 1, 1]
        assert f.get_slice("fc/kernel").get_shape() == [512, 10]
    assert metadata.keys() == {"format", "model.json"}
    assert metadata["format"] == "eca_flax.pretrained/1"
    assert metadata["model.json"] == (tmp_path / "dir" / "model.json").read_text()
    assert json.loads(metadata["model.json"])["k_size"] == [1, 3, 5, 9]

    # Flax side: the same weights as the Orbax directory, and bit-identical logits.
    from_file = eca_flax.load_pretrained(converted)
    from_dir = eca_flax.load_pretrained(tmp_path / "dir")
    assert_same_weights(weights(from_file), weights(from_dir))
    x = images(2, 48)
    logits = np.asarray(from_file(jnp.asarray(x)))
    np.testing.assert_array_equal(logits, np.asarray(from_dir(jnp.asarray(x))))
    assert verify.compare_logits(torch_logits(ref, x), logits).ok

    # PyTorch side: the original keys, bit-exact tensors, a strict load, the same logits.
    with safe_open(back, framework="np") as f:
        assert f.metadata() == {"format": "pt"}
    exported, original = load_file(back), ref.state_dict()
    assert exported.keys() == original.keys()
    for key, value in original.items():
        if key.endswith("num_batches_tracked"):
            assert exported[key].dtype == torch.int64 and exported[key].ndim == 0
        else:
            assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    fresh = tr.build("eca_resnet18", **SPEC).eval()
    fresh.load_state_dict(exported, strict=True)
    np.testing.assert_array_equal(torch_logits(fresh, x), torch_logits(ref, x))


def test_torch_safetensors_state_dict_converts_back(small, tmp_path, capsys):
    """.pth -> pretrained directory -> --to-torch OUT.safetensors (a PyTorch state_dict) -> that
    file as SRC again: the same weights, bit for bit, and so the same logits; also under a name
    that does not say safetensors (the file's header does)."""
    ref, src, _ = small
    first, torch_file = tmp_path / "first", tmp_path / "torch.safetensors"
    assert run(capsys, src, first)[0] == 0
    assert run(capsys, "--to-torch", first, torch_file)[0] == 0
    renamed = tmp_path / "torch_weights.pth"
    renamed.write_bytes(torch_file.read_bytes())
    x = jnp.asarray(images(2, 48))
    original = eca_flax.load_pretrained(first)
    for source, dst in (
        (torch_file, tmp_path / "again"),
        (renamed, tmp_path / "again.safetensors"),
    ):
        rc, out, err = run(capsys, source, dst)
        assert rc == 0 and "Traceback" not in err, err
        assert out.startswith("eca_resnet18, k=1,3,5,9, 10 classes, ") and out.endswith(
            f"wrote {dst}\n"
        ), out
        meta = pretrained.read_model_json(dst)
        assert meta["source"]["file"] == source.name and meta["k_size"] == [1, 3, 5, 9]
        again = eca_flax.load_pretrained(dst)
        assert_same_weights(weights(again), weights(original))
        # Bit-identical weights through the same jitted program on the same input: equal logits.
        np.testing.assert_array_equal(np.asarray(again(x)), np.asarray(original(x)))
    assert verify.compare_logits(torch_logits(ref, np.asarray(x)), np.asarray(again(x))).ok


def test_save_pretrained_format(small, tmp_path):
    tuned = eca_flax.load_pretrained(small[2], num_classes=3)  # a fine-tuning start: new head
    assert tuned.fc.kernel.shape == (512, 3)
    kw = dict(arch="eca_resnet18", attention="eca")
    pretrained.save_pretrained(tuned, tmp_path / "t.safetensors", format="safetensors", **kw)
    assert_same_weights(
        weights(eca_flax.load_pretrained(tmp_path / "t.safetensors")), weights(tuned)
    )
    assert pretrained.read_model_json(tmp_path / "t.safetensors")["num_classes"] == 3
    for name, fmt in (("t2", "safetensors"), ("t3.safetensors", "orbax"), ("t4", "zip")):
        with pytest.raises(errors.PretrainedError, match=f"format='{fmt}'"):
            pretrained.save_pretrained(tuned, tmp_path / name, format=fmt, **kw)

    # bfloat16 weights are stored as BF16 and come back as float32 holding the same values.
    for var in eca_flax.models.registry.weight_paths(tuned).values():
        var.set_value(var.get_value().astype(jnp.bfloat16))
    pretrained.save_pretrained(tuned, tmp_path / "bf16.safetensors", **kw)
    with safe_open(tmp_path / "bf16.safetensors", framework="np") as f:
        assert f.get_slice("fc/kernel").get_dtype() == "BF16"
    loaded = weights(eca_flax.load_pretrained(tmp_path / "bf16.safetensors"))
    want = {p: v.astype(np.float32) for p, v in weights(tuned).items()}
    assert want["fc", "kernel"].dtype == np.float32
    assert_same_weights(loaded, want)

    # A dtype the format cannot hold: one line, nothing written.
    with pytest.raises(
        errors.PretrainedError,
        match=r"c.safetensors: could not write it "
        r"\(SafetensorError: .*complex128.*\); nothing written$",
    ):
        safetensors_io.write_tensors(
            tmp_path / "c.safetensors",
            {"w": np.zeros(2, np.complex128)},
            {},
            errors.PretrainedError,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16.safetensors", "t.safetensors"]


def test_bad_files_are_one_line(small, tmp_path, capsys):
    _, src, good = small
    data = good.read_bytes()
    out = tmp_path / "out.pth"
    cases = {
        "truncated": data[: len(data) // 2],
        "header_only": data[:4],
        "random": np.random.default_rng(0).bytes(4096),
        "empty": b"",
    }
    for name, content in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        line = assert_error(*run(capsys, "--to-torch", bad, out)[::2], f"{bad}: not a readable")
        assert "truncated or corrupt" in line
        with pytest.raises(errors.PretrainedError, match="not a readable safetensors"):
            eca_flax.load_pretrained(bad)

    # Valid safetensors files that are not eca_flax models.
    save_file({"w": np.zeros(3, np.float32)}, tmp_path / "plain.safetensors")
    assert_error(
        *run(capsys, "--to-torch", tmp_path / "plain.safetensors", out)[::2],
        "not an eca_flax model file (metadata format None",
    )
    torch_file = tmp_path / "torch.safetensors"
    assert run(capsys, "--to-torch", good, torch_file)[0] == 0
    assert_error(*run(capsys, "--to-torch", torch_file, out)[::2], "a PyTorch state_dict")

    # Our metadata, but arrays that do not match it: a missing array, a changed value.
    with safe_open(good, framework="np") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - not a dict
    fewer = {k: v for k, v in tensors.items() if k != "fc/bias"}
    save_file(fewer, tmp_path / "fewer.safetensors", metadata=metadata)
    assert_error(
        *run(capsys, "--to-torch", tmp_path / "fewer.safetensors", out)[::2],
        "the arrays do not match model.json (e.g. fc/bias)",
    )
    tensors["fc/bias"] = tensors["fc/bias"] + np.float32(1)
    save_file(tensors, tmp_path / "changed.safetensors", metadata=metadata)
    assert_error(
        *run(capsys, "--to-torch", tmp_path / "changed.safetensors", out)[::2],
        "do not match the checksum",
    )
    unknown = {**metadata, "model.json": json.dumps({"format": metadata["format"], "arch": "x"})}
    save_file(tensors, tmp_path / "unknown.safetensors", metadata=unknown)
    assert_error(
        *run(capsys, "--to-torch", tmp_path / "unknown.safetensors", out)[::2],
        "(metadata model.json): missing k_size, num_classes, attention",
    )
    assert_error(
        *run(capsys, "--to-torch", tmp_path / "none.safetensors", out)[::2],
        "none.safetensors: no such file",
    )
    assert not out.exists()


def test_existing_destination_file(small, tmp_path, capsys):
    _, src, good = small
    dst = tmp_path / "w.safetensors"
    dst.write_bytes(b"old")
    assert_error(*run(capsys, src, dst)[::2], "already exists", "--overwrite")
    assert_error(*run(capsys, src, dst, "--overwrite", "--arch", "eca_resnet34")[::2], "--arch")
    assert dst.read_bytes() == b"old"  # untouched until a new file is complete
    assert run(capsys, src, dst, "--overwrite")[0] == 0
    assert pretrained.read_model_json(dst) == pretrained.read_model_json(good)  # checksum too
    (tmp_path / "d.safetensors").mkdir()
    assert_error(
        *run(capsys, src, tmp_path / "d.safetensors", "--overwrite")[::2],
        "exists and is not a file",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "w.safetensors"]


SCRIPT = """
import sys
import numpy as np
for name in ("orbax.checkpoint", "torch", "tensorstore"):
    try:
        __import__(name)
        raise SystemExit(f"{name} imported")
    except ModuleNotFoundError:
        pass
import eca_flax
from eca_flax import predict
from eca_flax.weights import pretrained
model = eca_flax.load_pretrained(sys.argv[1])
np.savez(sys.argv[2], **{"/".join(map(str, p)): np.asarray(v.get_value())
                         for p, v in eca_flax.models.registry.weight_paths(model).items()})
predict.main(["--weights", sys.argv[1], "--top", "2", sys.argv[3]])
print("imported:", sorted({m.split(".")[0] for m in sys.modules} & {"orbax", "torch",
      "tensorstore", "tensorflow", "safetensors"}))
"""


@pytest.mark.slow
def test_load_and_predict_without_orbax_or_torch(small, tmp_path):
    photo = load_sample_images().filenames[0]
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            no_tensorflow.hook("orbax", "torch", "tensorstore", "tensorflow") + SCRIPT,
            str(small[2]),
            str(tmp_path / "w.npz"),
            photo,
        ],
        cwd=no_tensorflow.REPO,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{photo}:" and len(lines) == 4
    assert lines[-1] == "imported: ['safetensors']"
    stored = np.load(tmp_path / "w.npz")
    loaded = weights(eca_flax.load_pretrained(small[2]))
    want = {"/".join(map(str, p)): value for p, value in loaded.items()}
    assert sorted(stored.files) == sorted(want)
    for key, value in want.items():
        assert np.array_equal(stored[key], value), key


def test_a_renamed_model_file_is_recognised_by_its_header(small, tmp_path, capsys):
    """Issue 31, finding 15: a converted model file renamed (model.st) was "not a pretrained
    model directory" for predict's --weights (read_model_json, then load_pretrained), while
    the converter told safetensors files by their header; every reader now does
    (description.is_safetensors)."""
    renamed = tmp_path / "model.st"
    shutil.copy(small[2], renamed)
    assert_same_weights(
        weights(eca_flax.load_pretrained(renamed)), weights(eca_flax.load_pretrained(small[2]))
    )
    # predict --weights reads it through the same two calls (read_model_json, load_pretrained).
    assert predict.read_model_json(renamed)["arch"] == "eca_resnet18"
    back = tmp_path / "back.pth"
    assert run(capsys, "--to-torch", renamed, back)[0] == 0
    text = tmp_path / "notes.st"  # not a safetensors header: still a clear line
    text.write_text("hello")
    with pytest.raises(errors.PretrainedError, match="notes.st: not a pretrained model directory"):
        eca_flax.load_pretrained(text)
