"""The networks (ECA-ResNet, ECA-MobileNetV2, the Linen wrapper) against the PyTorch reference:
logits, train mode, stage features, dtypes, initialisation. The layers and the registry have
their own: test_layers.py, test_registry.py."""

from __future__ import annotations

import math
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import eca_flax
from eca_flax.linen import ECANet
from eca_flax.models import mobilenetv2
from eca_flax.models import torch_reference as tr
from eca_flax.weights import convert

REPO = Path(__file__).resolve().parent.parent

# torchvision's plain ResNet / MobileNetV2 counts: the attention=None baselines.
PLAIN_PARAMS = {
    "eca_resnet18": 11_689_512,
    "eca_resnet34": 21_797_672,
    "eca_resnet50": 25_557_032,
    "eca_resnet101": 44_549_160,
    "eca_resnet152": 60_192_808,
    "eca_mobilenet_v2": 3_504_872,
}
TABLE = {  # facts file: params, ECA params, released kernel sizes
    "eca_resnet18": (11_689_556, 44, (3, 5, 7, 7)),
    "eca_resnet34": (21_797_744, 72, (3, 3, 5, 7)),
    "eca_resnet50": (25_557_112, 80, (3, 5, 5, 7)),
    "eca_resnet101": (44_549_317, 157, (3, 3, 5, 7)),
    "eca_resnet152": (60_193_042, 234, (3, 3, 5, 7)),
    "eca_mobilenet_v2": (3_504_903, 31, (1,) * 10 + (3,) * 7),
}


def to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def ported(name: str, *, seed: int = 0, **kw):
    """A randomized PyTorch reference and the eca_flax model holding the same weights."""
    torch.manual_seed(seed)
    ref = tr.random_reference(name, seed, **kw)
    model = eca_flax.create_model(name, **kw)
    convert.load_state_dict(model, tr.numpy_state_dict(ref))
    model.eval()
    return ref, model


@nnx.jit
def _compiled(model: nnx.Module, x: jax.Array) -> jax.Array:
    return model(x)


def forward(model: nnx.Module, x: jax.Array) -> jax.Array:
    """``model(x)``: MobileNetV2 as one compiled program (BatchNorm statistics and dropout's RNG
    updated as eagerly), whose CPU depthwise kernels are many small ops that op-by-op would
    compile one by one (5x slower); the ResNets eagerly, where the repeated blocks reuse each
    shape's compiled ops (compiling ResNet-152 whole is slower). They agree to 5e-7 here."""
    if isinstance(model, mobilenetv2.ECAMobileNetV2):
        return _compiled(model, x)
    return model(x)


def deep(name: str, fast: tuple[str, ...]) -> pytest.param:
    """``name`` as a case, in the fast tier if it is one of ``fast`` (slow: the deeper networks,
    whose eager forward or construction takes seconds on a CPU)."""
    return pytest.param(name, marks=[] if name in fast else [pytest.mark.slow], id=name)


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(n, size, size, 3).astype(np.float32)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.mark.parametrize(
    "name,size",
    [
        ("eca_resnet18", 64),  # the fast tier: the basic block
        ("test_eca_resnet", 64),  # the tests' narrow model (the GPU check's dry run uses it)
        pytest.param("eca_resnet34", 64, marks=pytest.mark.slow),
        pytest.param("eca_resnet50", 224, marks=pytest.mark.slow),
        # damped residual branches: tr.residual_scale
        pytest.param("eca_resnet101", 64, marks=pytest.mark.slow),
        pytest.param("eca_resnet152", 64, marks=pytest.mark.slow),
        pytest.param("eca_mobilenet_v2", 96, marks=pytest.mark.slow),
    ],
)
def test_eval_logits_match_reference(name, size):
    ref, model = ported(name)
    x = images(2, size)
    with torch.no_grad():
        want = ref(to_nchw(x)).numpy()
    got = np.asarray(forward(model, jnp.asarray(x)))
    assert got.dtype == np.float32 and got.shape == want.shape
    err = rel_err(got, want)
    print(f"{name} @{size}: max|dlogit|/max|logit| = {err:.2e}")
    assert err <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize(
    "name,attention",
    [
        ("eca_resnet18", None),
        ("eca_resnet18", "eca_ns"),
        ("eca_resnet18", "se"),  # the SE baseline in the basic block ...
        pytest.param("eca_resnet50", "se", marks=pytest.mark.slow),  # ... and the bottleneck
    ],
)
def test_attention_variants_match_reference(name, attention):
    """Same tolerance as the ECA parity test above: 1e-4 of the largest logit."""
    ref, model = ported(name, attention=attention)
    x = images(2, 48)
    with torch.no_grad():
        want = ref(to_nchw(x)).numpy()
    assert rel_err(forward(model, jnp.asarray(x)), want) <= 1e-4


@pytest.mark.parametrize("size", [33, pytest.param(75, marks=pytest.mark.slow)])
def test_odd_input_sizes_match_reference(size):
    """Explicit symmetric padding: 'SAME' would shift every stride-2 layer on these sizes."""
    ref, model = ported("eca_resnet18", seed=1)
    x = images(1, size, seed=size)
    with torch.no_grad():
        want = ref(to_nchw(x)).numpy()
    assert rel_err(forward(model, jnp.asarray(x)), want) <= 1e-4


@pytest.mark.slow
def test_mobilenet_variants_match_reference():
    ref, model = ported("eca_mobilenet_v2", attention="eca_ns", k_size=(3, 5), seed=2)
    x = images(2, 64, seed=3)
    with torch.no_grad():
        want = ref(to_nchw(x)).numpy()
    assert rel_err(forward(model, jnp.asarray(x)), want) <= 1e-4


@pytest.mark.parametrize(
    "name", ["eca_resnet18", pytest.param("eca_mobilenet_v2", marks=pytest.mark.slow)]
)
def test_train_mode_forward_and_batch_statistics_match_reference(name):
    """Batch statistics in train mode; running stats updated with PyTorch's momentum 0.1."""
    ref, model = ported(name, seed=4)
    ref.train()
    model.train()
    if name == "eca_mobilenet_v2":  # compare without dropout's randomness
        ref.classifier[0].p = 0.0
        model.classifier[0].deterministic = True
    x = images(8, 64, seed=5)
    with torch.no_grad():
        want = ref(to_nchw(x)).numpy()
    got = np.asarray(forward(model, jnp.asarray(x)))
    assert rel_err(got, want) <= 1e-4
    after_torch = tr.numpy_state_dict(ref)
    after_flax = convert.state_dict(model)
    means = [k for k in after_torch if k.endswith("running_mean")]
    assert len(means) > 10
    for key in means:  # running_var differs by n/(n-1): see the next test
        np.testing.assert_allclose(after_flax[key], after_torch[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_stays_close_to_float32():
    ref, model32 = ported("eca_resnet18", seed=8)
    model16 = eca_flax.create_model("eca_resnet18", dtype=jnp.bfloat16)
    nnx.update(model16, nnx.state(model32))
    model16.eval()
    x = jnp.asarray(images(2, 64, seed=9))
    y32, y16 = forward(model32, x), forward(model16, x)
    assert y16.dtype == jnp.float32
    params = nnx.to_flat_state(nnx.state(model16, nnx.Param))
    assert all(v[...].dtype == jnp.float32 for _, v in params)
    err = rel_err(y16, y32)
    print(f"bf16 vs fp32 relative max error {err:.3f}")
    assert err < 0.1
    assert (np.asarray(y16).argmax(-1) == np.asarray(y32).argmax(-1)).all()


@pytest.mark.slow
def test_stage_features():
    x = jnp.asarray(images(2, 64))
    r50 = eca_flax.create_model("eca_resnet50", num_classes=10)
    r50.eval()
    shapes = [f.shape for f in r50.stage_features(x)]
    assert shapes == [(2, 16, 16, 256), (2, 8, 8, 512), (2, 4, 4, 1024), (2, 2, 2, 2048)]
    mb = eca_flax.create_model("eca_mobilenet_v2", num_classes=10)
    mb.eval()
    shapes = [f.shape for f in nnx.jit(lambda m, x: m.stage_features(x))(mb, x)]  # see forward
    assert shapes == [(2, 16, 16, 24), (2, 8, 8, 32), (2, 4, 4, 96), (2, 2, 2, 1280)]
    # the last stage feeds the head: logits are the fc of its global mean
    c5 = r50.stage_features(x)[-1]
    np.testing.assert_allclose(r50.fc(c5.mean((1, 2))), r50(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_train_eval_modes():
    model = eca_flax.create_model("eca_mobilenet_v2", num_classes=10, rngs=nnx.Rngs(0))
    x = jnp.asarray(images(4, 32))
    model.eval()

    def stats():
        return nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    before = stats()
    np.testing.assert_array_equal(forward(model, x), forward(model, x))  # no dropout
    assert jax.tree.all(jax.tree.map(jnp.array_equal, before, stats()))
    model.train()
    a, b = forward(model, x), forward(model, x)  # dropout differs between calls
    assert not np.allclose(a, b)
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, before, stats()))


@pytest.mark.slow
def test_initialisation_follows_the_original():
    model = eca_flax.create_model("eca_resnet50", rngs=nnx.Rngs(3))
    k = np.asarray(model.layer3[0].conv2.kernel[...])  # 3x3, 256 out
    assert abs(k.std() - math.sqrt(2 / (9 * 256))) < 0.02 * math.sqrt(2 / (9 * 256))
    assert abs(k.mean()) < 1e-3 and np.abs(k).max() > 3 * k.std()  # untruncated normal
    np.testing.assert_array_equal(model.bn1.scale[...], 1.0)
    np.testing.assert_array_equal(model.bn1.bias[...], 0.0)
    bound = 1 / math.sqrt(2048)
    for w in (model.fc.kernel[...], model.fc.bias[...]):
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    eca = np.asarray(model.layer4[0].eca.conv.kernel[...])
    assert np.abs(eca).max() <= 1 / math.sqrt(7)
    mb = eca_flax.create_model("eca_mobilenet_v2", rngs=nnx.Rngs(3))
    w = np.asarray(mb.classifier[1].kernel[...])
    assert abs(w.std() - 0.01) < 5e-4
    np.testing.assert_array_equal(mb.classifier[1].bias[...], 0.0)
    dw = np.asarray(mb.features[5].conv[1][0].kernel[...])  # depthwise (3, 3, 1, 192)
    assert dw.shape == (3, 3, 1, 192)
    assert abs(dw.std() - math.sqrt(2 / (9 * 192))) < 0.1 * math.sqrt(2 / (9 * 192))


def test_initialisers_give_flax_values():
    """The models' initialisers (samplers compiled at SAMPLER_OPTIONS on CPU) give exactly the
    values of Flax's, which sample at XLA's default options: the same weights for a seed as
    before they were introduced, so recorded training figures stand. Shapes of a 3x3 conv, a
    grouped conv and a Linear, float32 and bfloat16."""
    from eca_flax.models import layers

    pairs = [
        (layers.conv_kernel_init, nnx.initializers.variance_scaling(2.0, "fan_out", "normal")),
        (
            layers.kaiming_normal_init(1.0, "fan_in"),
            nnx.initializers.variance_scaling(1.0, "fan_in", "normal"),
        ),
        (layers.normal_init(0.01), nnx.initializers.normal(0.01)),
        (layers.truncated_normal_init(0.25), nnx.initializers.truncated_normal(0.25)),
        (
            layers.torch_default_init(200),
            lambda k, s, d: jax.random.uniform(k, s, d, -1 / math.sqrt(200), 1 / math.sqrt(200)),
        ),
    ]
    for i, (ours, flax_init) in enumerate(pairs):
        for shape, dtype in [
            ((3, 3, 24, 40), jnp.float32),
            ((5, 5, 1, 16), jnp.bfloat16),
            ((200, 10), jnp.float32),
        ]:
            key = jax.random.key(i)
            want = np.asarray(flax_init(key, shape, dtype).astype(jnp.float32))
            got = np.asarray(ours(key, shape, dtype).astype(jnp.float32))
            np.testing.assert_array_equal(got, want, err_msg=f"{i} {shape} {dtype}")


@pytest.mark.slow
def test_linen_wrapper_matches_nnx_and_reference():
    ref, model = ported("eca_resnet18", seed=10, num_classes=10)
    net = ECANet("eca_resnet18", num_classes=10)
    x = jnp.asarray(images(2, 40, seed=11))
    variables = net.init(jax.random.key(0), x)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
    assert jax.tree.structure(params) == jax.tree.structure(variables["params"]["model"])
    variables = {"params": {"model": params}, "batch_stats": {"model": stats}}
    got = net.apply(variables, x)
    np.testing.assert_allclose(got, model(x), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        want = ref(to_nchw(np.asarray(x))).numpy()
    assert rel_err(got, want) <= 1e-4
    _, updates = net.apply(variables, x, train=True, mutable=["batch_stats"])
    changed = jax.tree.map(
        lambda a, b: not np.allclose(a, b), updates["batch_stats"], variables["batch_stats"]
    )
    assert any(jax.tree.leaves(changed))


@pytest.mark.slow
def test_readme_example_runs():
    """The README's "use as Flax modules" block runs as written."""
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    example = next(b for b in blocks if "create_model" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 1000)


def test_loaded_weights_do_not_alias_the_source_arrays():
    """jax on CPU can share a numpy buffer; PyTorch mutating its tensors must not leak in."""
    ref = tr.build("eca_resnet18", num_classes=10)
    sd = tr.numpy_state_dict(ref)  # numpy views of the torch tensors
    model = eca_flax.create_model("eca_resnet18", num_classes=10)
    convert.load_state_dict(model, sd)
    with torch.no_grad():
        ref.bn1.running_mean.add_(1.0)
        ref.fc.bias.add_(1.0)
    np.testing.assert_array_equal(model.bn1.mean[...], 0.0)
    assert not np.allclose(model.fc.bias[...], sd["fc.bias"])
