"""eca_flax.models.registry: the parameter counts of the original (facts file), the SE
baseline's formula, and kernel-size parsing."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_models import PLAIN_PARAMS, TABLE, deep

import eca_flax
from eca_flax.models import registry
from eca_flax.models import torch_reference as tr
from eca_flax.weights import convert


@pytest.mark.parametrize("name", [deep(n, ("eca_resnet18", "eca_resnet34")) for n in TABLE])
def test_parameter_counts_equal_the_original(name):
    params, eca_params, ks = TABLE[name]
    model = eca_flax.create_model(name)
    plain = eca_flax.create_model(name, attention=None)
    assert model.k_size == ks
    assert eca_flax.count_params(model) == params
    assert eca_flax.count_params(plain) == PLAIN_PARAMS[name]
    assert params - PLAIN_PARAMS[name] == eca_params
    info = eca_flax.model_info(name)
    assert (info.params, info.eca_params) == (params, eca_params)
    # every state_dict key of the reference exists in the model and vice versa
    ref_keys = set(tr.build(name).state_dict())
    assert set(convert.state_dict(model)) == ref_keys


SE_LAYOUT = {  # facts file: block output widths are 64/128/256/512 x expansion; blocks per stage
    "eca_resnet18": (1, (2, 2, 2, 2)),
    "eca_resnet34": (1, (3, 4, 6, 3)),
    "eca_resnet50": (4, (3, 4, 6, 3)),
    "eca_resnet101": (4, (3, 4, 23, 3)),
    "eca_resnet152": (4, (3, 8, 36, 3)),
}


@pytest.mark.parametrize("name", [deep(n, ("eca_resnet18", "eca_resnet50")) for n in SE_LAYOUT])
def test_se_parameter_counts_follow_the_formula(name):
    """SE (reduction 16) adds fc1 (C*C/16 + C/16) and fc2 (C/16*C + C) to every block."""
    expansion, blocks = SE_LAYOUT[name]
    se_params = sum(
        n * (2 * c * (c // 16) + c // 16 + c)
        for n, c in zip(blocks, (w * expansion for w in (64, 128, 256, 512)))
    )
    # create_model(name, attention="se") without its weights' values (the registry's cached
    # trace: a plain nnx.eval_shape of ResNet-152 traces 5x longer).
    k_size = eca_flax.resolve_k_size(name)
    model = eca_flax.models.registry.abstract_model(name, k_size, 1000, "se", "float32")
    assert eca_flax.count_params(model) == PLAIN_PARAMS[name] + se_params
    if name == "eca_resnet50":
        assert PLAIN_PARAMS[name] + se_params == 28_088_024  # the paper's 28.09M
    keys = {convert.path_to_torch_key(p) for p in eca_flax.models.registry.weight_paths(model)}
    assert "layer1.0.se.fc1.weight" in keys and not any(".eca." in k for k in keys)
    if name in ("eca_resnet18", "eca_resnet50"):  # the reference, for each block type (fast)
        ref = tr.build(name, attention="se")
        assert sum(p.numel() for p in ref.parameters()) == PLAIN_PARAMS[name] + se_params
        assert keys == {k for k in ref.state_dict() if not k.endswith("num_batches_tracked")}


def test_reference_parameter_counts_match_the_table():
    for name, (params, _, _) in TABLE.items():
        assert sum(p.numel() for p in tr.build(name).parameters()) == params, name


def test_kernel_size_parsing():
    r = eca_flax.resolve_k_size
    assert r("eca_resnet50") == (3, 5, 5, 7)
    assert r("eca_resnet50", "3557") == (3, 5, 5, 7)
    assert r("eca_resnet50", "3,3,5,7") == (3, 3, 5, 7)
    assert r("eca_resnet50", [3, 3, 3, 3]) == (3, 3, 3, 3)
    assert r("eca_resnet34", 5) == (5, 5, 5, 5)
    assert r("eca_resnet50", "adaptive") == (5, 5, 5, 7)
    assert r("eca_resnet18", "adaptive") == (3, 5, 5, 5)
    assert r("eca_mobilenet_v2", "13") == TABLE["eca_mobilenet_v2"][2]
    # widths 16, 24x2, 32x3, 64x4, 96x3 -> 3; 160x3, 320 -> 5
    assert r("eca_mobilenet_v2", "adaptive") == (3,) * 13 + (5,) * 4
    assert eca_flax.create_model("eca_resnet18", k_size="adaptive").k_size == (3, 5, 5, 5)
    for bad in ("3456", "35", "abc", [3, 5, 7], 0):
        with pytest.raises(ValueError):
            r("eca_resnet50", bad)
    with pytest.raises(ValueError, match="choices"):
        eca_flax.create_model("resnet50")
    with pytest.raises(ValueError, match="attention"):
        eca_flax.create_model("eca_resnet18", attention="sk")
    with pytest.raises(ValueError, match="attention 'se' .* ResNets, not eca_mobilenet_v2"):
        eca_flax.create_model("eca_mobilenet_v2", attention="se")


def test_the_test_model_is_the_smallest_eca_resnet():
    """test_eca_resnet, the trainer tests' model: one BasicBlock per stage at 16, 32, 64, 128
    channels (a 16-channel stem), ECA kernel sizes 3, 5, 7, 7; its parameter count is what
    those widths give (counted below), its stages have strides 4 to 32 like every ResNet's."""
    model = eca_flax.create_model("test_eca_resnet")
    info = eca_flax.model_info("test_eca_resnet")
    assert (info.source, info.layers, model.k_size) == ("test", (1, 1, 1, 1), (3, 5, 7, 7))

    def conv_bn(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k + 2 * cout

    blocks = [(16, 16, 1), (16, 32, 2), (32, 64, 2), (64, 128, 2)]
    body = sum(
        conv_bn(cin, cout, 3) + conv_bn(cout, cout, 3) + (conv_bn(cin, cout, 1) if s > 1 else 0)
        for cin, cout, s in blocks
    )
    params = conv_bn(3, 16, 7) + body + (3 + 5 + 7 + 7) + 128 * 1000 + 1000
    assert eca_flax.count_params(model) == info.params == params == 438_478
    shapes = [f.shape for f in model.stage_features(jnp.zeros((1, 32, 32, 3)))]
    assert shapes == [(1, 8, 8, 16), (1, 4, 4, 32), (1, 2, 2, 64), (1, 1, 1, 128)]
    assert "test_eca_resnet" in eca_flax.list_models("test")
    assert "test_eca_resnet" not in eca_flax.list_models("ECA-Net") + eca_flax.list_models("timm")


@pytest.fixture(scope="module")
def resnet18() -> nnx.Module:
    """An abstract eca_resnet18 (no weights: the checks come before any computation)."""
    return registry.abstract_model("eca_resnet18", (3, 5, 7, 7), 10, "eca", "float32")


MISUSE = {  # issue 31, findings 8 and 11: what a user may pass, and what the error names
    "k_size=True": (dict(k_size=True), TypeError, "k_size must be None, 'adaptive', a digit"),
    "k_size=3.5": (dict(k_size=3.5), TypeError, "k_size must be None, 'adaptive', a digit"),
    "k_size with a bool": (dict(k_size=[3, 5, False, 7]), TypeError, r"k_size must be an int"),
    "num_classes=-1": (dict(num_classes=-1), ValueError, "num_classes must be an int >= "),
    "num_classes=10.0": (dict(num_classes=10.0), TypeError, "num_classes must be an int >= "),
    "dtype=int32": (dict(dtype=jnp.int32), TypeError, "dtype must be a floating-point dtype"),
    "param_dtype='x'": (dict(param_dtype="x"), TypeError, "param_dtype must be a floating"),
}


@pytest.mark.parametrize("name", ["eca_resnet18", "eca_mobilenet_v2"])
@pytest.mark.parametrize("case", sorted(MISUSE))
def test_create_model_names_the_bad_argument(name: str, case: str) -> None:
    """Issue 31, findings 8 and 11: k_size=True built k=1 everywhere, the others failed later
    inside JAX (an MLIRError, "'float' object is not iterable") or at the first call."""
    fields, kind, message = MISUSE[case]
    with pytest.raises(kind, match=message):
        eca_flax.create_model(name, **fields)


@pytest.mark.parametrize(
    ("x", "kind", "message"),
    [
        (np.zeros((1, 3, 16, 16), np.float32), ValueError, r"\(1, 3, 16, 16\): NCHW\? x.transp"),
        (np.zeros((1, 16, 16, 1), np.float32), ValueError, "1 channels, the networks take RGB"),
        (np.zeros((1, 16, 16, 4), np.float32), ValueError, "4 channels, the networks take RGB"),
        (np.zeros((16, 16, 3), np.float32), ValueError, "one image\\? x\\[None\\] makes a batch"),
        ([[[[0.0] * 3] * 16] * 16], TypeError, "got a list \\(np.asarray\\(x\\) makes one\\)"),
    ],
    ids=["NCHW", "1 channel", "4 channels", "3-D", "list"],
)
def test_model_input_must_be_nhwc_rgb(resnet18, x, kind, message) -> None:
    """Issue 31, finding 11: wrong inputs are named before JAX's convolution or pool fails on
    them (its errors say nothing of NHWC); __call__ and stage_features alike."""
    for call in (resnet18, resnet18.stage_features):
        with pytest.raises(kind, match=f"the input must be .*{message}"):
            call(x)


def test_count_params_needs_a_model() -> None:
    """Issue 31, finding 11: count_params(None) returned 0."""
    with pytest.raises(TypeError, match="count_params takes an nnx.Module"):
        eca_flax.count_params(None)
