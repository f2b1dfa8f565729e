"""convert_torch_weights.py end to end, on checkpoints written the way the original did.

Fixtures are the PyTorch reference models with random weights and BatchNorm statistics, saved
as the released files were: torch.save's legacy format, storages tagged 'cuda:0', the full
training dict ('epoch', 'arch' = 'se_resnet50' as in the release, 'state_dict' with
'module.', 'best_prec1' as a 0-dim tensor, a real SGD 'optimizer' state).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import pickle
import pickletools
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from faults import popen_interruptible, run_on_small_disk
from flax import nnx

import eca_flax
from eca_flax import errors
from eca_flax.models import torch_reference as tr
from eca_flax.weights import convert, description, pretrained, pth, verify

ROOT = Path(__file__).resolve().parents[1]
NAMES = eca_flax.list_models("ECA-Net")  # the original release (timm's: tests/test_timm.py)


def _load_cli():
    spec = importlib.util.spec_from_file_location(
        "convert_torch_weights", ROOT / "convert_torch_weights.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CLI = _load_cli()


def run(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in-process: exit status, stdout, stderr."""
    rc = CLI.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_error(rc: int, err: str, *fragments: str) -> str:
    """A failed run: status 1 and one 'error: ...' line on stderr holding every fragment."""
    assert rc == 1
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def retag_storages_cuda(path: Path) -> None:
    """Rewrite a legacy torch.save file's storage locations 'cpu' -> 'cuda:0', byte for byte
    what PyTorch 1.x on a GPU writes (the released files were saved from GPU models)."""
    data = path.read_bytes()
    stream = io.BytesIO(data)
    for _ in range(3):  # magic number, protocol version, system info
        pickle.load(stream)
    start = stream.tell()
    out = bytearray(data[:start])
    ops = list(pickletools.genops(data[start:]))  # the main pickle, up to its STOP
    end = start + ops[-1][2] + 1
    for (op, arg, pos), nxt in zip(ops, [*ops[1:], (None, None, end - start)]):
        if op.name == "BINUNICODE" and arg == "cpu":
            encoded = b"cuda:0"
            out += b"X" + len(encoded).to_bytes(4, "little") + encoded
        else:
            out += data[start + pos : start + nxt[2]]
    path.write_bytes(bytes(out) + data[end:])


def storage_locations(path: Path) -> set[str]:
    """The device tags of a torch file's storages."""
    seen: set[str] = set()

    def record(storage, location):
        seen.add(location)
        return storage

    torch.load(path, map_location=record, weights_only=True)
    return seen


def save_released(model: torch.nn.Module, path: Path, *, momentum: bool = False) -> None:
    """torch.save the training dict as the original main.py did (legacy format, cuda tags)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    if momentum:  # a real step, so the optimizer state holds momentum buffers
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
    checkpoint = {
        "epoch": 100,
        "arch": "se_resnet50",  # what the released ResNet-50 file says
        "state_dict": {"module." + k: v for k, v in model.state_dict().items()},
        "best_prec1": torch.tensor(77.42),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    retag_storages_cuda(path)


def reference(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    return tr.random_reference(name, seed, **kw)


def torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


def images(n: int = 2, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """All six architectures as released-format files, with their PyTorch models."""
    root = tmp_path_factory.mktemp("released")
    files = {}
    for i, name in enumerate(NAMES):
        model = reference(name, seed=i)
        info = eca_flax.model_info(name)
        path = root / info.checkpoint
        save_released(model, path, momentum=name in ("eca_resnet18", "eca_mobilenet_v2"))
        files[name] = (path, model)
    return files


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, torch.Tensor], Path]:
    """ECA-ResNet-18 with unusual kernel sizes and 10 classes, as a bare zip state_dict."""
    model = reference("eca_resnet18", seed=7, k_size=(1, 3, 5, 9), num_classes=10)
    path = tmp_path_factory.mktemp("small") / "bare.pth"
    torch.save(model.state_dict(), path)
    return model, model.state_dict(), path


def write(path: Path, state: dict, *, legacy: bool = False) -> Path:
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return path


def k_text(name: str) -> str:
    return convert.format_k_size(eca_flax.resolve_k_size(name))


# ------------------------------------------------------------------------------------------
# The six released formats: convert, compare logits, export back.


def test_fixture_is_released_format(released):
    path, _ = released["eca_resnet50"]
    assert path.read_bytes()[:2] == b"\x80\x02"  # a legacy (pickle) file, not a zip
    assert storage_locations(path) == {"cuda:0"}
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["arch"] == "se_resnet50" and raw["best_prec1"].ndim == 0
    assert all(k.startswith("module.") for k in raw["state_dict"])
    momentum = torch.load(released["eca_resnet18"][0], map_location="cpu", weights_only=True)
    assert len(momentum["optimizer"]["state"]) == len(
        list(released["eca_resnet18"][1].parameters())
    )


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[] if n == "eca_resnet18" else [pytest.mark.slow]) for n in NAMES],
)
def test_released_file_round_trip(name, released, tmp_path, capsys):
    src, ref = released[name]
    dst = tmp_path / "converted"
    rc, out, err = run(capsys, src, dst)
    assert rc == 0, err
    info = eca_flax.model_info(name)
    lines = out.splitlines()
    assert lines[0] == (
        f"{name}, k={k_text(name)}, 1000 classes, {info.params:,} params, epoch 100, "
        "best_prec1 77.42"
    )
    assert "'se_resnet50'; ignored" in out
    meta = json.loads((dst / "model.json").read_text())
    assert meta["checksum"].startswith("crc32:")
    assert meta == {
        "format": "eca_flax.pretrained/1",
        "arch": name,
        "k_size": list(eca_flax.resolve_k_size(name)),
        "num_classes": 1000,
        "attention": "eca",
        "image_size": 224,  # the released models' eval preprocessing, for predict
        "resize_size": 256,
        "params": info.params,
        "source": {"file": info.checkpoint, "sha256": hashlib.sha256(src.read_bytes()).hexdigest()},
        "epoch": 100,
        "best_prec1": pytest.approx(77.42, abs=1e-5),
        "converter_version": eca_flax.__version__,
        "checksum": meta["checksum"],  # of the arrays written: below
    }
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no temporary leftovers

    # Logits of the loaded model against the PyTorch original.
    model = eca_flax.load_pretrained(dst)
    weights = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, pretrained.WEIGHTS)))
    assert meta["checksum"] == description.checksum(weights)
    x = images(2, 64, seed=len(name))
    want = torch_logits(ref, x)
    # Eager ResNets share compiled ops across depths; MobileNetV2's many distinct layer shapes
    # compile faster as one program.
    forward = nnx.jit(lambda m, x: m(x)) if name == "eca_mobilenet_v2" else lambda m, x: m(x)
    result = verify.compare_logits(want, np.asarray(forward(model, jnp.asarray(x))))
    assert result.ok and result.top1_agree == 2, result.describe()

    # Export back: exactly the original keys, bit-exact tensors, strict load, same logits.
    back = tmp_path / "back.pth"
    rc, out, err = run(capsys, "--to-torch", dst, back)
    assert rc == 0, err
    exported = torch.load(back, map_location="cpu", weights_only=True)
    original = ref.state_dict()
    assert set(exported) == set(original)
    for key, value in original.items():
        if key.endswith("num_batches_tracked"):
            assert exported[key].dtype == torch.int64 and exported[key].ndim == 0
        else:
            assert exported[key].dtype == value.dtype and torch.equal(exported[key], value), key
    with torch.device("meta"):  # no time spent on initialisation
        fresh = tr.build(name).eval()
    fresh.load_state_dict(exported, strict=True, assign=True)
    np.testing.assert_array_equal(torch_logits(fresh, x), want)


@pytest.mark.slow
def test_verify_with_real_photos(released, tmp_path, capsys):
    for name in ("eca_resnet18", "eca_mobilenet_v2"):
        dst = tmp_path / name
        rc, out, err = run(capsys, released[name][0], dst, "--verify", "--arch", name)
        assert rc == 0, err
        line = next(x for x in out.splitlines() if x.startswith("verify"))
        assert "2 photos + 2 random images, 224x224" in line
        assert "top-1 4/4" in line and line.endswith(": OK")
        assert (dst / "model.json").is_file()


def test_compare_logits_catches_disagreement():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((3, 1000)) * 10
    assert verify.compare_logits(ref, ref + 1e-5).ok
    drift = verify.compare_logits(ref, ref + 2e-4 * np.abs(ref).max())
    assert not drift.ok and drift.relative == pytest.approx(2e-4)
    assert "FAILED" in drift.describe()
    swapped = ref.copy()
    top = ref.argmax(1)
    swapped[np.arange(3), top] = ref.min() - 1  # the top class drops to the bottom
    flipped = verify.compare_logits(ref, swapped)
    assert flipped.top1_agree == 0 and flipped.top5_agree == 0 and not flipped.ok


# ------------------------------------------------------------------------------------------
# Other formats and architectures: inferred from the tensors.


def test_bare_zip_state_dict_infers_everything(small, tmp_path, capsys):
    ref, _, src = small
    dst = tmp_path / "out"
    rc, out, err = run(capsys, src, dst, "--k-size", "1359", "--arch", "eca_resnet18")
    assert rc == 0, err
    assert out.splitlines()[0].startswith("eca_resnet18, k=1,3,5,9, 10 classes, ")
    meta = pretrained.read_model_json(dst)
    assert (meta["k_size"], meta["num_classes"], meta["epoch"]) == ([1, 3, 5, 9], 10, None)
    model = eca_flax.load_pretrained(dst)
    x = images(2, 48)
    assert verify.compare_logits(torch_logits(ref, x), np.asarray(model(x))).ok


@pytest.mark.parametrize(
    "attention", [None, *(pytest.param(a, marks=pytest.mark.slow) for a in ("eca_ns", "se"))]
)
def test_attention_variants(attention, tmp_path, capsys):
    ref = reference("eca_resnet18", seed=3, attention=attention)
    src = write(tmp_path / "plain.pth", ref.state_dict(), legacy=True)
    rc, out, err = run(capsys, src, tmp_path / "out")
    assert rc == 0, err
    if attention is None:
        assert "without ECA layers (attention=None" in out and "note: no ECA layers" in out
    elif attention == "se":
        assert out.startswith("eca_resnet18 with SE blocks instead of ECA (attention='se'), ")
        assert f"{sum(p.numel() for p in ref.parameters()):,} params" in out
        assert_error(*run(capsys, src, tmp_path / "k", "--k-size", "3577")[::2], "no ECA layers")
    else:
        assert out.startswith("eca_resnet18 with non-shared ECA (eca_ns), k=3,5,7,7")
    model = eca_flax.load_pretrained(tmp_path / "out")
    assert pretrained.read_model_json(tmp_path / "out")["attention"] == attention
    x = images(1, 32)
    assert verify.compare_logits(torch_logits(ref, x), np.asarray(model(x))).ok
    # Export back: the reference's own keys (for SE: layerS.B.se.fc1/fc2), loaded strictly.
    rc, _, err = run(capsys, "--to-torch", tmp_path / "out", tmp_path / "back.pth")
    assert rc == 0, err
    fresh = tr.build("eca_resnet18", attention=attention).eval()
    fresh.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True), strict=True)
    np.testing.assert_array_equal(torch_logits(fresh, x), torch_logits(ref, x))


def test_infer_arch_from_shapes_alone(released):
    sd = {k: v.numpy() for k, v in released["eca_mobilenet_v2"][1].state_dict().items()}
    spec = convert.infer_arch(sd)
    assert spec == convert.ArchSpec("eca_mobilenet_v2", (1,) * 10 + (3,) * 7, 1000, "eca")
    assert convert.format_k_size(spec.k_size) == "1x10,3x7"
    sd["features.5.conv.4.conv.weight"] = np.zeros((1, 1, 5), np.float32)  # one block differs
    assert convert.infer_arch(sd).k_size[4] == 5
    r34 = {k: v.numpy() for k, v in tr.build("eca_resnet34").state_dict().items()}
    assert convert.infer_arch(r34) == convert.ArchSpec("eca_resnet34", (3, 3, 5, 7), 1000, "eca")
    r34["layer3.2.eca.conv.weight"] = np.zeros((1, 1, 3), np.float32)
    with pytest.raises(errors.ConversionError, match=r"layer3 mixes ECA kernel sizes \[3, 5\]"):
        convert.infer_arch(r34)
    timm_like = {k.replace(".eca.", ".se."): v for k, v in r34.items()}
    with pytest.raises(errors.ConversionError, match="timm"):
        convert.infer_arch(timm_like)
    # SE ResNets in our layout (layerS.B.se.fc1/fc2, Linear): attention="se", any depth.
    se50 = {k: v.numpy() for k, v in tr.build("eca_resnet50", attention="se").state_dict().items()}
    want = convert.ArchSpec("eca_resnet50", (3, 5, 5, 7), 1000, "se")
    assert convert.infer_arch({"module." + k: v for k, v in se50.items()}) == want
    # SE as 1x1 convs (timm / torchvision style): one error naming the key and both shapes
    se18 = tr.numpy_state_dict(tr.build("eca_resnet18", attention="se"))
    conv_like = {
        k: v[..., None, None] if ".se.fc" in k and v.ndim == 2 else v for k, v in se18.items()
    }
    model = eca_flax.models.registry.empty_model(
        **dataclasses.asdict(convert.infer_arch(conv_like))
    )
    with pytest.raises(
        errors.ConversionError,
        match=r"shape mismatch for layer\d\.\d\.se\.fc\d\.weight: checkpoint \(\d+, \d+, 1, 1\)",
    ):
        convert.load_state_dict(model, conv_like)


# ------------------------------------------------------------------------------------------
# Bad input: one line, status 1, nothing written.


def test_missing_and_non_torch_files(tmp_path, capsys):
    dst = tmp_path / "out"
    assert_error(*run(capsys, tmp_path / "nope.pth", dst)[::2], "nope.pth: no such file")
    assert_error(*run(capsys, tmp_path, dst)[::2], "is a directory")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    assert_error(*run(capsys, text, dst)[::2], "not a PyTorch checkpoint")
    from sklearn.datasets import load_sample_images

    photo = load_sample_images().filenames[0]
    assert_error(*run(capsys, photo, dst)[::2], "china.jpg: not a PyTorch checkpoint")
    other = write(tmp_path / "other.pth", {"model": {"w": torch.zeros(1)}, "epoch": 3})
    assert_error(*run(capsys, other, dst)[::2], "keys epoch, model and no 'state_dict'")
    assert not dst.exists()


@pytest.mark.parametrize("legacy", [True, False])
def test_truncated_and_corrupt_files(legacy, small, tmp_path, capsys):
    _, state, _ = small
    kind = "legacy" if legacy else "zip"
    good = write(tmp_path / "good.pth", state, legacy=legacy).read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good[: len(good) // 2])
    assert_error(*run(capsys, truncated, tmp_path / "a")[::2], f"truncated or corrupt {kind}")
    corrupt = bytearray(good)
    corrupt[30:400] = bytes(370)  # the pickle (legacy) or the zip headers
    (tmp_path / "corrupt.pth").write_bytes(bytes(corrupt))
    assert_error(*run(capsys, tmp_path / "corrupt.pth", tmp_path / "b")[::2], "corrupt")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class _MakesDirectory:
    """Unpickling this runs os.mkdir(path): the payload of a malicious checkpoint."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("legacy", [True, False])
def test_code_running_pickle_is_refused(legacy, small, tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = {"state_dict": small[1], "epoch": _MakesDirectory(str(marker))}
    src = write(tmp_path / "evil.pth", evil, legacy=legacy)
    dst = tmp_path / "out"
    assert_error(*run(capsys, src, dst)[::2], "refused", "posix.mkdir", "--allow-unsafe-pickle")
    assert not marker.exists() and not dst.exists()
    # The payload is real: the unsafe loader runs it (and says so loudly first).
    rc, out, err = run(capsys, src, dst, "--allow-unsafe-pickle")
    assert marker.is_dir() and "WARNING: --allow-unsafe-pickle" in err
    assert rc == 0 and dst.is_dir()  # the state_dict itself is fine


@pytest.mark.slow
def test_code_running_pickle_subprocess(tmp_path):
    """End to end as a user runs it: exit status, a single line, no traceback."""
    marker = tmp_path / "pwned"
    src = write(tmp_path / "evil.pth.tar", {"x": _MakesDirectory(str(marker))}, legacy=True)
    proc = subprocess.run(
        [sys.executable, "convert_torch_weights.py", str(src), str(tmp_path / "out")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "refused" in errors[0] and proc.stdout == ""
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_missing_unexpected_and_misshaped_keys(small, tmp_path, capsys):
    _, state, _ = small
    dst = tmp_path / "out"
    missing = {k: v for k, v in state.items() if k not in ("layer1.0.bn1.running_var", "fc.bias")}
    line = assert_error(*run(capsys, write(tmp_path / "m.pth", missing), dst)[::2], "missing keys")
    assert "fc.bias" in line and "layer1.0.bn1.running_var" in line
    extra = {**state, "layer1.0.extra.weight": torch.zeros(3)}
    line = assert_error(*run(capsys, write(tmp_path / "u.pth", extra), dst)[::2], "unexpected keys")
    assert "layer1.0.extra.weight" in line and "missing keys" not in line
    bad = {**state, "fc.bias": torch.zeros(9)}
    assert_error(
        *run(capsys, write(tmp_path / "s.pth", bad), dst)[::2],
        "shape mismatch for fc.bias: checkpoint (9,), model (10,)",
    )
    many = {k: v for k, v in state.items() if not k.endswith(".running_mean")}
    line = assert_error(*run(capsys, write(tmp_path / "many.pth", many), dst)[::2], "and 10 more")
    assert line.count(".running_mean") == pth.MAX_LISTED_KEYS
    assert not dst.exists()


def test_arch_and_k_size_only_confirm(small, tmp_path, capsys):
    _, _, src = small
    dst = tmp_path / "out"
    assert_error(
        *run(capsys, src, dst, "--arch", "eca_resnet34")[::2],
        "--arch eca_resnet34 does not match the file, which holds eca_resnet18, k=1,3,5,9",
    )
    assert_error(
        *run(capsys, src, dst, "--k-size", "3577")[::2],
        "--k-size 3,5,7,7 does not match the file, whose ECA kernel sizes are 1,3,5,9",
    )
    assert_error(*run(capsys, src, dst, "--k-size", "35x7")[::2], "--k-size")
    assert not dst.exists()


def test_existing_destination(small, tmp_path, capsys):
    _, _, src = small
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert_error(*run(capsys, src, dst)[::2], "already exists", "--overwrite")
    assert_error(*run(capsys, src, dst, "--overwrite")[::2], "without model.json")
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert (dst / "keep.txt").read_text() == "mine"
    converted = tmp_path / "converted"
    assert run(capsys, src, converted)[0] == 0
    before = (converted / "model.json").read_text()
    assert_error(*run(capsys, src, converted, "--arch", "eca_resnet50", "--overwrite")[::2])
    assert (converted / "model.json").read_text() == before  # untouched on failure
    assert run(capsys, src, converted, "--overwrite")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "out"]


def test_export_errors(small, tmp_path, capsys):
    _, _, src = small
    assert_error(*run(capsys, "--to-torch", tmp_path / "none", tmp_path / "x.pth")[::2], "none")
    converted = tmp_path / "converted"
    assert run(capsys, src, converted)[0] == 0
    out = tmp_path / "x.pth"
    out.write_bytes(b"old")
    assert_error(*run(capsys, "--to-torch", converted, out)[::2], "already exists")
    assert out.read_bytes() == b"old"
    assert_error(*run(capsys, "--to-torch", converted, tmp_path)[::2], "is a directory")
    assert run(capsys, "--to-torch", converted, out, "--overwrite")[0] == 0
    assert len(torch.load(out, weights_only=True)) == len(small[1])
    # Issue 31, finding 3: a destination that is the source, lies inside it or holds it is
    # refused even with --overwrite (it replaced model.json with a torch zip); nothing changes.
    before = {p: p.read_bytes() for p in converted.rglob("*") if p.is_file()}
    link = tmp_path / "link"
    link.symlink_to(converted)
    holder = tmp_path / "holder"  # a converter output holding the file to convert
    shutil.copytree(converted, holder)
    shutil.copy(out, holder / "src.pth")
    apart = "write it elsewhere (nothing written)"
    for args, fragments in [
        (("--to-torch", converted, converted / "model.json"), ("is inside the source", apart)),
        (("--to-torch", link, converted / "x.safetensors"), ("is inside the source", apart)),
        (("--to-torch", converted / "model.json", converted), ("is a directory",)),
        ((out, tmp_path / "x.safetensors"), None),  # apart: converted back
        (("--to-torch", converted, tmp_path / "t.safetensors"), None),  # torch's keys
        ((tmp_path / "t.safetensors", tmp_path / "t.safetensors"), ("is the source", apart)),
        ((holder / "src.pth", holder), ("holds the source", apart)),
    ]:
        rc, err = run(capsys, *args, "--overwrite")[::2]
        if fragments:
            assert_error(rc, err, *fragments)
        else:
            assert rc == 0, err
    assert {p: p.read_bytes() for p in converted.rglob("*") if p.is_file()} == before
    assert (holder / "src.pth").read_bytes() == out.read_bytes()


# ------------------------------------------------------------------------------------------
# load_pretrained.


# ------------------------------------------------------------------------------------------
# Faults: a full disk, Ctrl-C, permissions, non-finite weights.


def converter(*args) -> list[str]:
    return [sys.executable, str(ROOT / "convert_torch_weights.py"), *map(str, args)]


@pytest.mark.slow
def test_full_disk_new_overwrite_and_to_torch(small, tmp_path):
    """No space on DST's disk: one line saying so, nothing written (hidden temporaries
    included), and with --overwrite the previous DST is untouched."""
    _, _, src = small
    old = tmp_path / "old"
    convert.convert_file(src, old, log=lambda _: None)
    old_files = sorted(f"./dst/{p.relative_to(old)}" for p in old.rglob("*"))
    size = sum(p.stat().st_size for p in old.rglob("*"))
    disk = tmp_path / "disk"
    dst, out = disk / "dst", disk / "back.pth"
    cases = [  # (command, disk size, setup, message, what the disk holds after)
        (converter(src, dst), size // 2, "", f"{dst}: could not write it (no space left on "
         "the device); nothing written", []),
        (converter(src, dst, "--overwrite"), size * 3 // 2, f'cp -a {old} "$disk"/dst',
         f"{dst}: could not write it (no space left on the device); nothing written; the "
         f"previous {dst} is untouched", ["./dst", *old_files]),
        (converter("--to-torch", old, out), size // 2, "", f"{out}: could not write it (no "
         "space left on the device); nothing written", []),
    ]  # fmt: skip
    for cmd, disk_size, setup, message, left in cases:
        proc, found = run_on_small_disk(cmd, disk, disk_size, setup=setup, cwd=ROOT)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.strip().splitlines() == [f"error: {message}"], proc.stderr
        assert found == sorted(left)


@pytest.mark.slow
def test_interrupted_conversion_leaves_nothing(small, tmp_path):
    """Ctrl-C at any moment of a conversion: 'interrupted; nothing written', exit 130, and
    nothing in DST's directory (no hidden temporary), or, if it came too late, a complete DST."""
    _, _, src = small
    interrupted = 0
    # 1.5 s after the start: importing; then 0 and 0.2 s after the summary line, which is
    # printed when writing starts.
    for i, (after_summary, delay) in enumerate([(False, 1.5), (True, 0), (True, 0.2)]):
        out = tmp_path / str(i)
        proc = popen_interruptible(
            converter(src, out / "dst"), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        if after_summary:
            proc.stdout.readline()
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        assert "Traceback" not in stderr, stderr
        if stdout.strip().endswith(f"wrote {out / 'dst'}"):  # too late: complete (exit 0, or
            assert sorted(p.name for p in out.iterdir()) == ["dst"]  # -SIGINT while exiting)
            continue
        interrupted += 1
        if proc.returncode == -signal.SIGINT:  # so early that Python had not started yet
            assert not after_summary and stderr == ""
        else:
            assert (proc.returncode, stderr) == (130, "interrupted; nothing written\n"), stderr
        assert not out.exists() or not list(out.iterdir())
    assert interrupted >= 2


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask(small, tmp_path, capsys, umask):
    """Converted directories and exported files get the modes any new file gets (shared
    filesystems), not the private 0700 / 0600 of temporary files."""
    _, _, src = small
    previous = os.umask(umask)
    try:
        assert run(capsys, src, tmp_path / "dst")[0] == 0
        assert run(capsys, "--to-torch", tmp_path / "dst", tmp_path / "back.pth")[0] == 0
    finally:
        os.umask(previous)
    for path in [tmp_path / "dst", *(tmp_path / "dst").rglob("*"), tmp_path / "back.pth"]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, (path, oct(path.stat().st_mode))


def test_non_finite_weights_are_refused(small, tmp_path, capsys):
    _, state, _ = small
    bad = {k: v.clone() for k, v in state.items()}
    bad["fc.weight"][0, 0] = float("nan")
    bad["layer1.0.bn1.running_var"][1] = float("inf")
    src = write(tmp_path / "nan.pth", bad)
    rc, _, err = run(capsys, src, tmp_path / "dst")
    assert_error(
        rc,
        err,
        "2 tensors hold NaN or infinite values (fc.weight, layer1.0.bn1.running_var)",
        "refusing to convert",
    )
    assert not (tmp_path / "dst").exists()
