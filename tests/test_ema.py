"""The exponential moving average of the weights (``ema_decay``): the real jitted train step
against the closed-form average of the recorded weight trajectory, the warmup decays, and exact
checkpoint round trips with and without an EMA. (Kill-and-resume through train.py with an EMA:
tests/test_train.py::test_sigterm_sigkill_resume_equals_uninterrupted.)
"""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from flax import nnx
from test_faults import config as fault_config
from test_faults import tiny, train  # noqa: F401 - tiny: the fixture
from test_faults import weights as fault_weights

import eca_flax
from eca_flax import errors
from eca_flax.training import checkpoints, start, steps
from eca_flax.training import config as cfg
from eca_flax.training.mesh import make_mesh
from eca_flax.weights import description, pretrained

pytestmark = pytest.mark.fast_compile  # the EMA's behaviour, not the network's numbers

DECAY = 0.9
NUM_STEPS = 4
EPS32 = float(np.finfo(np.float32).eps) / 2  # unit roundoff u of float32, 2**-24
# Each EMA update rounds d * e, (1 - d) * w and their sum, and d itself may be rounded once
# (warmup's (1 + t) / (10 + t); 1 - d): at most 4u of max(|e|, |w|) per update. The EMA is a
# convex combination of the trajectory, so |e| <= max_t |p_t|, and earlier errors shrink by d < 1:
# after N updates the error is <= 4 N u max_t |p_t|, elementwise (~1e-6 relative). Averaging the
# pre-step weights instead of the new ones, or leaving the BN statistics out, fails it (both
# tried: the latter by 0.09 on bn1's mean).
UPDATE_ROUNDINGS = 4


@pytest.fixture(scope="module")
def run():
    """test_eca_resnet (10 classes) at 16 px, global batch 8 on one device: the config, the model,
    the compiled train step with ``ema_decay=DECAY`` (no warmup), its optimizer and batches."""
    config = cfg.default_config()
    config.update(
        model="test_eca_resnet",  # the EMA is the subject: the smallest ECA-ResNet
        dataset="digits:16",
        image_size=16,
        batch_size=8,
        ema_decay=DECAY,
        learning_rate=0.4,
    )
    config = cfg.resolve_config(config)
    mesh = make_mesh(jax.devices()[:1])
    model = eca_flax.create_model(config.model, num_classes=10, rngs=nnx.Rngs(0))
    plan = cfg.Plan(10, 100, 100, 10, 8, 8, config.learning_rate)
    schedule = steps.make_schedule(config, plan)
    tx = steps.make_optimizer(config, schedule)
    train_step = steps.make_train_step(model, tx, schedule, mesh, config, num_classes=10)
    rng = np.random.default_rng(0)
    batches = [
        {
            "image": rng.integers(0, 256, (8, 16, 16, 3), np.uint8),
            "label": rng.integers(0, 10, 8).astype(np.int32),
        }
        for _ in range(NUM_STEPS)
    ]
    return dict(config=config, mesh=mesh, model=model, tx=tx, step=train_step, batches=batches)


def fresh_state(run, ema: bool = True) -> dict:
    return steps.init_state(run["model"], run["tx"], 0, run["mesh"], ema=ema)


def host(tree) -> dict:
    """A copy on the host: np.asarray of a CPU array may share the buffer the next (donating)
    step overwrites."""
    return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def weights(state: dict) -> dict:
    return host({"params": state["params"], "batch_stats": state["batch_stats"]})


def flat_weights(model) -> dict:
    """A model's weights by path, on the host (as test_faults.weights gives a directory's)."""
    state = nnx.state(model, pretrained.WEIGHTS)
    return description.flatten(jax.tree.map(np.asarray, nnx.to_pure_dict(state)))


def same_flat(a: dict, b: dict) -> bool:
    """Two {path: array} dicts with the same paths, bit for bit."""
    assert a.keys() == b.keys()
    return all(np.array_equal(a[p], b[p]) for p in a)


def assert_same(a, b) -> None:
    """Two pytrees of the same structure, bit for bit."""
    leaves = jax.tree_util.tree_flatten_with_path(a)[0]
    assert len(leaves) == len(jax.tree.leaves(b))
    for (path, x), y in zip(leaves, jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def closed_form(trajectory: list[dict], decays: list[float]) -> dict:
    """ema_N = prod(d) p_0 + sum_t (1 - d_t) prod_{s > t} d_s p_{t+1}, in float64; with a
    constant d: d^N p_0 + sum_{t=1..N} (1 - d) d^(N - t) p_t."""
    n = len(decays)
    coef = [float(np.prod(decays))]
    coef += [(1 - decays[t]) * float(np.prod(decays[t + 1 :])) for t in range(n)]
    assert len(trajectory) == n + 1 and abs(sum(coef) - 1) < 1e-12
    return jax.tree.map(
        lambda *ps: sum(c * p.astype(np.float64) for c, p in zip(coef, ps)), *trajectory
    )


def assert_closed_form(ema: dict, trajectory: list[dict], decays: list[float]) -> None:
    """``ema`` equals the closed form within the rounding bound derived at UPDATE_ROUNDINGS."""
    want = closed_form(trajectory, decays)
    bound = jax.tree.map(lambda *ps: np.max(np.abs(np.stack(ps)), axis=0), *trajectory)
    scale = UPDATE_ROUNDINGS * len(decays) * EPS32
    flat = jax.tree_util.tree_flatten_with_path
    for (path, got), w, b in zip(flat(ema)[0], jax.tree.leaves(want), jax.tree.leaves(bound)):
        assert got.dtype == np.float32
        err = np.abs(got.astype(np.float64) - w)
        assert np.all(err <= scale * b), (jax.tree_util.keystr(path), float(np.max(err)))


@pytest.mark.slow
def test_train_step_ema_is_the_closed_form_average(run) -> None:
    """The real jitted train step, 4 steps at ema_decay=0.9: the EMA of params and BatchNorm
    statistics equals 0.9^4 p_0 + sum_t 0.1 * 0.9^(4 - t) p_t of the recorded weights."""
    state = fresh_state(run)
    trajectory = [weights(state)]
    assert_same(host(state["ema"]), trajectory[0])  # the EMA starts at the initial weights
    for batch in run["batches"]:
        state, _ = run["step"](state, batch)
        trajectory.append(weights(state))
    ema = host(state["ema"])
    d = float(np.float32(DECAY))  # the step computes with float32(0.9); 1 - d is then exact
    assert_closed_form(ema, trajectory, [d] * NUM_STEPS)
    # Not trivially so: the EMA is neither the last nor the first weights, for both kinds.
    for kind in ("params", "batch_stats"):
        last, first = trajectory[-1][kind], trajectory[0][kind]
        gap = lambda a, b: max(
            float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
        )
        assert gap(ema[kind], last) > 1e-3 and gap(ema[kind], first) > 1e-3, kind


def test_warmup_decays_and_closed_form() -> None:
    """ema_warmup: update t (0-based) uses min(ema_decay, (1 + t) / (10 + t)); at 0.2 that is
    0.1, 2/11, then the cap 0.2; the result is the closed form with those decays."""
    decay, n = 0.2, 5
    want = [min(decay, (1 + t) / (10 + t)) for t in range(n)]
    got = [float(steps.ema_decay_at(np.int32(t), decay, True)) for t in range(n)]
    np.testing.assert_allclose(got, want, rtol=2 * EPS32)  # one float32 division: <= u
    assert got[2:] == [float(np.float32(decay))] * 3
    assert float(steps.ema_decay_at(np.int32(0), decay, False)) == np.float32(decay)

    rng = np.random.default_rng(1)
    draw = lambda: {
        "params": {"w": rng.normal(size=(3, 4)).astype(np.float32)},
        "batch_stats": {"mean": rng.normal(size=4).astype(np.float32)},
    }
    trajectory = [draw() for _ in range(n + 1)]
    update = jax.jit(lambda state, new: steps.update_ema(state, new, decay, True))
    ema = trajectory[0]
    for t in range(n):
        ema = update({"step": np.int32(t), "ema": ema}, trajectory[t + 1])
    assert_closed_form(host(ema), trajectory, got)


@pytest.mark.slow
def test_checkpoints_restore_the_ema_exactly(run, tmp_path, caplog) -> None:
    """Save after 2 of 4 steps, restore from disk, continue: bit-identical to running on
    (weights, optimizer state, EMA). Checkpoints without an EMA still load: into a run with
    one the EMA starts at their weights; a run without one drops a checkpoint's EMA."""
    meta = checkpoints.model_meta(run["model"], run["config"], 10)
    state = fresh_state(run)
    for batch in run["batches"][:2]:
        state, _ = run["step"](state, batch)
    ckpt = checkpoints.Checkpoints(str(tmp_path / "ema"), 3)
    ckpt.save(state, meta)
    ckpt.wait()
    for batch in run["batches"][2:]:
        state, _ = run["step"](state, batch)
    want = host(state)

    step, restored = ckpt.restore_latest(fresh_state(run), meta)
    assert step == 2 and set(restored) == set(want)
    for batch in run["batches"][2:]:
        restored, _ = run["step"](restored, batch)
    assert_same(host(restored), want)

    # An EMA checkpoint in a run without EMA: the same weights, no EMA.
    _, plain = ckpt.restore_latest(fresh_state(run, ema=False), meta)
    assert "ema" not in plain
    ckpt.close()
    # A checkpoint without EMA in a run with one: the EMA starts at the restored weights.
    off = checkpoints.Checkpoints(str(tmp_path / "off"), 3)
    off.save(plain, meta)
    off.wait()
    # The "eca_flax" logger does not propagate once train.py's logging is set up (an earlier
    # test in this process may have done it), so caplog listens on it directly.
    eca_logger = logging.getLogger("eca_flax")
    eca_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="eca_flax"):
            _, started = off.restore_latest(fresh_state(run), meta)
    finally:
        eca_logger.removeHandler(caplog.handler)
    off.close()
    assert "has no EMA" in caplog.text
    assert_same(host(started["ema"]), weights(started))
    assert_same(weights(started), weights(plain))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\) \(0: no EMA\), got 1.0"),
        ({"ema_decay": -0.5}, r"ema_decay must be in \[0, 1\)"),
        ({"ema_warmup": True}, r"ema_warmup=True needs an ema_decay > 0"),
    ],
)
def test_ema_config_errors(fields, message) -> None:
    config = cfg.default_config()
    config.update(fields)
    with pytest.raises(errors.ConfigError, match=message):
        cfg.resolve_config(config)


@pytest.mark.slow
def test_a_run_with_ema_exports_both_and_says_which_is_better(tiny, tmp_path, capfd) -> None:
    """With ema_decay, pretrained/ and best/ hold the raw weights (as without an EMA) and
    pretrained_ema/ and best_ema/ the EMA, each model.json its own top-1 and the other's; the
    last log line says which evaluates better. (Decay 0.99 without warmup over 10 steps: the EMA
    is still 0.99^10 = 90% the initialisation, so it differs from the raw weights.)"""
    workdir = tmp_path / "run"
    capfd.readouterr()
    result = train(fault_config(tiny, num_train_steps=10, ema_decay=0.99), workdir)
    out, err = capfd.readouterr()

    raw_top1, ema_top1 = 100 * result.eval.top1, 100 * result.eval_ema.top1
    raw = pretrained.read_model_json(workdir / "pretrained")
    ema = pretrained.read_model_json(workdir / "pretrained_ema")
    assert (raw["weights"], raw["top1"], raw["top5"]) == ("raw", raw_top1, 100 * result.eval.top5)
    assert (ema["weights"], ema["top1"], ema["top5"]) == (
        "ema",
        ema_top1,
        100 * result.eval_ema.top5,
    )
    assert raw["ema_top1"] == ema_top1 and ema["raw_top1"] == raw_top1
    for meta in (raw, ema):
        assert (meta["step"], meta["ema_decay"], meta["ema_warmup"]) == (10, 0.99, False)
    # The exports are the final checkpoint's raw weights and EMA, bit for bit.
    step_dir = workdir / checkpoints.CHECKPOINT_DIR / "10"
    c = cfg.resolve_config(fault_config(tiny, init_from=str(step_dir)))
    model, _ = start.build_model(c, 2)
    assert same_flat(fault_weights(workdir / "pretrained"), flat_weights(model))
    ema_weights = fault_weights(workdir / "pretrained_ema")
    assert same_flat(ema_weights, flat_weights(start.read_ema(str(step_dir), model)))
    assert not same_flat(ema_weights, flat_weights(model))
    best, best_ema = (pretrained.read_model_json(workdir / n) for n in ("best", "best_ema"))
    assert (best["weights"], best_ema["weights"]) == ("raw", "ema")
    assert best["top1"] >= raw_top1 and best_ema["top1"] >= ema_top1

    last = out.strip().splitlines()[-1]
    better = (
        "the raw weights evaluate better" if raw_top1 > ema_top1
        else "the EMA evaluates better" if ema_top1 > raw_top1
        else "both evaluate the same"
    )  # fmt: skip
    assert last.endswith(
        f" final: {better} (top-1 {raw_top1:.2f}% raw, {ema_top1:.2f}% EMA); the raw weights "
        f"are in {workdir}/pretrained, the EMA in {workdir}/pretrained_ema (python -m "
        "eca_flax.predict --weights DIR IMAGE, or eca_flax.load_pretrained(DIR))"
    ), out
    assert "Traceback" not in err
