"""timm's other ECA models (issue 30): ECA-VoVNet, the ECA ByobNets (BoT, Halo), the NF ECA
networks. Parameter counts and keys against timm_eca_family2_facts.md, logits against the
plain-torch references of ``torch_reference`` (written from that file) with random,
well-conditioned weights, Hub folders converted with no flag, recorded preprocessing, stage
shapes, size rules, look-alikes outside the family.

Time: one model per family in the fast tier, at a small odd size, one jit per forward; the
default sizes and the other models are slow-marked.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file
from test_timm import one_line_error, run  # the converter in-process, as there

import eca_flax
from eca_flax.models import cpu_kernels, registry
from eca_flax.models import torch_reference as tr
from eca_flax.weights import convert, pretrained

REPO = Path(__file__).resolve().parents[1]

# The facts table: parameters (trainable), state_dict entries (BN counters included), depths.
FACTS = {
    "eca_vovnet39b": (22_600_316, 240, (1, 1, 2, 2)),
    "eca_resnet33ts": (19_676_302, 240, (2, 3, 3, 2)),
    "eca_resnext26ts": (10_297_988, 196, (2, 2, 2, 2)),
    "eca_botnext26ts_256": (10_593_301, 199, (2, 2, 2, 2)),
    "eca_halonext26ts": (10_756_885, 202, (2, 2, 2, 2)),
    "eca_nfnet_l0": (24_143_924, 185, (1, 2, 6, 3)),
    "eca_nfnet_l1": (41_407_728, 341, (2, 4, 12, 6)),
    "eca_nfnet_l2": (56_722_348, 497, (3, 6, 18, 9)),
    "eca_nfnet_l3": (72_036_968, 653, (4, 8, 24, 12)),
    "nf_ecaresnet26": (15_995_220, 97, (2, 2, 2, 2)),
    "nf_ecaresnet50": (25_557_118, 177, (3, 4, 6, 3)),
    "nf_ecaresnet101": (44_549_331, 347, (3, 4, 23, 3)),
}
# Published tags: (tag, train size, test size, test crop_pct, top-1 at the test size).
TAGS = {
    "eca_resnet33ts": ("ra2_in1k", 256, 288, 1.0, 80.716),
    "eca_resnext26ts": ("ch_in1k", 256, 288, 1.0, 78.020),
    "eca_botnext26ts_256": ("c1_in1k", 256, 256, 0.95, 79.262),
    "eca_halonext26ts": ("c1_in1k", 256, 256, 0.94, 79.518),
    "eca_nfnet_l0": ("ra2_in1k", 224, 288, 1.0, 82.590),
    "eca_nfnet_l1": ("ra2_in1k", 256, 320, 1.0, 84.062),
    "eca_nfnet_l2": ("ra3_in1k", 320, 384, 1.0, 84.710),
}
# float32 parity: JAX (XLA) and PyTorch (oneDNN) sum each conv's products in different orders,
# ~1e-7 relative rounding per op, compounding over ~40-100 layers of random weights kept well
# conditioned (torch_reference damps each residual branch): measured 1e-6 to 5e-6 relative to
# the largest logit; 1e-4 (the bound, convert's --verify tolerance) leaves 20x margin.
RTOL = 1e-4
FAST = {"eca_vovnet39b", "eca_resnext26ts", "nf_ecaresnet26"}
BIG = {
    "eca_nfnet_l2",
    "eca_nfnet_l3",
    "nf_ecaresnet101",
}  # seconds just to trace and build  # one model per family in the fast tier


def slow_unless(name: str, fast=FAST) -> pytest.param:
    return pytest.param(name, marks=[] if name in fast else [pytest.mark.slow], id=name)


def torch_forward(reference: torch.nn.Module, images: np.ndarray):
    """(logits, stage features NHWC) of a reference on NHWC images."""
    with torch.no_grad():
        x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        feats = reference.stage_features(x)
        logits = reference.head(feats[-1]).numpy()
    return logits, [f.numpy().transpose(0, 2, 3, 1) for f in feats]


def _forward(model, x):
    feats = model.stage_features(x)
    return model.head(feats[-1]), feats


def jax_forward(model, images: np.ndarray):
    """(logits, stage features) of an eca_flax model: one jit with lax's convolutions (cheaper
    than eager op-by-op here, where nearly every layer has its own shape: ~2.5 s on 2 cores).
    XLA's default options, as users run them (parity tests never trade them for compile speed).
    """
    with cpu_kernels.switch(False):
        logits, feats = nnx.jit(_forward)(model, jnp.asarray(images))
        return np.asarray(logits), [np.asarray(f) for f in feats]


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def images(size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, size, size, 3)).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Registry, parameter counts, the references against the facts.


@pytest.mark.parametrize("name", [slow_unless(n, set(FACTS) - BIG) for n in FACTS])
def test_parameter_count_exact(name: str) -> None:
    count, _, _ = FACTS[name]
    info = eca_flax.model_info(name)
    assert (info.source, info.params) == ("timm", count)
    model = registry.abstract_model(name, (), 1000, "eca", "float32")  # no init
    assert registry.count_params(model) == count
    assert registry.arch_of(model) == name
    assert name in eca_flax.list_models("timm")
    sd = tr.build(name).state_dict()
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert sum(v.numel() for k, v in sd.items() if not k.endswith(stats)) == count
    assert len(sd) == FACTS[name][1]
    # every reference key is a model path (the converter's one rule, no table)
    paths = {convert.path_to_torch_key(p) for p in registry.weight_paths(model)}
    assert paths == {k for k in sd if not k.endswith("num_batches_tracked")}


def test_k_size_is_fixed_by_timms_rule() -> None:
    assert registry.resolve_k_size("eca_vovnet39b") == ()
    assert registry.resolve_k_size("eca_vovnet39b", "adaptive") == ()
    with pytest.raises(ValueError, match="fixed by timm's rule"):
        eca_flax.create_model("eca_vovnet39b", k_size=3)


def test_vovnet_reference_matches_facts() -> None:
    sd = tr.build("eca_vovnet39b").state_dict()
    assert [k for k in sd if k.endswith("attn.conv.weight")] == [
        "stages.0.blocks.0.attn.conv.weight",
        "stages.1.blocks.0.attn.conv.weight",
        "stages.2.blocks.1.attn.conv.weight",
        "stages.3.blocks.1.attn.conv.weight",
    ]
    assert all(sd[k].shape == (1, 1, 5) for k in sd if k.endswith("attn.conv.weight"))
    concat_in = [sd[f"stages.{s}.blocks.{b}.conv_concat.conv.weight"].shape[1]
                 for s, b in ((0, 0), (1, 0), (2, 0), (2, 1), (3, 0), (3, 1))]  # fmt: skip
    assert concat_in == [768, 1056, 1472, 1728, 1888, 2144]
    assert sd["head.fc.weight"].shape == (1000, 1024)


# ------------------------------------------------------------------------------------------
# Parity: Hub-layout folders converted with no flag, logits and stage shapes.

# (model, size): each family's fast model at a small odd size; the defaults slow.
PARITY = [
    pytest.param("eca_vovnet39b", 65, id="eca_vovnet39b@65"),
    pytest.param("eca_vovnet39b", 224, id="eca_vovnet39b@224", marks=pytest.mark.slow),
    pytest.param("eca_resnext26ts", 65, id="eca_resnext26ts@65"),
    pytest.param("eca_resnext26ts", 256, id="eca_resnext26ts@256", marks=pytest.mark.slow),
    pytest.param("eca_resnet33ts", 97, id="eca_resnet33ts@97", marks=pytest.mark.slow),
    pytest.param("eca_botnext26ts_256", 256, id="eca_botnext26ts_256@256", marks=pytest.mark.slow),
    pytest.param("eca_halonext26ts", 256, id="eca_halonext26ts@256", marks=pytest.mark.slow),
    pytest.param("nf_ecaresnet26", 65, id="nf_ecaresnet26@65"),
    pytest.param("eca_nfnet_l0", (224, 97), id="eca_nfnet_l0@224,97", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("name", "size"), [p for p in PARITY if not p.marks])
def test_logits_match_reference(name: str, size: int) -> None:
    """The fast tier: the reference's state_dict loaded by the converter's key rule (the Hub
    folder round trip, ~3 s of file writing per model, is the slow test below)."""
    reference = tr.random_reference(name, seed=3)
    model = registry.empty_model(name)
    convert.load_state_dict(model, tr.numpy_state_dict(reference))
    model.eval()
    x = images(size)
    want, want_feats = torch_forward(reference, x)
    got, feats = jax_forward(model, x)
    assert relative(got, want) <= RTOL, relative(got, want)
    assert [f.shape for f in feats] == [f.shape for f in want_feats]
    assert max(relative(a, b) for a, b in zip(feats, want_feats)) <= RTOL


# The deeper NF networks (eca_nfnet_l0's and nf_ecaresnet26's blocks, tested above, repeated
# up to 48 and 33 times) at 33 px: odd maps at every stride (17/9, 5, 3, 2), so every
# downsample's ceil-mode average pool has partial windows. ~9 s of CPU each (torch build and
# randomizing, the JAX model, one compile): slow.
DEEP = ["eca_nfnet_l1", "eca_nfnet_l2", "eca_nfnet_l3", "nf_ecaresnet50", "nf_ecaresnet101"]


@pytest.mark.slow
@pytest.mark.parametrize("name", DEEP)
def test_deep_nf_logits_match_reference(name: str) -> None:
    """Logits and stage features of the deeper NF networks against their references, the
    state_dict loaded by the converter's key rule; same RTOL (measured: 2e-6 for eca_nfnet_l3,
    whose 48 blocks torch_reference damps like the others: small last gains)."""
    reference = tr.random_reference(name, seed=3)
    model = registry.empty_model(name)
    convert.load_state_dict(model, tr.numpy_state_dict(reference))
    model.eval()
    x = images(33)
    want, want_feats = torch_forward(reference, x)
    got, feats = jax_forward(model, x)
    assert relative(got, want) <= RTOL, relative(got, want)
    assert [f.shape[1:3] for f in feats] == [(9, 9), (5, 5), (3, 3), (2, 2)]
    assert [f.shape for f in feats] == [f.shape for f in want_feats]
    assert max(relative(a, b) for a, b in zip(feats, want_feats)) <= RTOL


STRIDES = (4, 8, 16, 32)


@pytest.mark.parametrize(("name", "sizes"), [p for p in PARITY if p.marks])  # all slow
def test_hub_folder_converts_and_matches_reference(name, sizes, tmp_path, capsys) -> None:
    count = FACTS[name][0]
    reference = tr.random_reference(name, seed=3)
    hub = tmp_path / "hub"
    tr.save_hub_folder(name, reference, hub)
    rc, out, err = run(capsys, hub, tmp_path / "dst")  # no flag: read from the tensors
    assert rc == 0, err
    assert out.splitlines()[0] == f"{name}, 1000 classes, {count:,} params"
    meta = pretrained.read_model_json(tmp_path / "dst")
    assert (meta["arch"], meta["params"], meta["k_size"]) == (name, count, [])
    assert meta["preprocessing"]["origin"] == "config.json"
    info = eca_flax.model_info(name)
    pre = meta["preprocessing"]
    if name in TAGS:  # the tag's test size and crop, as the published top-1 was measured
        tag, train, test, crop, top1 = TAGS[name]
        assert (pre["tag"], pre["input_size"], pre["test_input_size"]) == (tag, train, test)
        assert (pre["test_crop_pct"], meta["image_size"]) == (crop, test)
        assert meta["resize_size"] == int(test // crop)
        assert info.tags[0].top1 == top1 and info.hub_repo() == f"timm/{name}.{tag}"
    else:
        assert (meta["image_size"], pre["tag"]) == (info.default_size, "untrained")
    assert pre["interpolation"] == "bicubic"
    model = eca_flax.load_pretrained(tmp_path / "dst")
    for size in (sizes,) if isinstance(sizes, int) else sizes:  # one conversion, its sizes
        x = images(size)
        want, want_feats = torch_forward(reference, x)
        got, feats = jax_forward(model, x)
        with capsys.disabled():  # the figure, shown with -s
            print(f"{name} @{size}: max|dlogit|/max|logit| = {relative(got, want):.2e}")
        assert relative(got, want) <= RTOL
        assert [f.shape for f in feats] == [f.shape for f in want_feats]
        if size % 32 == 0:
            assert [f.shape[1] for f in feats] == [size // s for s in STRIDES]
    if name == "eca_botnext26ts_256":  # predict refuses another size in one line
        from eca_flax import predict

        assert (
            predict.main(["--weights", str(tmp_path / "dst"), "--image-size", "224", "x.jpg"]) == 1
        )
        one_line_error(1, capsys.readouterr().err, "--image-size 224", "takes 256x256 input only")


# ------------------------------------------------------------------------------------------
# Look-alikes outside the family: one line naming what they are.


def test_vovnet_look_alikes(tmp_path: Path, capsys) -> None:
    """ese_vovnet39b (eSE: attn.fc) and a VoVNet without attention, from a synthetic state_dict."""
    f = np.float32
    base = {
        "stem.0.conv.weight": np.zeros((64, 3, 3, 3), f),
        "stages.0.blocks.0.conv_mid.0.conv.weight": np.zeros((128, 128, 3, 3), f),
        "head.fc.weight": np.zeros((1000, 1024), f),
    }
    for extra, fragment in (
        ({"stages.0.blocks.0.attn.fc.weight": np.zeros((256, 256, 1, 1), f)}, "ese_vovnet39b"),
        ({}, "a VoVNet without attention"),
    ):
        save_file({**base, **extra}, tmp_path / "x.safetensors")
        rc, _, err = run(capsys, tmp_path / "x.safetensors", tmp_path / "dst")
        one_line_error(rc, err, fragment, "eca_flax converts eca_vovnet39b")
    assert not (tmp_path / "dst").exists()


def test_config_json_naming_another_model(tmp_path: Path, capsys) -> None:
    """config.json saying ese_vovnet39b over eca_vovnet39b's tensors: one line naming both."""
    reference = tr.build("eca_vovnet39b")
    hub = tmp_path / "hub"
    tr.save_hub_folder("eca_vovnet39b", reference, hub)
    config = json.loads((hub / "config.json").read_text())
    (hub / "config.json").write_text(json.dumps({**config, "architecture": "ese_vovnet39b"}))
    rc, _, err = run(capsys, hub, tmp_path / "dst")
    one_line_error(rc, err, "says architecture 'ese_vovnet39b'", "the weights hold eca_vovnet39b")


def test_byob_references_match_facts() -> None:
    """Keys and shapes the facts name: grouped 3x3s, ECA on the mid width (k 3 at 64), BoT /
    Halo tables and projections, post_attn, final_conv."""
    sd = tr.build("eca_resnet33ts").state_dict()
    assert sum(k.endswith(".attn.conv.weight") for k in sd) == 10
    assert sd["stages.0.0.attn.conv.weight"].shape == (1, 1, 3)
    assert sd["stages.3.1.attn.conv.weight"].shape == (1, 1, 5)
    assert sd["stem.conv3.conv.weight"].shape == (64, 32, 3, 3)
    assert sd["final_conv.conv.weight"].shape == (1280, 1536, 1, 1)
    assert sd["stages.1.0.shortcut.conv.weight"].shape == (512, 256, 1, 1)
    assert "stages.1.1.shortcut.conv.weight" not in sd
    sd = tr.build("eca_resnext26ts").state_dict()
    assert sd["stages.3.0.conv2_kxk.conv.weight"].shape == (512, 32, 3, 3)
    assert sum(v.numel() for v in sd.values() if v.dtype != torch.int64) == 10_328_979 - 31
    bot = tr.build("eca_botnext26ts_256").state_dict()
    assert bot["stages.1.0.conv2_kxk.conv.weight"].shape == (128, 16, 3, 3)
    assert bot["stages.2.1.self_attn.qkv.weight"].shape == (384, 256, 1, 1)
    assert bot["stages.3.0.self_attn.qkv.weight"].shape == (640, 512, 1, 1)
    assert bot["stages.2.1.self_attn.pos_embed.height_rel"].shape == (31, 16)
    assert bot["stages.3.0.self_attn.pos_embed.width_rel"].shape == (31, 16)
    assert bot["stages.3.1.self_attn.pos_embed.height_rel"].shape == (15, 16)
    assert "stages.2.1.post_attn.running_var" in bot and "stages.2.1.attn.conv.weight" not in bot
    assert sum(k.endswith(".attn.conv.weight") for k in bot) == 5
    halo = tr.build("eca_halonext26ts").state_dict()
    assert halo["stages.3.0.self_attn.q.weight"].shape == (128, 512, 1, 1)
    assert halo["stages.3.0.self_attn.kv.weight"].shape == (640, 512, 1, 1)
    assert all(halo[f"stages.{b}.self_attn.pos_embed.height_rel"].shape == (23, 16)
               for b in ("2.1", "3.0", "3.1"))  # fmt: skip


def test_attention_size_rules(tmp_path: Path) -> None:
    """BoT takes 256 only, Halo multiples of 256: one line naming the rule, at model call and
    in the config check (predict: in the slow Hub test)."""
    from eca_flax.training import config as cfg

    for name, bad, rule in (
        ("eca_botnext26ts_256", 224, "takes 256x256 input only"),
        ("eca_halonext26ts", 288, "multiples of 256"),
    ):
        model = nnx.clone(registry.abstract_model(name, (), 1000, "eca", "float32"))
        with pytest.raises(ValueError, match=rule) as e:
            model(jnp.zeros((1, bad, bad, 3)))  # raised before any weight is touched
        assert "\n" not in str(e.value) and str(bad) in str(e.value)
        c = cfg.default_config()
        c.update(model=name, image_size=256, eval_image_size=bad)
        with pytest.raises(cfg.ConfigError, match=f"eval_image_size={bad}: .*{rule}"):
            cfg.resolve_config(c)
    registry.check_input_size("eca_halonext26ts", 512, 256)  # non-square multiples: fine
    with pytest.raises(ValueError, match="multiples of 256"):
        registry.check_input_size("eca_halonext26ts", 256, 320)
    registry.check_input_size("eca_resnext26ts", 97)  # the others take any size


def test_vovnet_minimum_size() -> None:
    """Under 29 px a VoVNet stage max-pool gets a 1-pixel map (PyTorch: "Output size is too
    small"; an empty map and NaN losses otherwise): one line at model call and config check."""
    from eca_flax.training import config as cfg

    registry.check_input_size("eca_vovnet39b", 29)
    with pytest.raises(ValueError, match=r"at least 29x29 .*got 28x28$"):
        registry.check_input_size("eca_vovnet39b", 28)
    model = nnx.clone(registry.abstract_model("eca_vovnet39b", (), 10, "eca", "float32"))
    with pytest.raises(ValueError, match="got 16x16"):
        model(jnp.zeros((1, 16, 16, 3)))
    c = cfg.default_config()
    c.update(model="eca_vovnet39b", image_size=16)
    with pytest.raises(cfg.ConfigError, match="image_size=16: .*at least 29x29"):
        cfg.resolve_config(c)


def test_byob_look_alikes(tmp_path: Path, capsys) -> None:
    """resnet33ts (no attention) and seresnext26ts (SE: attn.fc1): one line each."""
    f = np.float32
    base = {
        "stem.conv1.conv.weight": np.zeros((24, 3, 3, 3), f),
        "stages.0.0.conv1_1x1.conv.weight": np.zeros((64, 64, 1, 1), f),
        "head.fc.weight": np.zeros((1000, 2048), f),
    }
    for extra, fragment in (
        ({}, "without ECA (e.g. resnet33ts"),
        ({"stages.0.0.attn.fc1.weight": np.zeros((8, 64, 1, 1), f)}, "seresnext26ts"),
    ):
        save_file({**base, **extra}, tmp_path / "x.safetensors")
        rc, _, err = run(capsys, tmp_path / "x.safetensors", tmp_path / "dst")
        one_line_error(rc, err, fragment, "eca_flax converts eca_resnet33ts, eca_resnext26ts")


def test_nfnet_references_match_facts() -> None:
    """Weight-standardized convs with bias and gain everywhere, no BN, conv2b and grouped 3x3s
    (group size 64) in eca_nfnet, the downsample in block 0 of every stage, final_conv."""
    sd = tr.build("eca_nfnet_l0").state_dict()
    assert not any("running" in k or "num_batches" in k for k in sd)
    assert [tuple(sd[f"stages.{s}.0.conv2.weight"].shape) for s in range(3)] == [
        (64, 64, 3, 3),
        (128, 64, 3, 3),
        (384, 64, 3, 3),
    ]
    assert sd["stages.2.3.conv2b.gain"].shape == (384, 1, 1, 1)
    assert sd["stages.3.0.downsample.conv.weight"].shape == (1536, 1536, 1, 1)
    assert all(f"stages.{s}.0.downsample.conv.bias" in sd for s in range(4))
    assert "stages.1.1.downsample.conv.weight" not in sd
    assert sd["final_conv.weight"].shape == (2304, 1536, 1, 1)
    assert sd["head.fc.weight"].shape == (1000, 2304)
    assert {tuple(v.shape) for k, v in sd.items() if k.endswith("attn_last.conv.weight")} == {
        (1, 1, 5)
    }
    assert [k for k in sd if k.startswith("stem.")][-3:] == [
        "stem.conv4.weight",
        "stem.conv4.bias",
        "stem.conv4.gain",
    ]
    r = tr.build("nf_ecaresnet50").state_dict()
    assert r["stem.conv.weight"].shape == (64, 3, 7, 7) and "final_conv.weight" not in r
    assert r["stages.3.2.attn_last.conv.weight"].shape == (1, 1, 7)
    assert "stages.0.0.conv2b.weight" not in r and r["head.fc.weight"].shape == (1000, 2048)


def test_nfnet_betas() -> None:
    """beta = 1/sqrt(expected variance): the facts' l0 stage starts 1, 0.980581, 0.962250,
    0.898027; block j >= 1: (1 + 0.04 j)^-1/2."""
    from eca_flax.models import nfnet

    b = nfnet.betas((1, 2, 6, 3))
    assert [round(s[0], 6) for s in b] == [1.0, 0.980581, 0.96225, 0.898027]
    assert b[2][5] == pytest.approx(1.2**-0.5)
    model = nnx.clone(registry.abstract_model("eca_nfnet_l0", (), 1000, "eca", "float32"))
    assert model.stages[2][0].beta == b[2][0] and model.stages[3][2].beta == b[3][2]
    assert not nnx.state(model, nnx.BatchStat)  # no batch statistics at all


def test_nfnet_look_alikes(tmp_path: Path, capsys) -> None:
    """nfnet_l0 (SE: attn_last.fc1) and an NF-ResNet without attention: one line each."""
    f = np.float32
    base = {
        "stem.conv1.weight": np.zeros((16, 3, 3, 3), f),
        "stem.conv1.gain": np.ones((16, 1, 1, 1), f),
        "stages.0.0.conv1.weight": np.zeros((64, 128, 1, 1), f),
        "head.fc.weight": np.zeros((1000, 2304), f),
    }
    for extra, fragment in (
        ({"stages.0.0.attn_last.fc1.weight": np.zeros((64, 256, 1, 1), f)}, "nfnet_l0"),
        ({}, "an NF network without ECA"),
    ):
        save_file({**base, **extra}, tmp_path / "x.safetensors")
        rc, _, err = run(capsys, tmp_path / "x.safetensors", tmp_path / "dst")
        one_line_error(rc, err, fragment, "eca_flax converts eca_nfnet_l0")


# ------------------------------------------------------------------------------------------
# Training: adaptive gradient clipping, no batch statistics, the loss goes down.


def test_agc_option_clips_all_but_the_head() -> None:
    """agc_clip: each output unit's gradient is clipped to agc_clip x its weight's norm
    (optax.adaptive_grad_clip), the classifier left alone; 0 leaves the optimizer as it was."""
    import optax

    from eca_flax.training import config as cfg
    from eca_flax.training import steps

    c = cfg.default_config()
    c.update(model="nf_ecaresnet26", recipe="nfnet", weight_decay=0.0, momentum=0.0)
    c = cfg.resolve_config(c)
    assert c.agc_clip == 0.01 and c.schedule == "cosine"
    params = {
        "stages": {"kernel": jnp.ones((1, 1, 4, 2))},  # per output unit: norm 2
        "head": {"fc": {"kernel": jnp.ones((4, 2))}},
    }
    grads = jax.tree.map(lambda p: 100 * p, params)
    tx = steps.make_optimizer(c, optax.constant_schedule(1.0))
    updates, _ = tx.update(grads, tx.init(params), params)
    unit = jnp.sqrt(jnp.sum(updates["stages"]["kernel"] ** 2, axis=(0, 1, 2)))
    np.testing.assert_allclose(unit, 0.01 * 2.0, rtol=1e-5)  # clipped to 0.01 x ||w_unit||
    np.testing.assert_allclose(updates["head"]["fc"]["kernel"], -100.0)  # the head: not
    c2 = cfg.default_config()
    c2.update(model="nf_ecaresnet26")
    off = steps.make_optimizer(cfg.resolve_config(c2), optax.constant_schedule(1.0))
    assert jax.tree.structure(off.init(params)) != jax.tree.structure(tx.init(params))


@pytest.mark.fast_compile
@pytest.mark.slow
def test_nf_network_trains_with_agc() -> None:
    """Five steps of the trainer's jitted train step (steps.make_train_step, with an EMA) on a
    fixed batch of 8 at 32 px, the nfnet recipe (AGC 0.01): no batch statistics in the state,
    and the loss falls. A two-stage network of nf_ecaresnet's blocks keeps the compile to
    seconds (the full model's takes ~40 s of CPU). The BatchNorm families train through the
    same step as the ECA-ResNets (tests/test_steps.py); a train step of each costs another
    ~10 s of CPU, over this file's budget."""
    import optax

    from eca_flax.models import nfnet
    from eca_flax.training import config as cfg
    from eca_flax.training import mesh, steps

    design = nfnet.NfDesign((1, 2), (64, 128), 0, "7x7", False, 0, "relu")
    model = nfnet.NormFreeNet(
        arch="nf_ecaresnet26", num_classes=10, design=design, rngs=nnx.Rngs(0)
    )
    c = cfg.default_config()
    c.update(model="nf_ecaresnet26", recipe="nfnet", image_size=32, batch_size=8, num_classes=10)
    c.update(learning_rate=0.1, base_batch_size=8, weight_decay=0.0)
    c = cfg.resolve_config(c)
    assert c.agc_clip == 0.01
    m = mesh.make_mesh(jax.devices()[:1])  # one device: the 8 fake CPUs cost compile time
    schedule = optax.constant_schedule(c.learning_rate)
    tx = steps.make_optimizer(c, schedule)
    step = steps.make_train_step(model, tx, schedule, m, c, num_classes=10)
    state = steps.init_state(model, tx, 0, m, ema=True)
    assert jax.tree.leaves(state["batch_stats"]) == []
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
        "label": rng.integers(0, 10, 8).astype(np.int32),
    }
    losses = []
    with cpu_kernels.switch(False):  # traced at the first call: lax's, a shorter compile here
        for _ in range(5):
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize(
    ("config", "model", "eval_size", "agc"),
    [
        ("eca_nfnet_l0", "eca_nfnet_l0", 288, 0.01),
        ("eca_resnext26ts", "eca_resnext26ts", 288, 0.0),
        ("eca_vovnet39b", "eca_vovnet39b", 224, 0.0),
    ],
)
def test_family_configs_resolve(config: str, model: str, eval_size: int, agc: float) -> None:
    """configs/<family>.py: the model, the mirrored tag's test size (bicubic), AGC for NF."""
    from eca_flax.training import config as cfg

    c = cfg.load_config_file(str(REPO / "configs" / f"{config}.py"))
    r = cfg.resolve_config(c)
    assert (r.model, r.eval_image_size, r.eval_interpolation, r.agc_clip) == (
        model,
        eval_size,
        "bicubic",
        agc,
    )
    if config == "eca_resnext26ts":  # BoT in the same file at another size: one line
        c.model, c.image_size = "eca_botnext26ts_256", 224
        with pytest.raises(cfg.ConfigError, match="image_size=224: .*256x256 input only"):
            cfg.resolve_config(c)
