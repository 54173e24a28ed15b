"""Unit tests of the optimizer (SPEC.md §8), checkpoints, and a short teacher training run (§7)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import pyeqprop
from pyeqprop import backend
from pyeqprop.model.teacher import Teacher
from pyeqprop.train.checkpoint import (
    CheckpointError,
    FORMAT_VERSION,
    check_compatible,
    load_checkpoint,
    load_teacher,
    save_checkpoint,
    save_teacher,
)
from pyeqprop.train.optim import SGD, cosine_lr, per_layer_lrs

REPO_ROOT = Path(pyeqprop.__file__).resolve().parent.parent


# ---------------------------------------------------------------------- SGD (Eq. 8.1)
def test_sgd_matches_hand_computation_with_weight_decay_before_momentum():
    """Eq. 8.1 by hand, with powers of two so every operation is exact in binary:
    μ = 1/2, λ = 1/4, η = 1/2, θ0 = (1, −2), g1 = g2 = (1/2, 1/4).
    step 1: v1 = g + λθ0 = (0.75, −0.25);               θ1 = θ0 − ηv1 = (0.625, −1.875)
    step 2: v2 = μv1 + g + λθ1 = (1.03125, −0.34375);    θ2 = θ1 − ηv2 = (0.109375, −1.703125)
    (decay after momentum, or decoupled decay, would give other numbers.)"""
    params = {"l.weight": np.array([1.0, -2.0])}
    opt = SGD(params, lr=0.5, momentum=0.5, weight_decay=0.25)
    g = {"l.weight": np.array([0.5, 0.25])}
    opt.step(g)
    np.testing.assert_array_equal(opt.velocity["l.weight"], [0.75, -0.25])
    np.testing.assert_array_equal(params["l.weight"], [0.625, -1.875])
    opt.step(g)
    np.testing.assert_array_equal(opt.velocity["l.weight"], [1.03125, -0.34375])
    np.testing.assert_array_equal(params["l.weight"], [0.109375, -1.703125])
    assert opt.steps == 2


def test_sgd_per_param_lr_and_lr_scale():
    """θ ← θ − s·η_θ·v with per-parameter η_θ (Eq. 8.3) and the global scale s."""
    params = {"a.weight": np.array([1.0]), "a.bias": np.array([1.0])}
    opt = SGD(params, lr=0.5, momentum=0.0, lr_per_param={"a.bias": 0.125})
    opt.step({"a.weight": np.array([1.0]), "a.bias": np.array([1.0])}, lr_scale=2.0)
    np.testing.assert_array_equal(params["a.weight"], [0.0])  # 1 − 2·0.5·1
    np.testing.assert_array_equal(params["a.bias"], [0.75])  # 1 − 2·0.125·1


def test_sgd_updates_the_model_dict_in_place():
    t = Teacher("c2m", (1, 4, 4), num_classes=2, dtype="float64", xp="numpy")
    before = {k: np.array(v) for k, v in t.params.items()}
    opt = SGD(t.params, lr=0.1)
    opt.step({k: np.ones_like(v) for k, v in before.items()})
    assert opt.params is t.params
    for k in before:
        np.testing.assert_allclose(t.params[k], before[k] - 0.1, rtol=0, atol=1e-15)


def test_sgd_rejects_missing_misshapen_and_unknown_gradients_before_updating():
    params = {"a.weight": np.zeros((2, 3)), "a.bias": np.zeros(2)}
    opt = SGD(params, lr=0.1)
    with pytest.raises(ValueError, match=r"gradient for parameter 'a\.bias' is missing"):
        opt.step({"a.weight": np.ones((2, 3))})
    with pytest.raises(ValueError, match=r"'a\.weight' has shape \(3, 2\) but the parameter has shape \(2, 3\)"):
        opt.step({"a.weight": np.ones((3, 2)), "a.bias": np.ones(2)})
    with pytest.raises(ValueError, match=r"gradient 'b\.weight' has no parameter"):
        opt.step({"a.weight": np.ones((2, 3)), "a.bias": np.ones(2), "b.weight": np.ones(1)})
    np.testing.assert_array_equal(params["a.weight"], 0.0)  # nothing changed
    assert opt.steps == 0
    with pytest.raises(ValueError, match=r"lr_per_param names 'c\.weight'"):
        SGD(params, lr=0.1, lr_per_param={"c.weight": 0.1})


def test_sgd_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(0)
    p1 = {"a.weight": rng.standard_normal((3, 2)), "a.bias": rng.standard_normal(3)}
    p2 = {k: v.copy() for k, v in p1.items()}
    grads = [{k: rng.standard_normal(v.shape) for k, v in p1.items()} for _ in range(4)]
    o1 = SGD(p1, lr=0.1, momentum=0.9, weight_decay=1e-3)
    o2 = SGD(p2, lr=0.1, momentum=0.9, weight_decay=1e-3)
    for g in grads[:2]:
        o1.step(g)
        o2.step(g)
    state = o1.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state["velocity"].values())
    o3 = SGD(p2, lr=1.0, momentum=0.0)  # wrong hyper-parameters, restored from the state
    o3.load_state_dict(state)
    for g in grads[2:]:
        o1.step(g)
        o3.step(g)
    for k in p1:
        np.testing.assert_array_equal(p1[k], p2[k])
    with pytest.raises(ValueError, match=r"velocity for 'a\.bias' has shape \(4,\)"):
        o3.load_state_dict({"velocity": {"a.weight": np.zeros((3, 2)), "a.bias": np.zeros(4)}})


def test_sgd_state_under_array_api_strict():
    xs = backend.get_namespace("array_api_strict")
    params = {"a.weight": xs.asarray([1.0, -2.0])}
    opt = SGD(params, lr=0.5, momentum=0.5, weight_decay=0.25)
    opt.step({"a.weight": xs.asarray([0.5, 0.25])})
    state = opt.state_dict()
    np.testing.assert_array_equal(state["velocity"]["a.weight"], [0.75, -0.25])
    opt.load_state_dict(state)
    opt.step({"a.weight": xs.asarray([0.5, 0.25])})
    np.testing.assert_array_equal(backend.to_numpy(params["a.weight"]), [0.109375, -1.703125])


# ---------------------------------------------------------------------- schedule (Eq. 8.2) and per-layer rates (8.3)
def test_cosine_lr_endpoints_midpoint_and_constant_tail():
    kw = dict(lr0=0.25, lr_min=1e-5, epochs_cos=100)
    assert cosine_lr(0, **kw) == 0.25
    assert cosine_lr(100, **kw) == 1e-5
    assert cosine_lr(120, **kw) == 1e-5  # constant after E_cos
    assert math.isclose(cosine_lr(50, **kw), (0.25 + 1e-5) / 2, rel_tol=1e-15)
    rates = [cosine_lr(e, **kw) for e in range(101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    assert cosine_lr(3, lr0=0.1, lr_min=0.0, epochs_cos=0) == 0.0
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        cosine_lr(-1, **kw)


def test_optimizer_anneal_keeps_each_layers_own_start():
    params = {"conv1.weight": np.zeros(1), "fc1.weight": np.zeros(1)}
    opt = SGD(params, lr=0.0, lr_per_param=per_layer_lrs(params, [0.25, 0.05]))
    assert opt.anneal(0, lr_min=1e-5, epochs_cos=10) == {"conv1.weight": 0.25, "fc1.weight": 0.05}
    assert opt.anneal(10, lr_min=1e-5, epochs_cos=10) == {"conv1.weight": 1e-5, "fc1.weight": 1e-5}


def test_per_layer_lrs_laborieux_mapping_and_count_error():
    t = Teacher("c4m-c4m-c4m-c4p0m", (3, 32, 32), num_classes=10, xp="numpy")
    lrs = per_layer_lrs(t.params, [0.25, 0.15, 0.1, 0.08, 0.05])
    assert list(lrs) == list(t.params)
    assert lrs == {"conv1.weight": 0.25, "conv1.bias": 0.25, "conv2.weight": 0.15, "conv2.bias": 0.15,
                   "conv3.weight": 0.1, "conv3.bias": 0.1, "conv4.weight": 0.08, "conv4.bias": 0.08,
                   "fc1.weight": 0.05, "fc1.bias": 0.05}
    with pytest.raises(ValueError, match=r"got 4 per-layer learning rates for 5 layers \(conv1, conv2, conv3, "
                                         r"conv4, fc1\)"):
        per_layer_lrs(t.params, [0.25, 0.15, 0.1, 0.08])


# ---------------------------------------------------------------------- checkpoints
def _small_state(seed=0):
    t = Teacher("c2m-f3", (1, 4, 4), num_classes=2, xp="numpy", seed=seed)
    opt = SGD(t.params, lr=0.1, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4, 1, 4, 4)).astype(np.float32)
    y = rng.integers(0, 2, size=4)
    opt.step(t.loss_and_grads(x, y)[1])
    return t, opt, rng


def test_checkpoint_round_trip(tmp_path):
    t, opt, rng = _small_state()
    path = tmp_path / "ck.npz"
    config = {"arch": "c2m-f3", "shape": (1, 4, 4), "lrs": [0.1, 0.2], "nested": {"beta": 0.5}}
    save_checkpoint(path, params=t.params, optimizer_state=opt.state_dict(), epoch=7,
                    rng_state=rng.bit_generator.state, config=config, extra={"hist": np.arange(3.0), "note": "x"})
    expected_draws = rng.standard_normal(5)
    ck = load_checkpoint(path)
    assert ck.epoch == 7 and ck.version == FORMAT_VERSION == 2
    assert list(ck.params) == list(t.params)
    for k, v in t.params.items():
        assert ck.params[k].dtype == np.float32
        np.testing.assert_array_equal(ck.params[k], v)
    assert ck.config == {"arch": "c2m-f3", "shape": [1, 4, 4], "lrs": [0.1, 0.2], "nested": {"beta": 0.5}}
    np.testing.assert_array_equal(ck.extra["hist"], np.arange(3.0))
    assert ck.extra["note"] == "x"
    for k, v in opt.velocity.items():
        np.testing.assert_array_equal(ck.optimizer_state["velocity"][k], v)
    assert ck.optimizer_state["steps"] == 1
    restored = np.random.default_rng()
    restored.bit_generator.state = ck.rng_state
    np.testing.assert_array_equal(restored.standard_normal(5), expected_draws)
    assert not [p for p in os.listdir(tmp_path) if p != "ck.npz"]


def test_checkpoint_of_array_api_strict_params(tmp_path):
    xs = backend.get_namespace("array_api_strict")
    t = Teacher("c2m", (1, 4, 4), num_classes=2, dtype="float64", xp=xs)
    save_checkpoint(tmp_path / "s.npz", params=t.params)
    ck = load_checkpoint(tmp_path / "s.npz")
    for k, v in t.params.items():
        np.testing.assert_array_equal(ck.params[k], backend.to_numpy(v))


def test_unserialisable_config_raises_before_touching_the_file(tmp_path):
    t, _, _ = _small_state()
    path = tmp_path / "ck.npz"
    save_checkpoint(path, params=t.params, epoch=1)
    with pytest.raises(TypeError, match=r"config"):
        save_checkpoint(path, params=t.params, epoch=2, config={"f": object()})
    assert load_checkpoint(path).epoch == 1
    assert os.listdir(tmp_path) == ["ck.npz"]


def test_crash_midway_keeps_previous_checkpoint_and_leaves_no_temp(tmp_path, monkeypatch):
    """An exception while the new file is half written: the old checkpoint survives intact."""
    import numpy.lib.format as npformat

    old, _, _ = _small_state(seed=1)
    new, _, _ = _small_state(seed=2)
    path = tmp_path / "ck.npz"
    save_checkpoint(path, params=old.params, epoch=1)
    real_write = npformat.write_array
    calls = {"n": 0}

    def failing_write(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # after two arrays are in the zip
            raise OSError("simulated crash while writing")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(npformat, "write_array", failing_write)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, params=new.params, epoch=2)
    monkeypatch.setattr(npformat, "write_array", real_write)
    assert calls["n"] == 3
    ck = load_checkpoint(path)
    assert ck.epoch == 1
    for k, v in old.params.items():
        np.testing.assert_array_equal(ck.params[k], v)
    assert os.listdir(tmp_path) == ["ck.npz"]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_killed_writer_keeps_previous_checkpoint(tmp_path):
    """A writer process killed (SIGKILL) halfway through a large checkpoint: the checkpoint's
    name still holds the previous, loadable file; the half-written temporary has another name
    and is itself rejected as truncated."""
    old, _, _ = _small_state(seed=1)
    path = tmp_path / "ck.npz"
    save_checkpoint(path, params=old.params, epoch=1)
    flag = tmp_path / "halfway"
    code = textwrap.dedent(f"""
        import pathlib, time
        import numpy as np
        import numpy.lib.format as npformat
        real = npformat.write_array
        count = [0]
        def write(*a, **k):
            real(*a, **k)
            count[0] += 1
            if count[0] == 2:
                a[0].flush()
                pathlib.Path({str(flag)!r}).touch()
                time.sleep(120)
        npformat.write_array = write
        from pyeqprop.train.checkpoint import save_checkpoint
        big = {{"a.weight": np.ones((1024, 1024), np.float32), "b.weight": np.ones((1024, 1024), np.float32)}}
        save_checkpoint({str(path)!r}, params=big, epoch=2)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None, f"writer exited early with code {proc.returncode}"
            assert time.monotonic() < deadline, "writer never reached the middle of the write"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ck = load_checkpoint(path)
    assert ck.epoch == 1 and list(ck.params) == list(old.params)
    temps = [p for p in os.listdir(tmp_path) if p not in ("ck.npz", "halfway")]
    assert len(temps) == 1 and temps[0].startswith(".ck.npz.") and temps[0].endswith(".tmp")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / temps[0])


@pytest.mark.parametrize("keep", [0, 100, 0.5, -30])
def test_truncated_checkpoint_raises_checkpoint_error_naming_the_path(tmp_path, keep):
    t, opt, _ = _small_state()
    path = tmp_path / "ck.npz"
    save_checkpoint(path, params=t.params, optimizer_state=opt.state_dict())
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    path.write_bytes(data[:n])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_foreign_npz_and_missing_file(tmp_path):
    foreign = tmp_path / "weights.npz"
    np.savez(foreign, conv1_weight=np.zeros(3))
    with pytest.raises(CheckpointError, match=r"is not a pyeqprop checkpoint: it has no '__pyeqprop_format__'") as info:
        load_checkpoint(foreign)
    assert str(foreign) in str(info.value)
    with pytest.raises(CheckpointError, match=r"does not exist") as info:
        load_checkpoint(tmp_path / "nope.npz")
    assert str(tmp_path / "nope.npz") in str(info.value)
    npy = tmp_path / "arr.npy"
    np.save(npy, np.zeros(3))
    with pytest.raises(CheckpointError, match="single .npy array"):
        load_checkpoint(npy)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "future.npz"
    np.savez(path, __pyeqprop_format__=np.asarray(json.dumps({"format": "pyeqprop.checkpoint", "version": 99})))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_checkpoint(path)


def test_architecture_mismatch_names_key_and_shapes(tmp_path):
    small = Teacher("c4m-f3", (1, 8, 8), num_classes=2, xp="numpy")
    save_checkpoint(tmp_path / "ck.npz", params=small.params)
    host = load_checkpoint(tmp_path / "ck.npz").params
    check_compatible(host, small.params)
    wider = Teacher("c8m-f3", (1, 8, 8), num_classes=2, xp="numpy")
    with pytest.raises(CheckpointError, match=r"another architecture: parameter 'conv1\.weight' has shape "
                                              r"\(4, 1, 3, 3\) in the checkpoint but \(8, 1, 3, 3\) in the model"):
        check_compatible(host, wider.params)
    deeper = Teacher("c4m-c4-f3", (1, 8, 8), num_classes=2, xp="numpy")
    with pytest.raises(CheckpointError, match=r"another architecture: parameter 'conv2\.weight' of the model"):
        check_compatible(host, deeper.params)
    shallower = Teacher("c4m", (1, 8, 8), num_classes=2, xp="numpy")
    with pytest.raises(CheckpointError, match=r"'fc1\.weight' has shape \(3, 64\) in the checkpoint but \(2, 64\)"):
        check_compatible(host, shallower.params)


def test_teacher_save_load_round_trip_gives_identical_predictions(tmp_path):
    t, _, _ = _small_state(seed=3)
    path = tmp_path / "teacher.npz"
    save_teacher(path, t, {"epochs": 2})
    x = np.random.default_rng(5).standard_normal((16, 1, 4, 4)).astype(np.float32)
    back = load_teacher(path, xp="numpy")
    assert back.spec() == t.spec()
    np.testing.assert_array_equal(back.logits(x), t.logits(x))
    np.testing.assert_array_equal(back.predict(x), t.predict(x))
    assert load_checkpoint(path).config == {"epochs": 2}
    xs = backend.get_namespace("array_api_strict")
    strict = load_teacher(path, xp=xs)
    np.testing.assert_array_equal(backend.to_numpy(strict.logits(xs.asarray(x))), t.logits(x))
    wide = load_teacher(path, xp="numpy", dtype="float64")
    assert wide.params["conv1.weight"].dtype == np.float64
    save_checkpoint(tmp_path / "plain.npz", params=t.params)
    with pytest.raises(CheckpointError, match="holds no teacher"):
        load_teacher(tmp_path / "plain.npz", xp="numpy")


# ---------------------------------------------------------------------- training smoke test
def _quadrant_data(rng, n):
    """4 classes of 1×8×8 images: a bright 3×3 blob in quadrant k (jittered by one pixel) plus noise."""
    y = rng.integers(0, 4, size=n)
    x = 0.3 * rng.standard_normal((n, 1, 8, 8))
    for i, k in enumerate(y):
        r0 = 1 + 4 * (k // 2) + rng.integers(-1, 1)
        c0 = 1 + 4 * (k % 2) + rng.integers(-1, 1)
        x[i, 0, r0:r0 + 3, c0:c0 + 3] += 1.5
    return x.astype(np.float32), y


def test_teacher_trains_on_separable_data():
    """Backprop (Eq. 7.3) + SGD (Eq. 8.1) learn a separable 4-class task: > 90 % held-out accuracy."""
    rng = np.random.default_rng(0)
    x, y = _quadrant_data(rng, 640)
    xtr, ytr, xte, yte = x[:512], y[:512], x[512:], y[512:]
    t = Teacher("c8m-c8m", (1, 8, 8), num_classes=4, xp="numpy", seed=0)
    opt = SGD(t.params, lr=0.05, momentum=0.9, weight_decay=1e-4)
    chance = t.accuracy(xte, yte)
    first = None
    for epoch in range(6):
        opt.anneal(epoch, lr_min=1e-3, epochs_cos=6)
        order = rng.permutation(len(xtr))
        for i in range(0, len(xtr), 32):
            b = order[i:i + 32]
            loss, grads = t.loss_and_grads(xtr[b], ytr[b])
            first = loss if first is None else first
            opt.step(grads)
    acc = t.accuracy(xte, yte, batch_size=50)
    assert acc > 0.9, f"held-out accuracy {acc:.3f} (at init {chance:.3f}); first batch loss {first:.3f}"
    assert t.loss(xte, yte) < 0.5 * first
