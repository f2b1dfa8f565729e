"""Pretrained in one call (``eca_flax.weights.download``), against a local Hub and Drive.

A stdlib HTTP server on 127.0.0.1 (``local_hub.py``) serves real files: ecaresnet26t in timm's
Hub layout as ``torch_reference.save_hub_folder`` writes it (random weights, 10 classes), the
same weights as sharded safetensors, an eca_flax model file, and the original ECA-ResNet-18's
training checkpoint from ``torch.save`` standing in for the authors' Drive file. Each test gets
its own cache (``HF_HOME``) and the server as ``HF_ENDPOINT``; nothing reaches the network but
``test_real_hub`` (marked ``network``, skipped unless ECA_FLAX_NETWORK_TESTS=1).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # before huggingface_hub is imported

import jax
import numpy as np
import pytest
import torch
from faults import run_on_small_disk
from flax import nnx
from local_hub import LocalHub
from safetensors.torch import save_file

import convert_torch_weights
import eca_flax
from eca_flax import predict
from eca_flax.benchmark import cli as benchmark_cli
from eca_flax.errors import DownloadError, PretrainedError
from eca_flax.models import torch_reference as tr
from eca_flax.models.registry import model_info
from eca_flax.training import config as train_config
from eca_flax.weights import download
from eca_flax.weights.__main__ import main as weights_cli
from eca_flax.weights.convert import convert_file

ROOT = Path(__file__).resolve().parents[1]
TAG_REPO = "timm/ecaresnet26t.ra2_in1k"
IMAGES = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
quiet = lambda _: None


@nnx.jit
def logits(model, images):
    return model(images)


def logits_of(model) -> np.ndarray:
    return np.asarray(jax.block_until_ready(logits(model, IMAGES)))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """The files served, built once: timm's folder, its shards, an eca_flax file, a .pth."""
    root = tmp_path_factory.mktemp("served")
    reference = tr.random_reference("ecaresnet26t", seed=1, num_classes=10)
    tr.save_hub_folder("ecaresnet26t", reference, root / "timm")
    sharded = root / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((root / "timm" / "config.json").read_text())
    tensors = {k: v.detach().contiguous() for k, v in reference.state_dict().items()}
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(sharded / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    tr.save_hub_folder("ecaresnet26t", reference, root / "bin", bin_file=True)
    local = root / "local26.safetensors"  # the converted local folder the one call must equal
    convert_file(root / "timm", local, log=quiet)
    ecaflax = root / "ecaflax"  # an eca_flax model file (save_pretrained's) as a repo
    ecaflax.mkdir()
    (ecaflax / "model.safetensors").write_bytes(local.read_bytes())
    noweights = root / "noweights"
    noweights.mkdir()
    (noweights / "config.json").write_text("{}")
    original = tr.random_reference("eca_resnet18", seed=2, num_classes=10)
    sd = {"module." + k: v for k, v in original.state_dict().items()}
    pth = root / "eca_resnet18_k3577.pth.tar"
    torch.save({"epoch": 100, "arch": "eca_resnet18", "state_dict": sd, "best_prec1": 70.9}, pth)
    folders = ("timm", "sharded", "bin", "ecaflax", "noweights")
    return {
        "repos": {
            name: {p.name: p.read_bytes() for p in sorted((root / name).iterdir())}
            for name in folders
        },
        "pth_bytes": pth.read_bytes(),
        "local": local,
        "local_logits": logits_of(eca_flax.load_pretrained(local)),
        "pth": pth,
        "original": original,
    }


@pytest.fixture
def hub(files, tmp_path, monkeypatch) -> LocalHub:
    """A fresh server with every repo and Drive file, and a fresh cache pointing at it."""
    server = LocalHub()
    repos = files["repos"]
    server.add_repo(TAG_REPO, repos["timm"])
    for name in ("sharded", "bin", "ecaflax", "noweights"):
        server.add_repo(f"someone/{name}", repos[name])
    server.add_repo("someone/gated", repos["timm"], gated=True)
    server.add_repo("someone/damaged", repos["timm"])
    server.damaged.add(("someone/damaged", "model.safetensors"))  # one byte changed
    pth = files["pth_bytes"]
    server.drive[model_info("eca_resnet18").drive_id] = pth
    server.drive[model_info("eca_resnet34").drive_id] = pth  # the wrong network
    server.drive_html.add(model_info("eca_mobilenet_v2").drive_id)  # Drive's quota page
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "ECA_FLAX_CACHE", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv(download.DRIVE_URL_ENV, server.url + "/drive/{id}")
    yield server
    server.close()


def leftovers(root: Path) -> list[str]:
    """What the cache holds besides complete config.json files, locks, refs and markers:
    weights in the Hub cache's snapshots or blobs, partial downloads, eca_flax's files."""
    out = []
    for p in root.rglob("*"):
        if not (p.is_file() or p.is_symlink()) or p.name.endswith((".lock", ".part")):
            continue
        parts = set(p.parts)
        in_hub = "hub" in p.relative_to(root).parts[:1]
        weights_blob = "blobs" in parts and p.stat().st_size >= 65536  # not a config
        partial = p.name.endswith(".incomplete")
        if in_hub and "snapshots" not in parts and not partial and not weights_blob:
            continue
        if in_hub and p.name in ("config.json", "CACHEDIR.TAG"):
            continue
        out.append(str(p.relative_to(root)))
    return sorted(out)


def test_timm_tag_in_one_call(hub, files, tmp_path, monkeypatch) -> None:
    """ecaresnet26t (its default tag) downloads, checks, converts and caches: the logits are the
    converted local folder's; the second call makes no request and converts nothing; with the
    server gone (and HF_HUB_OFFLINE=1) it loads from the cache."""
    model = eca_flax.create_model("ecaresnet26t", pretrained=True)
    np.testing.assert_array_equal(logits_of(model), files["local_logits"])
    assert [p.split("/")[1] for p in hub.gets()] == ["timm", "lfs"]  # config.json, LFS weights
    converted = list((tmp_path / "hf" / "eca_flax" / "converted").rglob("*.safetensors"))
    assert len(converted) == 1 and converted[0].stem == hub.repos[TAG_REPO].commit
    stamp, seen = converted[0].stat().st_mtime_ns, len(hub.requests)
    again = eca_flax.create_model("ecaresnet26t.ra2_in1k", pretrained=True, num_classes=3)
    assert len(hub.requests) == seen and converted[0].stat().st_mtime_ns == stamp
    assert again.fc.out_features == 3  # a new head, as load_pretrained gives one
    hub.close()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = eca_flax.load_pretrained("ecaresnet26t")
    np.testing.assert_array_equal(logits_of(offline), files["local_logits"])
    # The cache's original files are what convert_torch_weights.py NAME converts, offline too;
    # train.py's init_from takes the name (its converted file).
    assert (download.fetch("ecaresnet26t") / "config.json").is_file()
    config = train_config.default_config()
    config.init_from = "ecaresnet26t.ra2_in1k"
    train_config._resolve_init_from(config)
    assert config.init_from == str(converted[0])
    assert weights_cli(["list"]) == 0


def test_sharded_and_bin_repos(hub, files, tmp_path) -> None:
    """hf-hub:ORG/NAME@REV with sharded safetensors, one shard's connection cut half-way:
    fetched again within the call, every blob checked against its ETag, the same logits; and a
    repo with pytorch_model.bin."""
    cut = hub.lfs_path("someone/sharded", "model-00001-of-00002.safetensors")
    hub.cut.add(cut)
    commit = hub.repos["someone/sharded"].commit
    model = eca_flax.load_pretrained(f"hf-hub:someone/sharded@{commit}")
    np.testing.assert_array_equal(logits_of(model), files["local_logits"])
    gets = hub.gets()
    assert gets.count(cut) == 2 and len(gets) == 5, gets  # config, index, 2 shards, 1 again
    assert eca_flax.load_pretrained(f"hf-hub:someone/sharded@{commit}") is not None
    assert len(hub.gets()) == 5  # cached: no request
    # A repo with pytorch_model.bin only (timm's older layout): the same model.
    model = eca_flax.load_pretrained("hf-hub:someone/bin")
    np.testing.assert_array_equal(logits_of(model), files["local_logits"])


def test_other_timm_family_by_tag(hub, tmp_path) -> None:
    """A model of timm's other ECA families (eca_resnext26ts, a ByobNet) by its name alone: its
    default tag's repo (ch_in1k) is fetched and converted; the logits are its reference's."""
    reference = tr.random_reference("eca_resnext26ts", seed=4, num_classes=10)
    tr.save_hub_folder("eca_resnext26ts", reference, tmp_path / "repo")
    repo = {p.name: p.read_bytes() for p in sorted((tmp_path / "repo").iterdir())}
    hub.add_repo(model_info("eca_resnext26ts").hub_repo("ch_in1k"), repo)
    model = eca_flax.create_model("eca_resnext26ts", pretrained=True)
    with torch.no_grad():
        want = reference(torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy())).numpy()
    # float32 through ~30 layers of well-conditioned random weights: ~1e-6 relative, as the
    # family's parity tests (test_timm_families.py) measure; 1e-4 leaves room.
    np.testing.assert_allclose(logits_of(model), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_eca_flax_repo_needs_no_conversion(hub, files, tmp_path) -> None:
    """A repo holding save_pretrained's model.safetensors loads as it is."""
    model = eca_flax.load_pretrained("hf-hub:someone/ecaflax")
    np.testing.assert_array_equal(logits_of(model), files["local_logits"])
    assert not (tmp_path / "hf" / "eca_flax" / "converted").exists()
    seen = len(hub.requests)
    eca_flax.load_pretrained("hf-hub:someone/ecaflax")
    assert len(hub.requests) == seen
    # A damaged cached file is named (its checksum), and fetched again only when asked.
    blob = next((tmp_path / "hf" / "hub" / "models--someone--ecaflax" / "blobs").iterdir())
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(DownloadError, match="checksum.*damaged: .*force_download=True"):
        eca_flax.load_pretrained("hf-hub:someone/ecaflax")
    model = eca_flax.load_pretrained("hf-hub:someone/ecaflax", force_download=True)
    np.testing.assert_array_equal(logits_of(model), files["local_logits"])


def test_original_name_from_drive(hub, files, tmp_path, capsys) -> None:
    """eca_resnet18: the authors' file through gdown, checked (a checkpoint of eca_resnet18 with
    its released kernel sizes), its sha256 recorded; the same model as the converter's."""
    model = eca_flax.create_model("eca_resnet18", pretrained=True)
    drive = tmp_path / "hf" / "eca_flax" / "drive"
    kept = drive / "eca_resnet18_k3577.pth.tar"
    assert kept.read_bytes() == files["pth"].read_bytes()
    assert kept.with_name(kept.name + ".sha256").read_text().split()[0] == download.file_sha256(
        files["pth"]
    )
    dst = tmp_path / "cli.safetensors"
    assert convert_torch_weights.main(["eca_resnet18", str(dst)]) == 0  # the name, as SRC
    np.testing.assert_array_equal(logits_of(model), logits_of(eca_flax.load_pretrained(dst)))
    with torch.no_grad():  # the original network holding those weights
        want = files["original"](torch.from_numpy(IMAGES.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(logits_of(model), want, rtol=1e-4, atol=1e-4)
    assert len(hub.gets()) == 1
    capsys.readouterr()
    assert weights_cli(["list"]) == 0
    listed = {
        line.split()[0]: line.split()[-1]
        for line in capsys.readouterr().out.splitlines()[1:]
        if line
    }
    assert listed["eca_resnet18"] == "yes" and listed["eca_resnet50"] == "no"
    # A damaged cached file is named, and fetched again only when asked.
    kept.write_bytes(kept.read_bytes()[:-1] + b"!")
    with pytest.raises(DownloadError, match="is damaged .*force_download=True"):
        download.fetch("eca_resnet18")
    assert download.fetch("eca_resnet18", force_download=True) == kept
    assert kept.read_bytes() == files["pth"].read_bytes() and len(hub.gets()) == 2


@pytest.mark.slow
def test_detector_by_name_from_drive(hub, files, tmp_path, monkeypatch, capsys) -> None:
    """load_detector("mask_rcnn_ecanet50_k3377"): the authors' mmdetection file through gdown,
    checked (a Mask R-CNN on ECA-ResNet-50 with kernel sizes 3,3,7,7), converted whole and
    cached; loaded again with no request, offline too; the wrong file or an uncached one
    offline is one line and leaves nothing."""
    import det_reference

    from eca_flax.detection import load_detector
    from eca_flax.detection.settings import RELEASES
    from eca_flax.models.registry import count_params

    release = RELEASES["mask_rcnn_ecanet50_k3377"]
    sd = det_reference.v1_state_dict("mask_rcnn", "eca_resnet50", (3, 3, 7, 7), standardize=False)
    pth = tmp_path / "served.pth"
    meta = {"mmdet_version": "1.0rc1+c2ba6e6", "config": "", "CLASSES": None, "epoch": 12}
    torch.save({"meta": meta, "state_dict": sd}, pth)
    hub.drive[release.drive_id] = pth.read_bytes()
    hub.drive[RELEASES["RetinaNet_ecanet50_k3377"].drive_id] = files["pth_bytes"]  # a classifier

    det = load_detector("mask_rcnn_ecanet50_k3377")
    assert det.kind == "mask_rcnn" and count_params(det) == release.params
    own = tmp_path / "hf" / "eca_flax"
    kept = own / "drive" / release.checkpoint
    assert kept.read_bytes() == pth.read_bytes()
    converted = own / "converted" / "drive" / "mask_rcnn_ecanet50_k3377"
    assert json.loads((converted / "model.json").read_text())["k_size"] == [3, 3, 7, 7]
    from safetensors.numpy import load_file

    weights = load_file(str(converted / "weights.safetensors"))
    assert weights.keys() == sd.keys()
    for key in ("backbone.layer3.5.eca.conv.weight", "mask_head.conv_logits.weight"):
        np.testing.assert_array_equal(weights[key], sd[key].numpy())
    assert len(hub.gets()) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the second load: no request, no conversion
    assert load_detector("mask_rcnn_ecanet50_k3377_bs8_lr0.01.pth").kind == "mask_rcnn"
    capsys.readouterr()
    assert weights_cli(["download", "mask_rcnn_ecanet50_k3377"]) == 0
    assert weights_cli(["list"]) == 0
    out = capsys.readouterr().out
    assert f"mask_rcnn_ecanet50_k3377: {converted}" in out
    listed = {line.split()[0]: line.split()[-1] for line in out.splitlines()[2:] if line}
    assert listed["mask_rcnn_ecanet50_k3377"] == "yes" and listed["faster_rcnn_ecanet50_k5"] == "no"
    assert len(hub.gets()) == 1
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="not in the cache .* HF_HUB_OFFLINE is set; where"):
        load_detector("faster_rcnn_ecanet50_k5")
    assert time.perf_counter() - start < 2
    monkeypatch.delenv("HF_HUB_OFFLINE")
    wrong = r"_k3377_bs8_lr0.01.pth on Google Drive\): the downloaded file is not the release"
    with pytest.raises(DownloadError, match=wrong + " .*nothing kept"):
        load_detector("RetinaNet_ecanet50_k3377")
    assert sorted(p.name for p in (own / "drive").rglob("*.pth")) == [release.checkpoint]
    with pytest.raises(PretrainedError, match="a COCO detector, not a classifier"):
        eca_flax.load_pretrained("mask_rcnn_ecanet50_k3377")


def test_errors_are_one_line_and_leave_the_cache_clean(hub, tmp_path, monkeypatch, capsys) -> None:
    """Every failure: one line naming the problem, nothing but locks and markers in the cache."""
    cache = tmp_path / "hf"
    cases = {
        "ecaresnet26": (PretrainedError, "did you mean ecaresnet26t"),
        "ecaresnet26t.in22k": (PretrainedError, "has no tag 'in22k' .*ra2_in1k"),
        "ecaresnet200d": (PretrainedError, "no pretrained weights"),
        "hf-hub:someone/missing": (DownloadError, "no such repo on .*token"),
        "hf-hub:someone/sharded@v9": (DownloadError, "no revision 'v9'"),
        "hf-hub:someone/noweights": (DownloadError, "none of model.safetensors"),
        "hf-hub:someone/gated": (DownloadError, "gated or private: it needs a token"),
        "hf-hub:someone/damaged": (DownloadError, "arrived damaged .*sha256.*nothing kept"),
        "eca_mobilenet_v2": (DownloadError, "an HTML page instead .*too many users"),
        "eca_resnet34": (DownloadError, "holds eca_resnet18, .*not eca_resnet34"),
    }
    for name, (kind, message) in cases.items():
        with pytest.raises(kind, match=message) as caught:
            download.resolve(name, log=quiet)
        assert "\n" not in str(caught.value), name
        assert leftovers(cache) == [], name
    # The command lines take the names: one error line for a wrong one; a timm tag names its
    # model for the speed benchmark.
    assert predict.main(["--weights", "ecaresnet26", str(ROOT / "pyproject.toml")]) == 1
    assert "did you mean ecaresnet26t" in capsys.readouterr().err
    assert benchmark_cli.parse_args(["--models", "ecaresnet50t.a1_in1k"]).models == ["ecaresnet50t"]
    # A Drive connection cut half-way: one line; the next call resumes it (a Range request).
    drive_path = f"/drive/{model_info('eca_resnet18').drive_id}"
    hub.cut.add(drive_path)
    with pytest.raises(DownloadError, match="download failed .*run again to resume"):
        download.fetch("eca_resnet18")
    assert leftovers(cache) == []
    assert download.fetch("eca_resnet18").is_file()
    assert [p for p, _ in hub.ranges] == [drive_path]
    # Offline, or the server gone: uncached models fail at once, saying how to get them.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("ecaresnet50t", "eca_resnet50"):
        start = time.perf_counter()
        with pytest.raises(DownloadError, match="HF_HUB_OFFLINE .*weights download") as caught:
            eca_flax.create_model(name, pretrained=True)
        assert time.perf_counter() - start < 2 and caught.value.offline
    monkeypatch.delenv("HF_HUB_OFFLINE")
    hub.close()
    start = time.perf_counter()
    with pytest.raises(DownloadError, match="unreachable .*weights download ecaresnet50t"):
        eca_flax.create_model("ecaresnet50t", pretrained=True)
    assert time.perf_counter() - start < 2
    drive = "eca_flax/drive/eca_resnet18_k3577.pth.tar"
    assert leftovers(cache) == [drive, drive + ".sha256"]


@pytest.mark.network
@pytest.mark.skipif(
    os.environ.get("ECA_FLAX_NETWORK_TESTS") != "1", reason="reaches huggingface.co"
)
def test_real_hub(tmp_path, monkeypatch) -> None:
    """The real Hub: timm's ecaresnet26t.ra2_in1k in one call (about 64 MB)."""
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    model = eca_flax.create_model("ecaresnet26t", pretrained=True, cache_dir=tmp_path)
    assert model.fc.out_features == 1000


@pytest.mark.slow
def test_full_disk(hub, tmp_path) -> None:
    """A full disk while downloading, then while converting: one line, exit 1, and neither
    partial downloads nor a converted file left, only complete Hub files (python -m
    eca_flax.weights download, with the cache on a small tmpfs)."""
    disk = tmp_path / "disk"
    cmd = [sys.executable, "-m", "eca_flax.weights", "--cache-dir", str(disk), "download"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for size, name in ((20 << 20, "ecaresnet26t"), (90 << 20, "hf-hub:someone/sharded")):
        proc, found = run_on_small_disk([*cmd, name], disk, size, env=env, cwd=ROOT)
        assert proc.returncode == 1, proc.stderr
        error = proc.stderr.strip().splitlines()[-1]
        assert error.startswith("error: ") and "disk full" in error, proc.stderr
        converted = [f for f in found if "/converted/" in f and f.endswith(".safetensors")]
        assert converted == [] and not [f for f in found if f.endswith((".incomplete", ".tmp"))]
