"""The COCO detection releases: an ECA-ResNet backbone read out of an mmdetection checkpoint.

Fixtures are written as mmdetection saves a detector: ``torch.save({"meta": {...},
"state_dict": {...}})`` with the ResNet under ``backbone.`` (the PyTorch reference with random
weights and BatchNorm statistics) and the detector's own tensors (an FPN neck, RPN / RoI /
mask / RetinaNet heads, named and shaped as mmdetection names and shapes them; zeros, since
they are never converted) beside it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

import eca_flax
from eca_flax import predict
from eca_flax.models import torch_reference as tr
from eca_flax.training import config as cfg
from eca_flax.training import start
from eca_flax.weights import verify
from eca_flax.weights.pretrained import save_pretrained

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("convert_cli", ROOT / "convert_torch_weights.py")
CLI = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(CLI)

# C2-C5 must equal the reference's layer1..layer4 outputs to this, relative to the largest
# |feature| of the stage (the figure, verify.VERIFY_TOLERANCE). Derivation: the two
# sides differ only in float32 summation order (oneDNN vs XLA:CPU convolutions, AVX-512 or
# not). Each conv's output then differs by about eps * sqrt(fan_in) relative (eps = 1.2e-7,
# fan_in <= 3*3*512 = 4608: <= 8e-6, typically ~1e-6 as the errors are not all of one sign),
# and with the residual branches damped (torch_reference.residual_scale) these errors add up
# over the 16-33 blocks rather than grow: a few 1e-6 measured, 1e-4 leaves >10x margin. Any
# real conversion error is far outside: 'SAME' padding moves outputs ~3e-2, a flipped ECA
# kernel ~1e-1 (facts file), a transposed conv kernel or swapped BN statistics O(1).
TOLERANCE = verify.VERIFY_TOLERANCE
HEIGHT, WIDTH = 96, 64  # non-square: a transposed H/W anywhere changes the feature shapes

META_V1 = {  # what mmdetection 1.x (the authors' era, early 2020) put in 'meta'
    "mmdet_version": "1.0rc1+c2ba6e6",
    "config": "model = dict(\n    type='MaskRCNN',\n    backbone=dict(type='ECAResNet', depth=50))",
    "CLASSES": ("person", "bicycle", "car"),
    "epoch": 12,
    "iter": 87960,
    "mmcv_version": "0.2.16",
    "time": "Thu Mar  5 10:11:12 2020",
}


def run(capsys, *args) -> tuple[int, str, str]:
    """The converter's CLI in-process: exit status, stdout, stderr."""
    rc = CLI.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(rc: int, err: str, *fragments: str) -> str:
    """A failed run: status 1, one 'error: ' line holding every fragment."""
    assert rc == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def zeros(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


def conv(name: str, out: int, inp: int, k: int, bias: bool = True) -> dict[str, torch.Tensor]:
    """mmdetection's ConvModule (``name.conv.weight``) or a bare Conv2d (``name.weight``)."""
    tensors = {f"{name}.weight": zeros(out, inp, k, k)}
    if bias:
        tensors[f"{name}.bias"] = zeros(out)
    return tensors


def fpn(levels: range, extra: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """FPN neck over ResNet outputs ``levels`` (0 = C2) to 256 channels, plus extra convs."""
    widths = (256, 512, 1024, 2048)
    tensors: dict[str, torch.Tensor] = {}
    for i, level in enumerate(levels):
        tensors |= conv(f"neck.lateral_convs.{i}.conv", 256, widths[level], 1)
    for i in range(len(levels)):
        tensors |= conv(f"neck.fpn_convs.{i}.conv", 256, 256, 3)
    for i, inp in enumerate(extra, start=len(levels)):
        tensors |= conv(f"neck.fpn_convs.{i}.conv", 256, inp, 3)
    return tensors


def detector_parts(kind: str) -> dict[str, torch.Tensor]:
    """The non-backbone tensors of an mmdetection detector on a ResNet-50/101 with FPN."""
    if kind == "retinanet":  # bbox_head: 4+4 convs, 9 anchors x 80 classes
        tensors = fpn(range(1, 4), extra=(2048, 256))
        for branch in ("cls_convs", "reg_convs"):
            for i in range(4):
                tensors |= conv(f"bbox_head.{branch}.{i}.conv", 256, 256, 3)
        return (
            tensors
            | conv("bbox_head.retina_cls", 720, 256, 3)
            | conv("bbox_head.retina_reg", 36, 256, 3)
        )
    tensors = fpn(range(4))
    tensors |= conv("rpn_head.rpn_conv", 256, 256, 3)
    tensors |= conv("rpn_head.rpn_cls", 3, 256, 1) | conv("rpn_head.rpn_reg", 12, 256, 1)
    bbox = "bbox_head" if kind == "faster_rcnn_v1" else "roi_head.bbox_head"  # mmdet 1.x / 2.x
    tensors |= {
        f"{bbox}.shared_fcs.0.weight": zeros(1024, 256 * 7 * 7),
        f"{bbox}.shared_fcs.0.bias": zeros(1024),
        f"{bbox}.shared_fcs.1.weight": zeros(1024, 1024),
        f"{bbox}.shared_fcs.1.bias": zeros(1024),
        f"{bbox}.fc_cls.weight": zeros(81, 1024),
        f"{bbox}.fc_cls.bias": zeros(81),
        f"{bbox}.fc_reg.weight": zeros(320, 1024),
        f"{bbox}.fc_reg.bias": zeros(320),
    }
    if kind == "mask_rcnn":
        for i in range(4):
            tensors |= conv(f"roi_head.mask_head.convs.{i}.conv", 256, 256, 3)
        tensors |= conv("roi_head.mask_head.upsample", 256, 256, 2)
        tensors |= conv("roi_head.mask_head.conv_logits", 80, 256, 1)
    return tensors


def save_detector(
    path: Path, backbone: dict[str, torch.Tensor], kind: str, meta: dict | None = None
) -> Path:
    """torch.save a detector as mmdetection does: {'meta', 'state_dict'}, legacy format (the
    PyTorch 1.1-1.4 of mmdetection 1.x), backbone tensors first as in the model's order."""
    state = {f"backbone.{k}": v for k, v in backbone.items()} | detector_parts(kind)
    checkpoint = {"meta": dict(META_V1 if meta is None else meta), "state_dict": state}
    torch.save(checkpoint, path, _use_new_zipfile_serialization=False)
    return path


def backbone_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A classification model's state_dict without fc: what a detector's ResNet holds."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}


def shaped_zeros(name: str, **kw) -> dict[str, torch.Tensor]:
    """Zeros with the reference's backbone keys and shapes (for inputs that never convert)."""
    with torch.device("meta"):
        model = tr.build(name, **kw)
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in backbone_of(model).items()}


def resnext50_32x4d() -> dict[str, torch.Tensor]:
    """mmdetection's ResNeXt-50 32x4d backbone keys and shapes (faster_rcnn_x50_32x4d_fpn)."""
    tensors = conv("conv1", 64, 3, 7, bias=False) | bn("bn1", 64)
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        width = planes * 2  # planes * base_width (4) / 64 * groups (32)
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            tensors |= conv(f"{p}.conv1", width, inplanes, 1, bias=False) | bn(f"{p}.bn1", width)
            tensors |= {f"{p}.conv2.weight": zeros(width, width // 32, 3, 3)} | bn(
                f"{p}.bn2", width
            )
            tensors |= conv(f"{p}.conv3", planes * 4, width, 1, bias=False)
            tensors |= bn(f"{p}.bn3", planes * 4)
            if b == 0:
                tensors |= conv(f"{p}.downsample.0", planes * 4, inplanes, 1, bias=False)
                tensors |= bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    return tensors


def bn(name: str, c: int) -> dict[str, torch.Tensor]:
    leaves = ("weight", "bias", "running_mean", "running_var")
    return {f"{name}.{leaf}": zeros(c) for leaf in leaves} | {
        f"{name}.num_batches_tracked": torch.tensor(0)
    }


# ------------------------------------------------------------------------------------------
# The two released backbones: convert with no flag, C2-C5 exact, export back under backbone.


@pytest.mark.parametrize(
    "name, k_size, kind",
    [
        pytest.param(  # mask_rcnn_ecanet50_k3377_bs8_lr0.01
            "eca_resnet50", (3, 3, 7, 7), "mask_rcnn", marks=pytest.mark.slow
        ),
        pytest.param(  # RetinaNet_ecanet101_k3357_bs8_lr0.01
            "eca_resnet101", (3, 3, 5, 7), "retinanet", marks=pytest.mark.slow
        ),
    ],
)
def test_released_detector_backbone(name, k_size, kind, tmp_path, capsys):
    ref = tr.random_reference(name, seed=3, k_size=k_size)
    src = save_detector(tmp_path / f"{kind}_{name}.pth", backbone_of(ref), kind)
    parts = detector_parts(kind)
    dst = tmp_path / "backbone"
    rc, out, err = run(capsys, src, dst, "--backbone-only")
    assert rc == 0, err
    params = sum(p.numel() for k, p in ref.named_parameters() if not k.startswith("fc."))
    tops = list(dict.fromkeys(k.split(".")[0] for k in parts))
    k = ",".join(map(str, k_size))
    assert out.splitlines()[0] == (
        f"{name}, k={k}, backbone (no classifier), {params:,} params, epoch 12, from a detector "
        f"(mmdet 1.0rc1+c2ba6e6); {', '.join(tops)}: {len(parts)} tensors not converted "
        "(detector parts)"
    )
    meta = json.loads((dst / "model.json").read_text())
    assert (meta["arch"], meta["k_size"], meta["num_classes"]) == (name, list(k_size), 0)
    assert meta["epoch"] == 12 and meta["params"] == params
    assert meta["backbone"]["prefix"] == "backbone."
    assert meta["backbone"]["left_out"] == {t: sum(x.startswith(t) for x in parts) for t in tops}
    assert meta["backbone"]["mmdet_meta"] == {**META_V1, "CLASSES": list(META_V1["CLASSES"])}

    # C2-C5 against the reference's layer1..layer4, eager (no compile of a whole ResNet-101).
    model = eca_flax.load_pretrained(dst)
    x = np.random.default_rng(1).standard_normal((2, HEIGHT, WIDTH, 3)).astype(np.float32)
    want = tr.stage_features(ref, x)
    got = [np.asarray(f) for f in model.stage_features(x)]
    for i, (f, stride) in enumerate(zip(got, (4, 8, 16, 32))):
        assert f.shape == (2, HEIGHT // stride, WIDTH // stride, 256 * 2**i)
    result = verify.compare_features(want, got)
    with capsys.disabled():  # the measured figures, in the test log
        print(f"\n{name} {kind} {HEIGHT}x{WIDTH}: {result.describe()}")
    assert result.ok and max(result.relative) <= TOLERANCE, result.describe()
    with pytest.raises(TypeError, match="backbone without a classifier.*stage_features"):
        model(x)

    # Back to PyTorch: under backbone., every key used, only fc.* missing once it is removed.
    back = tmp_path / "back.pth"
    rc, out, err = run(capsys, "--to-torch", dst, back)
    assert rc == 0, err
    assert "under backbone." in out
    exported = torch.load(back, map_location="cpu", weights_only=True)
    assert all(key.startswith("backbone.") for key in exported)
    stripped = {key.removeprefix("backbone."): v for key, v in exported.items()}
    with torch.device("meta"):
        fresh = tr.build(name, k_size=k_size)
    result = fresh.load_state_dict(stripped, strict=False, assign=True)
    assert result.unexpected_keys == [] and sorted(result.missing_keys) == ["fc.bias", "fc.weight"]
    for key, value in backbone_of(ref).items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(stripped[key], value), key


@pytest.mark.slow
def test_faster_rcnn_k5_and_plain_resnet_backbones(tmp_path, capsys):
    """faster_rcnn_ecanet50_k5 (mmdetection 1.x keys, bbox_head at the top, zip format) and a
    plain ResNet backbone (mmdetection's own r18 detectors): attention=None, features exact."""
    k5 = tmp_path / "faster_rcnn_ecanet50_k5.pth"
    state = {f"backbone.{k}": v for k, v in shaped_zeros("eca_resnet50", k_size=5).items()}
    meta = {"mmdet_version": "1.1.0", "config": "", "CLASSES": None}  # meta without an epoch
    torch.save({"meta": meta, "state_dict": state | detector_parts("faster_rcnn_v1")}, k5)
    rc, out, err = run(capsys, k5, tmp_path / "k5", "--backbone-only")
    assert rc == 0, err
    assert out.startswith("eca_resnet50, k=5,5,5,5, backbone (no classifier), ")
    assert "params, from a detector (mmdet 1.1.0); neck, rpn_head, bbox_head: " in out

    ref = tr.random_reference("eca_resnet18", seed=5, attention=None)
    src = save_detector(tmp_path / "retinanet_r18.pth", backbone_of(ref), "retinanet")
    rc, out, err = run(capsys, src, tmp_path / "r18", "--backbone-only")
    assert rc == 0, err
    assert out.startswith("eca_resnet18 without ECA layers (attention=None, the plain baseline)")
    assert "note: no ECA layers" in out
    model = eca_flax.load_pretrained(tmp_path / "r18")
    x = np.random.default_rng(2).standard_normal((1, HEIGHT, WIDTH, 3)).astype(np.float32)
    result = verify.compare_features(tr.stage_features(ref, x), model.stage_features(x))
    assert result.ok, result.describe()


# ------------------------------------------------------------------------------------------
# Using the converted backbone: a new head, init_from, the converter's own output again.


@pytest.fixture(scope="module")
def r18(tmp_path_factory) -> tuple[torch.nn.Module, Path, Path]:
    """An ECA-ResNet-18 (k 3,5,7,7) detector file and its converted backbone."""
    root = tmp_path_factory.mktemp("r18")
    ref = tr.random_reference("eca_resnet18", seed=9)
    src = save_detector(root / "faster_rcnn_r18.pth", backbone_of(ref), "faster_rcnn_v2")
    assert CLI.main([str(src), str(root / "converted"), "--backbone-only"]) == 0
    return ref, src, root / "converted"


@pytest.mark.slow
def test_new_head_and_init_from(r18, tmp_path, capsys):
    ref, _, dst = r18
    tuned = eca_flax.load_pretrained(dst, num_classes=7)
    assert tuned.fc.kernel.shape == (512, 7)
    x = np.random.default_rng(3).standard_normal((1, HEIGHT, WIDTH, 3)).astype(np.float32)
    assert np.asarray(tuned(x)).shape == (1, 7)
    np.testing.assert_array_equal(
        np.asarray(tuned.layer3[0].conv2.kernel[...]),
        ref.layer3[0].conv2.weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    # A classifier's file loads as a backbone too (num_classes=0).
    classifier = tmp_path / "classifier"
    save_pretrained(tuned, classifier, arch="eca_resnet18", attention="eca")
    body = eca_flax.load_pretrained(classifier, num_classes=0)
    assert body.fc is None and np.array_equal(body.bn1.mean[...], tuned.bn1.mean[...])
    # predict has no classes to give.
    assert predict.main(["--weights", str(dst), str(tmp_path / "cat.jpg")]) == 1
    assert "a backbone without a classifier" in capsys.readouterr().err

    config = cfg.default_config()
    config.model, config.image_size, config.batch_size = "eca_resnet18", 32, 8
    config.init_from = str(dst)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("eca_flax")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        model, source = start.build_model(cfg.resolve_config(config), 10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert "new 10-class head" in source and model.fc.kernel.shape == (512, 10)
    assert any("is a backbone without a classifier" in r and "10-class head" in r for r in records)
    config.eval_only = True
    with pytest.raises(cfg.ConfigError, match="backbone without a classifier"):
        start.build_model(cfg.resolve_config(config), 10)


def test_exported_backbone_converts_again(r18, tmp_path, capsys):
    ref, _, dst = r18
    back = tmp_path / "backbone.pth"
    assert run(capsys, "--to-torch", dst, back)[0] == 0
    rc, out, err = run(capsys, back, tmp_path / "again")  # a bare state_dict under backbone.
    assert rc == 0, err
    assert "no detector parts besides the backbone" in out
    again = eca_flax.load_pretrained(tmp_path / "again")
    np.testing.assert_array_equal(
        np.asarray(again.layer4[1].eca.conv.kernel[...]).ravel(),
        ref.layer4[1].eca.conv.weight.detach().numpy().ravel(),
    )


@pytest.mark.slow
def test_verify_compares_features(r18, tmp_path, capsys):
    _, src, _ = r18
    rc, out, err = run(capsys, src, tmp_path / "verified", "--verify", "--backbone-only")
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.startswith("verify"))
    assert "C2 " in line and "C5 " in line and line.endswith(": OK")


# ------------------------------------------------------------------------------------------
# Bad input: one line each, nothing written.


def test_backbones_that_are_not_eca_resnets(tmp_path, capsys):
    dst = tmp_path / "out"
    cases = {
        # mmdetection's ResNeXt-50 32x4d: ResNet keys, grouped 3x3 convolutions.
        "resnext": (
            resnext50_32x4d(),
            "backbone.layer1.0.conv2.weight has shape (128, 4, 3, 3), a grouped 3x3 "
            "convolution (32 groups",
        ),
        # Swin-T (mask_rcnn_swin-t): no ResNet keys at all.
        "swin": (
            {"patch_embed.projection.weight": zeros(96, 3, 4, 4)}
            | {"patch_embed.projection.bias": zeros(96), "patch_embed.norm.weight": zeros(96)}
            | {"stages.0.blocks.0.attn.w_msa.qkv.weight": zeros(288, 96)},
            "backbone.patch_embed.projection.weight is not a key of the classification "
            "ECA-ResNets",
        ),
        # ResNetV1d (deep stem): stem.* instead of conv1 / bn1.
        "resnet50_v1d": (
            conv("stem.0", 32, 3, 3, bias=False) | bn("stem.1", 32)
            | {k: v for k, v in shaped_zeros("eca_resnet50", attention=None).items()
               if not k.startswith(("conv1", "bn1"))},
            "backbone.stem.0.weight is not a key",
        ),
        # The authors' fork is not public: ECA modules under another name give the first one.
        "renamed_eca": (
            {k.replace(".eca.", ".eca_layer."): v
             for k, v in shaped_zeros("eca_resnet50", k_size=(3, 3, 7, 7)).items()},
            "backbone.layer1.0.eca_layer.conv.weight is not a key of the classification "
            "ECA-ResNets (conv1, bn1, layerS.B.convN/bnN/eca.conv/downsample); 15 more keys",
        ),
    }  # fmt: skip
    for what, (backbone, fragment) in cases.items():
        src = save_detector(tmp_path / f"{what}.pth", backbone, "faster_rcnn_v2")
        line = one_error(*run(capsys, src, dst, "--backbone-only")[::2], str(src), fragment)
        assert "the detector's backbone is not an ECA-ResNet" in line, line
        assert not dst.exists()


def test_detection_checkpoint_without_backbone_keys(tmp_path, capsys):
    # mmdetection3d's multi-modal detectors keep their image ResNet under img_backbone.
    ref_keys = shaped_zeros("eca_resnet18")
    state = {f"img_backbone.{k}": v for k, v in ref_keys.items()}
    state |= {k.replace("neck.", "img_neck."): v for k, v in fpn(range(1, 4)).items()}
    state |= {k: v for k, v in detector_parts("retinanet").items() if k.startswith("bbox_head")}
    src = tmp_path / "mvx.pth"
    torch.save({"meta": {"mmdet_version": "2.25.0", "epoch": 40}, "state_dict": state}, src)
    dst = tmp_path / "out"
    one_error(
        *run(capsys, src, dst)[::2],
        f"{src}: a detection checkpoint with no backbone.* keys, so no backbone to convert; it "
        f"holds img_backbone ({len(ref_keys)} tensors), img_neck (12 tensors), bbox_head (20 "
        "tensors)",
    )
    assert not dst.exists()


# ------------------------------------------------------------------------------------------
# The README's commands, as written, on a random-weight Mask R-CNN file.


@pytest.mark.slow
def test_readme_detection_commands(tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### COCO detection backbones") :]
    section = section[: section.index("\n## ")]
    command = next(
        line
        for line in re.findall(r"```bash\n(.*?)```", section, re.S)[0].splitlines()
        if line.startswith("python convert_torch_weights.py")
    )
    example = next(b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "FPN" in b)
    monkeypatch.chdir(tmp_path)
    ref = tr.random_reference("eca_resnet50", seed=4, k_size=(3, 3, 7, 7))
    _, _, src, dst, *_ = shlex.split(command)
    save_detector(tmp_path / src, backbone_of(ref), "mask_rcnn")
    rc, out, err = run(capsys, *shlex.split(command)[2:])
    assert rc == 0, err
    assert out.startswith("eca_resnet50, k=3,3,7,7, backbone (no classifier), 23,508,116 params")
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    shapes = [tuple(namespace[p].shape) for p in ("p3", "p4", "p5")]
    assert shapes == [(1, 48, 64, 256), (1, 24, 32, 256), (1, 12, 16, 256)]
    assert "(1, 48, 64, 256) (1, 24, 32, 256) (1, 12, 16, 256)" in capsys.readouterr().out
    # The table: the six releases with the AP published in the original README.
    rows = [
        "|".join(cell.strip(" `") for cell in line.strip("|").split("|"))
        for line in section.splitlines()
        if line.startswith(("| Faster R-CNN |", "| Mask R-CNN |", "| RetinaNet |"))
    ]
    assert rows == RELEASES.strip().splitlines()


def test_release_table_is_the_original_readmes():
    """The library's table of the six releases (load_detector by name) says what the original
    README says: file, backbone, kernel sizes, box and mask AP."""
    from eca_flax.detection.settings import RELEASES as TABLE

    names = {"faster_rcnn": "Faster R-CNN", "mask_rcnn": "Mask R-CNN", "retinanet": "RetinaNet"}
    rows = [
        f"{names[r.kind]}|{r.published}|{r.arch}|{','.join(map(str, r.k_size))}|{r.box_ap}|"
        + (str(r.mask_ap) if r.mask_ap else "–")
        for r in TABLE.values()
    ]
    assert rows == RELEASES.strip().splitlines()


RELEASES = """
Faster R-CNN|faster_rcnn_ecanet50_k5_bs8_lr0.01|eca_resnet50|5,5,5,5|38.0|–
Faster R-CNN|faster_rcnn_ecanet101_3357_bs8_lr0.01|eca_resnet101|3,3,5,7|40.3|–
Mask R-CNN|mask_rcnn_ecanet50_k3377_bs8_lr0.01|eca_resnet50|3,3,7,7|39.0|35.6
Mask R-CNN|mask_rcnn_ecanet101_k3357_bs8_lr0.01|eca_resnet101|3,3,5,7|41.3|37.4
RetinaNet|RetinaNet_ecanet50_k3377_bs8_lr0.01|eca_resnet50|3,3,7,7|37.3|–
RetinaNet|RetinaNet_ecanet101_k3357_bs8_lr0.01|eca_resnet101|3,3,5,7|39.1|–
"""
