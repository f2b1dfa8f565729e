"""weights.pretrained: loading with a new head and another dtype, the errors of loading and of
saving (the model checked against what it is saved as)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_convert import (
    assert_error,
    run,
    small,  # noqa: F401  (a fixture of test_convert, used here too)
)

import eca_flax
from eca_flax import errors
from eca_flax.weights import convert, pretrained


def test_load_pretrained_new_head_and_dtype(small, tmp_path, capsys):
    ref, _, src = small
    dst = tmp_path / "out"
    assert run(capsys, src, dst)[0] == 0
    tuned = eca_flax.load_pretrained(dst, num_classes=4)

    def create_head():  # what create_model initialises the head to (jit: only the head is run)
        fresh = eca_flax.create_model("eca_resnet18", k_size=(1, 3, 5, 9), num_classes=4)
        return fresh.fc.kernel[...], fresh.fc.bias[...]

    kernel, bias = jax.jit(create_head)()
    np.testing.assert_array_equal(tuned.fc.kernel[...], kernel)
    np.testing.assert_array_equal(tuned.fc.bias[...], bias)
    np.testing.assert_array_equal(  # and the body from the file
        tuned.layer2[0].eca.conv.kernel[...],
        convert.to_flax_layout(ref.layer2[0].eca.conv.weight.detach().numpy()),
    )
    assert tuned.fc.kernel.shape == (512, 4) and tuned.bn1.use_running_average  # eval mode
    half = eca_flax.load_pretrained(dst, dtype=jnp.bfloat16)
    assert half.conv1.dtype == jnp.bfloat16 and half.fc.kernel[...].dtype == jnp.float32


def test_load_pretrained_errors(small, tmp_path, capsys):
    with pytest.raises(errors.PretrainedError, match="no such directory"):
        eca_flax.load_pretrained(tmp_path / "missing")
    with pytest.raises(errors.PretrainedError, match="no model.json"):
        eca_flax.load_pretrained(tmp_path)
    dst = tmp_path / "out"
    assert run(capsys, small[2], dst)[0] == 0
    meta = json.loads((dst / "model.json").read_text())
    (dst / "model.json").write_text(json.dumps({**meta, "format": "other/2"}))
    with pytest.raises(errors.PretrainedError, match="format 'other/2'"):
        eca_flax.load_pretrained(dst)
    (dst / "model.json").write_text(json.dumps({**meta, "k_size": [3, 3, 3, 3]}))
    with pytest.raises(
        errors.PretrainedError,
        match=r"layer1/0/eca/conv/kernel is stored with shape \(1, 1, 1\) but model.json implies "
        r"\(3, 1, 1\)",
    ):
        eca_flax.load_pretrained(dst)
    (dst / "model.json").write_text(json.dumps(meta))
    (dst / "state").rename(tmp_path / "state")
    with pytest.raises(errors.PretrainedError, match="no state/ checkpoint"):
        eca_flax.load_pretrained(dst)
    assert_error(*run(capsys, "--to-torch", dst, tmp_path / "x.pth")[::2], "no state/ checkpoint")
    (dst / "model.json").rename(tmp_path / "saved.json")
    with pytest.raises(errors.PretrainedError, match="no model.json"):
        eca_flax.load_pretrained(dst)


def test_save_pretrained_checks_the_model(small, tmp_path):
    model = eca_flax.models.registry.empty_model("eca_resnet18")
    with pytest.raises(errors.PretrainedError, match="unloaded weights"):
        pretrained.save_pretrained(model, tmp_path / "a", arch="eca_resnet18", attention="eca")
    model = convert.convert_file(small[2], tmp_path / "first", log=lambda _: None)
    with pytest.raises(errors.PretrainedError, match="not eca_resnet34"):
        pretrained.save_pretrained(model, tmp_path / "b", arch="eca_resnet34", attention="eca")
    with pytest.raises(errors.PretrainedError, match="not eca_resnet18"):
        pretrained.save_pretrained(model, tmp_path / "c", arch="eca_resnet18", attention=None)
    with pytest.raises(errors.PretrainedError, match="extra may not set k_size"):
        pretrained.save_pretrained(
            model, tmp_path / "c", arch="eca_resnet18", attention="eca", extra={"k_size": 3}
        )
    pretrained.save_pretrained(
        model, tmp_path / "d", arch="eca_resnet18", attention="eca", extra={"epoch": 3}
    )
    meta = pretrained.read_model_json(tmp_path / "d")
    assert (meta["source"], meta["epoch"], meta["best_prec1"]) == (None, 3, None)
    assert (meta["k_size"], meta["num_classes"]) == ([1, 3, 5, 9], 10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "first"]
