"""timm's ECA-ResNet family: parameter counts, the PyTorch reference against the facts, parity
of converted Hub folders, bad input, each model's eval preprocessing, training.

Every number comes from /work/shared/reference/timm_eca_facts.md. The models run eagerly (no
jit) at batch 1 with the lax convolutions: eager op-by-op compiles each distinct shape once,
cheaper than compiling a 269-layer network whole; float32 throughout.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from faults import trainer_env
from flax import nnx
from PIL import Image
from safetensors.numpy import save_file
from test_config import load_config

import eca_flax
from eca_flax.data import preprocess_for_eval
from eca_flax.models import cpu_kernels, layers, registry, resnet
from eca_flax.models import torch_reference as tr
from eca_flax.training import config as cfg
from eca_flax.weights import convert, pretrained

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("convert_cli", REPO / "convert_torch_weights.py")
CLI = importlib.util.module_from_spec(spec)
spec.loader.exec_module(CLI)

# The facts table: (layers, stem, parameters).
FACTS = {
    "ecaresnet26t": ((2, 2, 2, 2), "tiered", 16_011_916),
    "ecaresnet50d": ((3, 4, 6, 3), "deep", 25_576_350),
    "ecaresnet50d_pruned": ((3, 4, 6, 3), "deep", 19_939_713),
    "ecaresnet50t": ((3, 4, 6, 3), "tiered", 25_573_814),
    "ecaresnetlight": ((1, 1, 11, 3), "plain", 30_162_046),
    "ecaresnet101d": ((3, 4, 23, 3), "deep", 44_568_563),
    "ecaresnet101d_pruned": ((3, 4, 23, 3), "deep", 24_876_040),
    "ecaresnet200d": ((3, 24, 36, 3), "deep", 64_693_400),
    "ecaresnet269d": ((3, 30, 48, 8), "deep", 102_093_077),
    "ecaresnext26t_32x4d": ((2, 2, 2, 2), "tiered", 15_406_220),
    "ecaresnext50t_32x4d": ((3, 4, 6, 3), "tiered", 25_045_686),
}
PRUNED = ("ecaresnet50d_pruned", "ecaresnet101d_pruned")
# The deepest two: their parameter count traces 66 / 89 blocks' construction (nnx.eval_shape,
# seconds); converting and running the 45M+ parameter models and the pruned ones (every block
# its own shapes: eager compiles each) takes minutes on 2 cores.
SLOW = {"ecaresnet200d", "ecaresnet269d"}
SLOW_PARITY = set(FACTS)  # each converts a full network and runs both (seconds each)
ONE_SIZE = {"ecaresnet200d", "ecaresnet269d", *PRUNED}  # parity at 72 px only (see the test)
STEM_WIDTHS = {"deep": (32, 32, 64), "tiered": (24, 32, 64)}
# Published top-1 at the test size, per tag (timm's results-imagenet.csv, via the facts).
TOP1 = {
    ("ecaresnet26t", "ra2_in1k"): (79.900, 320),
    ("ecaresnet50d", "miil_in1k"): (81.648, 288),
    ("ecaresnet50t", "ra2_in1k"): (82.370, 320),
    ("ecaresnet50t", "a3_in1k"): (79.548, 224),
    ("ecaresnet101d", "miil_in1k"): (83.006, 288),
    ("ecaresnet269d", "ra2_in1k"): (84.968, 352),
}
# float32 parity: the JAX and PyTorch networks sum the same products in different orders (XLA
# vs oneDNN, AVX2 vs AVX-512), each conv output a sum of up to 3*3*512 terms, ~1e-7 relative
# rounding each, compounding over up to 269 layers (random weights, residual branches damped
# by torch_reference.residual_scale so the nets stay well conditioned): measured 1e-6 to 3e-6
# relative to the largest logit here; 1e-4 (convert's --verify tolerance, the done-when) leaves
# a margin of 30x for other CPUs and jax versions.
RTOL = 1e-4


def params(name: str, slow=SLOW) -> pytest.param:
    marks = [pytest.mark.slow] if name in slow else []
    return pytest.param(name, marks=marks, id=name)


def run(capsys, *args) -> tuple[int, str, str]:
    """convert_torch_weights.py in-process: exit status, stdout, stderr."""
    rc = CLI.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def eager_logits(model, images: np.ndarray) -> np.ndarray:
    """The model's logits, eagerly, with lax's convolutions (see the module docstring); the
    pruned models, whose blocks all differ, compile once whole instead."""
    with cpu_kernels.switch(False):
        if registry.arch_of(model) in PRUNED:
            return np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(images)))
        return np.asarray(model(jnp.asarray(images)))


def torch_logits(reference: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()


def model_size(name: str) -> int:
    """The resolution the model is published at (its first tag's input size; untrained: 224)."""
    info = eca_flax.model_info(name)
    return info.tags[0].input_size if info.tags else 224


# ------------------------------------------------------------------------------------------
# Registry and parameter counts.


@pytest.mark.parametrize("name", [params(n) for n in FACTS])
def test_parameter_count_exact(name: str) -> None:
    layers, stem, count = FACTS[name]
    info = eca_flax.model_info(name)
    assert (info.source, info.layers, info.design.stem, info.params) == (
        "timm",
        layers,
        stem,
        count,
    )
    model = registry.abstract_model(name, info.release_k_size, 1000, "eca", "float32")  # no init
    assert registry.count_params(model) == count
    assert registry.arch_of(model) == name


def test_registry_describes_the_family() -> None:
    assert eca_flax.list_models("timm")[: len(FACTS)] == list(FACTS)  # then issue 30's
    assert set(FACTS) < set(eca_flax.list_models())
    assert eca_flax.list_models("ECA-Net")[0] == "eca_resnet18"
    for (name, tag), (top1, size) in TOP1.items():
        info = eca_flax.model_info(name)
        t = next(t for t in info.tags if t.tag == tag)
        assert (t.top1, t.test_size, t.interpolation) == (top1, size, "bicubic")
        assert info.hub_repo(tag) == f"timm/{name}.{tag}"
    a3 = next(t for t in eca_flax.model_info("ecaresnet50t").tags if t.tag == "a3_in1k")
    assert (a3.input_size, a3.crop_pct, a3.test_size, a3.test_crop_pct) == (160, 0.95, 224, 0.95)
    info = eca_flax.model_info("ecaresnet50t")
    assert info.top1 == 82.370 and info.best_tag.test_size == 320
    assert eca_flax.model_info("ecaresnet200d").tags == ()
    assert eca_flax.model_info("ecaresnet200d").hub_repo() is None
    # timm's kernel rule (min 3) on 256, 512, 1024, 2048 channels; the original's release: 3557
    assert all(eca_flax.model_info(n).release_k_size == (5, 5, 5, 7) for n in FACTS)
    assert registry.resolve_k_size("ecaresnet50t", "adaptive") == (5, 5, 5, 7)
    assert registry.resolve_k_size("eca_resnet50") == (3, 5, 5, 7)
    assert layers.timm_kernel_size(4) == 3 and layers.adaptive_kernel_size(4) == 1


def test_attention_choices_on_timm_layouts() -> None:
    """attention=None (a plain ResNet-T) and "se" build; timm names either layer ``se``."""
    plain = registry.abstract_model("ecaresnet26t", (5, 5, 5, 7), 10, None, "float32")
    se = registry.abstract_model("ecaresnet26t", (5, 5, 5, 7), 10, "se", "float32")
    eca = registry.abstract_model("ecaresnet26t", (5, 5, 5, 7), 10, "eca", "float32")
    assert plain.layer1[0].se is None and plain.layer1[0].attention_attr == "se"
    assert registry.count_params(eca) - registry.count_params(plain) == 2 * (5 + 5 + 5 + 7)
    assert se.layer1[0].se.fc1.kernel.shape == (256, 16)


# ------------------------------------------------------------------------------------------
# The PyTorch reference against the facts: keys, shapes, parameter counts.


@pytest.mark.parametrize("name", list(FACTS))
def test_reference_matches_facts(name: str) -> None:
    layers, stem, count = FACTS[name]
    sd = tr.build(name).state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(stats)) == count
    if stem == "plain":
        assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    else:
        c0, c1, c2 = STEM_WIDTHS[stem]
        assert sd["conv1.0.weight"].shape == (c0, 3, 3, 3)
        assert sd["conv1.1.weight"].shape == (c0,) and sd["conv1.4.weight"].shape == (c1,)
        assert sd["conv1.3.weight"].shape == (c1, c0, 3, 3)
        assert sd["conv1.6.weight"].shape == (c2, c1, 3, 3) and sd["bn1.weight"].shape == (64,)
    for s, n in enumerate(layers, 1):
        assert f"layer{s}.{n - 1}.conv3.weight" in sd and f"layer{s}.{n}.conv1.weight" not in sd
        k = 7 if s == 4 else 5
        assert all(sd[f"layer{s}.{b}.se.conv.weight"].shape == (1, 1, k) for b in range(n))
        # avg-down: downsample.0 is the parameter-free pool (or Identity), .1 the conv, .2 BN
        assert f"layer{s}.0.downsample.0.weight" not in sd
        assert sd[f"layer{s}.0.downsample.1.weight"].ndim == 4
        assert f"layer{s}.0.downsample.2.running_var" in sd
        assert f"layer{s}.0.downsample.2.num_batches_tracked" in sd
        assert f"layer{s}.1.downsample.1.weight" not in sd
    if "32x4d" in name:  # 3x3 conv: 32 groups of 4 (x stage multiple)
        assert sd["layer1.0.conv2.weight"].shape == (128, 4, 3, 3)
        assert sd["layer4.0.conv2.weight"].shape == (1024, 32, 3, 3)
    if name.endswith("pruned"):  # spot checks against timm's _pruned/*.txt
        first = {"ecaresnet50d_pruned": (47, 18, 19), "ecaresnet101d_pruned": (45, 25, 26)}[name]
        assert tuple(sd[f"layer1.0.conv{c}.weight"].shape[0] for c in (1, 2, 3)) == first
        assert sd["fc.weight"].shape[1] == {"ecaresnet50d_pruned": 2022}.get(name, 2042)
    else:
        assert sd["fc.weight"].shape == (1000, 2048)


def test_avg_down_pool_matches_pytorch_on_odd_sizes() -> None:
    """AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False): partial last windows average
    the pixels inside only."""
    pool = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
    for h, w in ((7, 7), (5, 8), (1, 3)):
        x = np.random.default_rng(h).standard_normal((2, h, w, 3)).astype(np.float32)
        want = pool(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
        got = np.asarray(layers.AvgDown(2)(jnp.asarray(x)))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # one add, one division


# ------------------------------------------------------------------------------------------
# Parity: a Hub folder of the random-weight reference converts with no flag and reproduces it.


def test_save_hub_folder_is_timms_layout(tmp_path: Path) -> None:
    from safetensors import safe_open

    reference = tr.random_reference("ecaresnext26t_32x4d")
    tr.save_hub_folder("ecaresnext26t_32x4d", reference, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "ecaresnext26t_32x4d" and config["num_features"] == 2048
    assert config["pretrained_cfg"]["first_conv"] == "conv1.0"
    with safe_open(tmp_path / "model.safetensors", "np") as f:
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("bn1.num_batches_tracked").dtype == np.int64
        assert f.get_tensor("conv1.0.weight").dtype == np.float32
        assert set(f.keys()) == set(reference.state_dict())


@pytest.mark.parametrize("name", [params(n, SLOW_PARITY) for n in FACTS])
def test_hub_folder_converts_and_matches_reference(name, tmp_path, capsys) -> None:
    reference = tr.random_reference(name, seed=3)
    hub, dst = tmp_path / "hub", tmp_path / "dst"
    tr.save_hub_folder(name, reference, hub)
    rc, out, err = run(capsys, hub, dst)
    assert rc == 0, err
    assert out.splitlines()[0] == f"{name}, k=5,5,5,7, 1000 classes, {FACTS[name][2]:,} params"
    model = eca_flax.load_pretrained(dst)
    meta = pretrained.read_model_json(dst)
    assert (meta["arch"], meta["params"], meta["preprocessing"]["origin"]) == (
        name,
        FACTS[name][2],
        "config.json",
    )
    # The model's own size and another, odd at the last stages (72 -> 36 -> 18 -> 9 -> 5):
    # the avg-down pools' partial windows. The deepest and the pruned (compiled whole) only at
    # 72: their layers are the others', and a second size costs each 5-8 s of compiling.
    for size in (72,) if name in ONE_SIZE else (model_size(name), 72):
        x = np.random.default_rng(size).standard_normal((1, size, size, 3)).astype(np.float32)
        want, got = torch_logits(reference, x), eager_logits(model, x)
        relative = np.abs(got - want).max() / np.abs(want).max()
        with capsys.disabled():  # the figure, shown with -s (run's capsys holds the rest)
            print(f"{name} @{size}: max|dlogit|/max|logit| = {relative:.2e}")
        assert relative <= RTOL, (size, relative)
    # --to-torch writes timm's keys back: a strict load into a fresh reference, equal tensors.
    exported = tmp_path / "back.safetensors"
    rc, _, err = run(capsys, "--to-torch", dst, exported)
    assert rc == 0, err
    from safetensors.torch import load_file

    fresh = tr.build(name)
    fresh.load_state_dict(load_file(exported), strict=True)
    back = fresh.state_dict()
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(back[key], value, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ecaresnet50d_pruned", "ecaresnet101d_pruned"])
def test_pruned_widths_come_from_the_tensors(name: str) -> None:
    """Each pruned model is recognised by its own widths; other widths are named, not guessed."""
    sd = tr.numpy_state_dict(tr.build(name))
    spec = convert.infer_arch(sd)
    assert spec == convert.ArchSpec(name, (5, 5, 5, 7), 1000, "eca")
    model = registry.abstract_model(name, spec.k_size, 1000, "eca", "float32")
    shapes = {
        convert.path_to_torch_key(p): v.shape for p, v in registry.weight_paths(model).items()
    }
    for key in ("layer3.4.conv2.weight", "layer4.0.conv3.weight", "fc.weight"):
        assert convert.to_torch_layout(np.zeros(shapes[key], np.int8)).shape == sd[key].shape
    sd["layer2.1.conv1.weight"] = np.zeros((99,) + sd["layer2.1.conv1.weight"].shape[1:])
    with pytest.raises(convert.ConversionError, match="none of timm's ECA-ResNets"):
        convert.infer_arch(sd)


@pytest.mark.slow
def test_bare_files_convert(tmp_path: Path, capsys) -> None:
    """A bare .safetensors, .bin or .pth state_dict converts too (preprocessing: the registry's
    first tag), 'module.' prefixes and all."""
    name = "ecaresnext26t_32x4d"
    reference = tr.random_reference(name, seed=5)
    sd = reference.state_dict()
    save_file(tr.numpy_state_dict(reference), tmp_path / "a.safetensors")
    torch.save(sd, tmp_path / "b.bin")
    torch.save({"module." + k: v for k, v in sd.items()}, tmp_path / "c.pth")
    x = np.random.default_rng(0).standard_normal((1, 64, 64, 3)).astype(np.float32)
    want = torch_logits(reference, x)
    for src in ("a.safetensors", "b.bin", "c.pth"):
        rc, out, err = run(capsys, tmp_path / src, tmp_path / f"{src}.out")
        assert rc == 0, err
        assert "eval preprocessing (timm's defaults): resize 256 bicubic, center crop 224" in out
        got = eager_logits(eca_flax.load_pretrained(tmp_path / f"{src}.out"), x)
        assert np.abs(got - want).max() / np.abs(want).max() <= RTOL


# ------------------------------------------------------------------------------------------
# Bad input: one clear line, nothing written.


@pytest.fixture(scope="module")
def hub26t(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """ecaresnet26t's random-weight reference as a Hub folder (tag ra2_in1k: 256 / 320)."""
    reference = tr.random_reference("ecaresnet26t", seed=1)
    path = tmp_path_factory.mktemp("hub26t")
    tr.save_hub_folder("ecaresnet26t", reference, path)
    return path, reference


@pytest.fixture(scope="module")
def dst26t(hub26t, tmp_path_factory) -> Path:
    """hub26t converted with --verify (the PyTorch reference agrees before anything is written)."""
    dst = tmp_path_factory.mktemp("dst26t") / "ecaresnet26t"
    assert CLI.main([str(hub26t[0]), str(dst), "--verify"]) == 0
    return dst


def test_verify_and_recorded_preprocessing(dst26t: Path, capsys) -> None:
    meta = pretrained.read_model_json(dst26t)
    pre = meta["preprocessing"]
    assert (meta["image_size"], meta["resize_size"]) == (320, 336)  # floor(320 / 0.95)
    assert (pre["input_size"], pre["crop_pct"], pre["test_input_size"]) == (256, 0.875, 320)
    assert (pre["test_crop_pct"], pre["interpolation"], pre["tag"]) == (0.95, "bicubic", "ra2_in1k")
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]


def test_config_json_contradicting_the_tensors(hub26t, tmp_path, capsys) -> None:
    src = tmp_path / "hub"
    src.mkdir()
    (src / "model.safetensors").symlink_to(hub26t[0] / "model.safetensors")
    config = json.loads((hub26t[0] / "config.json").read_text())
    for arch, fragment in (
        ("ecaresnet50t", "config.json says architecture 'ecaresnet50t'"),
        ("resnet26t", "'resnet26t' (not a model eca_flax knows)"),
    ):
        (src / "config.json").write_text(json.dumps({**config, "architecture": arch}))
        rc, out, err = run(capsys, src, tmp_path / "dst")
        one_line_error(rc, err, fragment, "the weights hold ecaresnet26t, k=5,5,5,7, 1000 classes")
        assert not (tmp_path / "dst").exists()
    (src / "config.json").write_text(json.dumps({**config, "num_classes": 10}))
    rc, out, err = run(capsys, src, tmp_path / "dst")
    one_line_error(rc, err, "config.json says num_classes 10")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("crop_pct", 0, "pretrained_cfg.crop_pct must be a number in (0, 1], got 0"),
        ("test_crop_pct", -0.5, "pretrained_cfg.test_crop_pct must be a number in (0, 1]"),
        ("input_size", [3, 0, 0], "pretrained_cfg.input_size must be a positive size"),
        (
            "interpolation",
            "lanczos",
            "pretrained_cfg.interpolation must be 'bilinear' or 'bicubic'",
        ),
        ("std", [0.2, 0, 0.2], "pretrained_cfg.std must be 3 numbers > 0, got [0.2, 0, 0.2]"),
    ],
)
def test_config_json_values_it_cannot_use(hub26t, tmp_path, capsys, key, value, message):
    """Issue 31, finding 9: crop_pct 0 in config.json was a ZeroDivisionError traceback; each
    value the converter cannot use is one line naming the file, the key and the value, before
    the weights are read, nothing written."""
    src = tmp_path / "hub"
    src.mkdir()
    (src / "model.safetensors").symlink_to(hub26t[0] / "model.safetensors")
    config = json.loads((hub26t[0] / "config.json").read_text())
    config["pretrained_cfg"][key] = value
    (src / "config.json").write_text(json.dumps(config))
    rc, _, err = run(capsys, src, tmp_path / "dst")
    one_line_error(rc, err, f"{src / 'config.json'}: {message}")
    assert not (tmp_path / "dst").exists()


def test_unknown_architecture(tmp_path: Path, capsys) -> None:
    """timm's resnet26d layout (deep stem, avg-down, no ECA), and a timm-layout ResNet-50-T
    whose stem is neither deep nor tiered: no such ECA model."""
    layers = ((2, 2, 2, 2), (64, 128, 256, 512))
    d = resnet.Design(stem="deep", avg_down=True, attention_name="se")
    resnet26d = tr.numpy_state_dict(tr.TimmResNet(layers[0], d, attention=None))
    save_file(resnet26d, tmp_path / "resnet26d.safetensors")
    rc, _, err = run(capsys, tmp_path / "resnet26d.safetensors", tmp_path / "dst")
    one_line_error(rc, err, "deep stem, 2,2,2,2 Bottleneck blocks", "none of timm's ECA-ResNets")
    sd = tr.numpy_state_dict(tr.build("ecaresnet50t"))
    sd["conv1.0.weight"] = np.zeros((16, 3, 3, 3), np.float32)
    save_file(sd, tmp_path / "odd.safetensors")
    rc, _, err = run(capsys, tmp_path / "odd.safetensors", tmp_path / "dst")
    one_line_error(rc, err, "conv1.0.weight has 16 filters")
    assert not (tmp_path / "dst").exists()


def test_byobnet_state_dict_outside_the_family(tmp_path: Path, capsys) -> None:
    """A synthetic timm byobnet resnet33ts state_dict (its key layout, small shapes, no ECA:
    eca_resnet33ts itself converts since issue 30, tests/test_timm_families.py)."""
    f = np.float32
    sd = {
        "stem.conv1.conv.weight": np.zeros((24, 3, 3, 3), f),
        "stem.conv1.bn.weight": np.ones(24, f),
        "stem.conv2.conv.weight": np.zeros((32, 24, 3, 3), f),
        "stem.conv3.conv.weight": np.zeros((64, 32, 3, 3), f),
        "stages.0.0.conv1_1x1.conv.weight": np.zeros((64, 64, 1, 1), f),
        "stages.0.0.conv2_kxk.conv.weight": np.zeros((64, 64, 3, 3), f),
        "stages.0.0.conv3_1x1.conv.weight": np.zeros((256, 64, 1, 1), f),
        "final_conv.conv.weight": np.zeros((1280, 256, 1, 1), f),
        "head.fc.weight": np.zeros((1000, 1280), f),
    }
    save_file(sd, tmp_path / "eca_resnet33ts.safetensors")
    rc, _, err = run(capsys, tmp_path / "eca_resnet33ts.safetensors", tmp_path / "dst")
    one_line_error(rc, err, "a byobnet without ECA (e.g. resnet33ts", "not an ECA model")
    assert not (tmp_path / "dst").exists()
    rc, _, err = run(capsys, tmp_path, tmp_path / "dst")  # a folder without config.json
    one_line_error(rc, err, "is a directory without config.json")


# ------------------------------------------------------------------------------------------
# Eval preprocessing: each model's own, PIL-exact; the original's unchanged.


def facts_transform(path: str, size: int, crop_pct: float | None, filter_) -> np.ndarray:
    """timm's eval transform as the facts state it (crop_mode center): scale = floor(size /
    crop_pct), resize the shorter side, center crop, /255, normalize. ``crop_pct`` None: the
    original's Resize(256) + CenterCrop(224) ratio, round(size * 256 / 224)."""
    image = Image.open(path).convert("RGB")
    scale = math.floor(size / crop_pct) if crop_pct else round(size * 256 / 224)
    w, h = image.size
    new = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
    image = image.resize(new, filter_)
    top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
    x = np.asarray(image.crop((left, top, left + size, top + size)), np.float32) / 255
    return (x - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])


def sample_photos() -> list[str]:
    from sklearn.datasets import load_sample_images

    files = load_sample_images().filenames
    assert sorted(Path(f).name for f in files) == ["china.jpg", "flower.jpg"]
    return files


def test_preprocess_for_eval_is_the_models_own(dst26t: Path) -> None:
    for photo in sample_photos():
        data = Path(photo).read_bytes()
        got = preprocess_for_eval(data, weights=dst26t)  # test size 320, crop_pct 0.95, bicubic
        want = facts_transform(photo, 320, 0.95, Image.BICUBIC)
        assert got.shape == (320, 320, 3)
        assert np.abs(got - want).mean() <= 0.01  # the done-when's bound; PIL-exact: ~1e-7
        # timm's train-size eval (the facts' example: 256 at crop_pct 0.875 -> resize 292)
        got = preprocess_for_eval(data, 256, 292, weights=dst26t)
        assert np.abs(got - facts_transform(photo, 256, 0.875, Image.BICUBIC)).mean() <= 0.01
        # another crop keeps the model's crop_pct: floor(288 / 0.95) = 303
        got = preprocess_for_eval(data, 288, weights=dst26t)
        assert np.abs(got - facts_transform(photo, 288, 0.95, Image.BICUBIC)).mean() <= 0.01
        # bilinear is not within the bound's reach of bicubic by accident
        bilinear = preprocess_for_eval(data, weights=dst26t, interpolation="bilinear")
        assert np.abs(bilinear - want).max() > 0.05


def test_original_preprocessing_unchanged(tmp_path: Path, capsys) -> None:
    """The original's models: Resize(256) + CenterCrop(224), bilinear, with or without weights."""
    torch.save(tr.build("eca_resnet18").state_dict(), tmp_path / "r18.pth")
    r18 = tmp_path / "r18.safetensors"
    assert run(capsys, tmp_path / "r18.pth", r18)[0] == 0
    assert "preprocessing" not in pretrained.read_model_json(r18)
    for photo in sample_photos():
        data = Path(photo).read_bytes()
        want = facts_transform(photo, 224, None, Image.BILINEAR)
        for got in (
            preprocess_for_eval(data),
            preprocess_for_eval(data, 224),
            preprocess_for_eval(data, weights=r18),
        ):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)  # the same uint8 pixels
    meta = pretrained.read_model_json(r18)
    from eca_flax import predict

    assert predict.eval_size(meta, None) == (224, 256, "bilinear")
    assert predict.eval_size(meta, 160) == (160, None, "bilinear")  # None: the 256/224 rule
    c = cfg.default_config()
    c.update(model="eca_resnet18", eval_only=True, init_from=str(r18))
    c.image_size = 160
    resolved = cfg.resolve_config(c)
    assert (resolved.eval_image_size, resolved.eval_resize_size) == (160, -1)
    assert resolved.eval_interpolation == "bilinear"


def test_predict_and_eval_only_use_the_models_preprocessing(dst26t: Path, capsys) -> None:
    from eca_flax import predict

    meta = pretrained.read_model_json(dst26t)
    assert predict.eval_size(meta, None) == (320, 336, "bicubic")
    assert predict.eval_size(meta, 256) == (256, 269, "bicubic")  # floor(256 / 0.95)
    photo = sample_photos()[0]
    assert predict.main(["--weights", str(dst26t), "--top", "3", photo]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"{photo}:" and len(re.findall(r"^  \d\. ", out, re.M)) == 3
    c = cfg.default_config()
    c.update(model="ecaresnet26t", eval_only=True, init_from=str(dst26t))
    r = cfg.resolve_config(c)
    assert (r.eval_image_size, r.eval_resize_size, r.eval_interpolation) == (320, 336, "bicubic")
    c.update(eval_image_size=288, eval_interpolation="bilinear")  # config fields override it
    r = cfg.resolve_config(c)
    assert (r.eval_image_size, r.eval_resize_size, r.eval_interpolation) == (288, 303, "bilinear")


# ------------------------------------------------------------------------------------------
# Training.


def test_rsb_a3_config_resolves() -> None:
    """configs/ecaresnet50t_rsb_a3.py: timm's ecaresnet50t.a3_in1k (A3: 160 px, test 224 at
    crop_pct 0.95, bicubic; LAMB 8e-3 per 2048, BCE at 0.2, RandAugment m6)."""
    c = cfg.resolve_config(load_config("ecaresnet50t_rsb_a3"))
    assert (c.model, c.recipe, c.optimizer, c.learning_rate, c.loss) == (
        "ecaresnet50t",
        "rsb_a3",
        "lamb",
        8e-3,
        "bce",
    )
    assert (c.image_size, c.eval_image_size, c.eval_resize_size) == (160, 224, 235)
    assert c.eval_resize_size == math.floor(224 / 0.95) and c.eval_interpolation == "bicubic"
    assert (c.batch_size, c.num_epochs, c.randaugment) == (2048, 100, "rand-m6-mstd0.5-inc1")
    a3 = next(t for t in eca_flax.model_info("ecaresnet50t").tags if t.tag == "a3_in1k")
    assert (a3.input_size, a3.test_size, a3.top1) == (c.image_size, c.eval_image_size, 79.548)


@pytest.mark.slow
def test_rsb_a3_config_trains_a_step(tmp_path: Path) -> None:
    """``train.py --config configs/ecaresnet50t_rsb_a3.py``: two steps of the A3 recipe on the
    digits at 32 px, then evaluation and the exported model (bicubic recorded).

    The recipe is the subject, and a timm ECA-ResNet training through train.py: ecaresnet26t,
    the same network as the config's ecaresnet50t (tiered stem, avg-down shortcuts) with 8
    blocks instead of 16, half the compile. One device (test_train.py checks device counts),
    XLA compiling for compile speed (faults.FAST_COMPILE)."""
    fields = dict(
        model="ecaresnet26t",
        dataset="digits:32",
        image_size=32,
        eval_image_size=32,
        eval_resize_size=36,
        batch_size=8,
        eval_batch_size=64,
        num_train_steps=2,
        log_every_steps=1,
    )
    proc = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "configs/ecaresnet50t_rsb_a3.py",
            "--workdir",
            str(tmp_path / "run"),
            *(f"--config.{k}={v}" for k, v in fields.items()),
        ],
        cwd=REPO,
        env=trainer_env(1, XDG_CACHE_HOME=str(tmp_path / "xdg")),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    losses = re.findall(r"step (\d+)/2 .* loss ([0-9.]+) ", proc.stdout)
    assert [int(step) for step, _ in losses] == [1, 2], proc.stdout
    assert all(math.isfinite(float(loss)) for _, loss in losses)
    assert re.search(r"final step=2 top1=[0-9.]+ top5=[0-9.]+ images=360", proc.stdout)
    meta = pretrained.read_model_json(tmp_path / "run" / "pretrained")
    assert meta["arch"] == "ecaresnet26t" and meta["preprocessing"]["interpolation"] == "bicubic"
