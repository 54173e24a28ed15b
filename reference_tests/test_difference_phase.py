"""Nudged phases in difference variables (Eqs. 2.12, 4.8).

The oracle for every Δ primitive is the plain difference of two evaluations in float64,
f(a + da) − f(a), with perturbations large enough to move max-pool argmaxes. The phase-level
tests compare the δ phase with the state phase of (3.8)/(3.13) in float64 (same fixed point
up to the settling tolerance) and show what the difference form is for: in float32 its
estimate stays within an a-priori rounding bound of the float64 one at every layer, where the
state form's conv1 estimate is off by more than its own size.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pyeqprop as pe
from pyeqprop.learning.estimators import ep_estimate
from pyeqprop.learning.settle import Settling, settle, settle_difference
from pyeqprop.learning.signals import LocalErrorHead
from pyeqprop.ops.activations import clip_delta, get_activation
from pyeqprop.testing.rounding import gamma


# ---------------------------------------------------------------------- (2.12) Δρ
_finite = st.floats(-4.0, 4.0, allow_nan=False, width=32)


@given(v=_finite, dv=_finite)
def test_clip_delta_is_the_difference_of_two_clips(v, dv):
    """Eq. 2.12 in float32 against the exact difference (float64 of float32 inputs), within the rounding of
    its three operations on its two terms."""
    v32, dv32 = np.asarray([v], np.float32), np.asarray([dv], np.float32)
    got = float(clip_delta(v32, dv32)[0])
    v64, d64 = float(v32[0]), float(dv32[0])
    exact = min(max(v64 + d64, 0.0), 1.0) - min(max(v64, 0.0), 1.0)
    t1 = abs(v64 - min(max(v64, 0.0), 1.0))
    t2 = abs(min(max(d64, -v64), 1.0 - v64))
    assert abs(got - exact) <= gamma(np.float32, 3) * (t1 + t2) + 1e-45


def test_clip_delta_keeps_a_small_change_exactly():
    """Inside the linear piece Δρ = dv to the last bit however small dv is next to v, and outside it a
    change that stays outside gives exactly 0; ρ(v + dv) − ρ(v) in float32 loses dv below v's ulp."""
    rng = np.random.default_rng(0)
    v = rng.uniform(0.1, 0.9, 1000).astype(np.float32)
    dv = (rng.standard_normal(1000) * 1e-9).astype(np.float32)
    assert np.array_equal(clip_delta(v, dv), dv)
    naive = np.clip(v + dv, 0, 1) - np.clip(v, 0, 1)
    assert not np.array_equal(naive, dv)  # what the state form computes: dv rounded to v's ulp
    out = np.concatenate([rng.uniform(1.01, 3, 500), rng.uniform(-3, -0.01, 500)]).astype(np.float32)
    assert np.array_equal(clip_delta(out, dv), np.zeros_like(dv))


@pytest.mark.parametrize("name", ["hard_sigmoid", "half_hard_sigmoid"])
def test_activation_delta_matches_its_function(name):
    act = get_activation(name)
    rng = np.random.default_rng(1)
    u, du = rng.uniform(-1, 3, 2000), rng.uniform(-2, 2, 2000)
    np.testing.assert_allclose(act.delta(u, du), act.fn(u + du) - act.fn(u), rtol=0, atol=4 * np.finfo(float).eps)


# ---------------------------------------------------------------------- (4.8) ΔB, ΔT, the parameter adjoint
def _net64(arch="c4-c6m-c6a-c8m-f12", shape=(2, 8, 8), feedback=1.0, seed=0):
    return pe.CRNN(arch, shape, num_classes=10, readout="softmax", activation="half_hard_sigmoid", seed=seed,
                   dtype="float64", weight_scale=1.5, feedback=feedback)


def _states(net, n, rng, scale=1.0):
    return [rng.uniform(0, scale, (n, *shape)) for shape in net.arch.state_shapes]


def _rel_bound(net, l, *magnitudes):
    """γ_d(float64) times the scale of the terms: d = the layer's fan-in plus the pooling's few operations."""
    d = net.layers[l]
    fan = d.desc.in_channels * d.kernel * d.kernel if d.kind == "conv" else d.desc.in_features
    return gamma(np.float64, fan + 8) * max(float(np.max(np.abs(m))) for m in magnitudes) * fan


def test_delta_drives_are_the_difference_of_two_drives_argmax_flips_included():
    """bottom_up_delta and top_down_delta against B(a + da) − B(a) and T'(s + ds) − T(s) per layer kind
    (max, avg, identity, fc), with perturbations that move many argmaxes."""
    net = _net64()
    rng = np.random.default_rng(2)
    n = 3
    s, ds = _states(net, n, rng), [0.5 * rng.standard_normal((n, *sh)) for sh in net.arch.state_shapes]
    flips = 0
    for l in range(1, len(net.layers)):
        layer = net.layers[l]
        a, da = s[l - 1], ds[l - 1]
        B0, idx0 = layer.bottom_up(net.params, a)
        B1, idx1 = layer.bottom_up(net.params, a + da)
        z, zidx = layer.pre_pool(net.params, a)
        dB, moved = layer.bottom_up_delta(net.params, da, z, zidx)
        assert np.max(np.abs(dB - (B1 - B0))) <= _rel_bound(net, l, B0, B1)
        if idx0 is not None:
            assert np.array_equal(moved, idx1) and np.array_equal(zidx, idx0)
            flips += int(np.sum(idx1 != idx0))
        below = (n, *net.arch.state_shapes[l - 1])
        T0 = layer.top_down(net.params, s[l], idx0, below)
        T1 = layer.top_down(net.params, s[l] + ds[l], idx1, below)
        dT = layer.top_down_delta(net.params, ds[l], s[l], idx1, idx0, below)
        assert np.max(np.abs(dT - (T1 - T0))) <= _rel_bound(net, l, T0, T1) * 8
    assert flips > 20  # the bracket terms of Eq. 4.8 were exercised


def test_param_adjoint_delta_is_the_difference_of_two_adjoints():
    """param_adjoint_delta against param_adjoint at each phase's own state and argmax (Eq. 3.9), both phases
    moved (the symmetric estimator) and the second one the base itself (one-sided)."""
    net = _net64()
    rng = np.random.default_rng(3)
    n = 3
    s = _states(net, n, rng)
    d1 = [0.3 * rng.standard_normal((n, *sh)) for sh in net.arch.state_shapes]
    d2 = [0.3 * rng.standard_normal((n, *sh)) for sh in net.arch.state_shapes]
    x = rng.uniform(0, 1, (n, *net.input_shape))
    for l, layer in enumerate(net.layers):
        a = x if l == 0 else s[l - 1]
        da1, da2 = (None, None) if l == 0 else (d1[l - 1], d2[l - 1])
        idx = [layer.argmax(net.params, a if da is None else a + da) for da in (da1, da2, None)]
        for second, (dda2, dds2, idx2) in {"moved": (da2, d2[l], idx[1]), "base": (None, None, idx[2])}.items():
            ref1 = layer.param_adjoint(a if da1 is None else a + da1, s[l] + d1[l], idx[0])
            ref2 = layer.param_adjoint(a if dda2 is None else a + dda2, s[l] if dds2 is None else s[l] + dds2, idx2)
            got = layer.param_adjoint_delta(a, da1, s[l], d1[l], idx[0], dda2, dds2, idx2)
            for g, r1, r2 in zip(got, ref1, ref2):
                bound = gamma(np.float64, 4 * n * 64 + 8) * (float(np.max(np.abs(r1))) + float(np.max(np.abs(r2))))
                assert np.max(np.abs(g - (r1 - r2))) <= bound, (layer.name, second)


# ---------------------------------------------------------------------- (4.8) the phase
def _batch(net, n, seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, *net.input_shape)).astype(net.dtype_name)
    return x, rng.integers(0, net.num_classes, n)


def _net_with_head():
    """A 4-layer float64 net at ω = 0.5 (c = 8, 4, 2, 1) with a local error head on s_2 besides the readout,
    so that cost forces act on a layer whose weight c_l is not 1."""
    net = _net64(arch="c4-c6m-c8-f12", feedback=0.5)
    head = net.add_cost_term(LocalErrorHead(1, net.arch.state_shapes[1], 10), 0.5, seed=3)
    rng = np.random.default_rng(8)
    for spec in head.param_specs():  # a head starts at zero: give this one a force on s_2
        net.params[spec.name] = 0.3 * rng.standard_normal(spec.shape)
    return net


def _tail_ratio(residuals, k=10):
    """The largest ratio of successive residuals over the last k steps: the measured contraction q."""
    r = np.asarray(residuals[-(k + 1):], dtype=float)
    return float(np.max(r[1:] / r[:-1]))


@pytest.mark.parametrize("schedule", ["synchronous", "gauss-seidel"])
def test_the_difference_phase_settles_where_the_state_phase_does(schedule):
    """From a float64 free state settled to 1e-14, the δ phase's s⁰ + δ is the state phase's fixed point:
    per layer, in gradient units (c_l/β)|·|, within (2·tol + (c_max/β)(r⁰ + 4 eps)) / (1 − q), q the
    contraction measured on the recorded residuals (each phase is within tol·q/(1 − q) of its own fixed point;
    the two fixed points differ by what the free residual r⁰ moves)."""
    net = _net_with_head()
    x, y = _batch(net, 4, 5)
    beta, tol = 0.2, 1e-12
    free = settle(net, x, 4000, settling=Settling(schedule, tol=1e-14, check_every=1))
    assert free.converged
    nudge = net.nudge(x, y).at(beta)
    c = net.layer_weights
    c_max = max(c)
    state = settle(net, x, 4000, nudge=nudge, state=free.state, record=True,
                   settling=Settling(schedule, tol=tol * beta / c_max, check_every=1))
    base = net.free_base(x, free.state, nudge)
    diff = settle_difference(net, x, 4000, nudge=nudge, base=base, record=True,
                             settling=Settling(schedule, tol=tol, check_every=1))
    assert state.converged and diff.converged
    q = max(_tail_ratio(state.residuals), _tail_ratio(diff.residuals))
    assert q < 1
    bound = (2 * tol + (c_max / beta) * (free.residual + 4 * np.finfo(float).eps)) / (1 - q)
    for l in range(len(net.layers)):
        err = (c[l] / beta) * float(np.max(np.abs(diff.state[l] - state.state[l])))
        assert err <= bound, (l, err, bound)
        assert float(np.max(np.abs(diff.delta[l]))) > 100 * bound * beta / c[l]  # δ is far from zero


@pytest.mark.parametrize("estimator", ["symmetric", "one-sided"])
def test_the_difference_estimate_is_the_state_difference_estimate(estimator):
    """dphi_dtheta_delta_diff on the δ phases equals dphi_dtheta_diff on the states s⁰ + δ (Eqs. 4.6, 4.8)
    in float64: the inputs differ by the rounding of s⁰ + δ only, so the results agree within γ times the
    scale of the state form's summands."""
    net = _net_with_head()
    x, y = _batch(net, 4, 6)
    beta = 0.3
    st = Settling("gauss-seidel", tol=1e-10, check_every=1, nudged="difference")
    r = ep_estimate(net, x, y, beta=beta, T1=2000, T2=2000, estimator=estimator, settling=st)
    nudge = net.nudge(x, y)
    if estimator == "symmetric":
        ref = net.dphi_dtheta_diff(x, r.nudged[0].state, nudge.at(beta), r.nudged[1].state, nudge.at(-beta))
        scale = -1.0 / (2 * beta * x.shape[0])
    else:
        ref = net.dphi_dtheta_diff(x, r.nudged[0].state, nudge.at(beta), r.free.state, nudge)
        scale = -1.0 / (beta * x.shape[0])
    summands = [net.dphi_dtheta(x, p.state, nudge.at(b)) for p, b in zip(r.nudged, r.betas)]
    for k in net.params:
        size = max(float(np.max(np.abs(s[k]))) for s in summands) * abs(scale)
        assert np.max(np.abs(r.grads[k] - scale * ref[k])) <= gamma(np.float64, 4 * 64 * 8) * max(size, 1e-300), k


def _deep(dtype, seed=4):
    return pe.CRNN("c8-c8-c16m-c16-c16-c32m-c32-c32", (1, 8, 8), num_classes=10, readout="softmax",
                   activation="half_hard_sigmoid", seed=seed, dtype=dtype, weight_scale=4.0, feedback=0.1)


def _float32_vs_float64(nudged, T2=60):
    """The symmetric estimate of the 8-conv net at ω = 0.1 in float32 and in float64 from the same float32
    free state and parameters, T2 fixed nudged sweeps in both: the difference is rounding alone."""
    n32, n64 = _deep("float32"), _deep("float64")
    for k in n64.params:
        n64.params[k] = n32.params[k].astype(np.float64)
    x32, y = _batch(n32, 16, 7)
    free = settle(n32, x32, 300, settling=Settling("gauss-seidel", tol=1e-6))
    assert free.converged
    st = Settling("gauss-seidel", tol=0.0, nudged=nudged)
    g32 = ep_estimate(n32, x32, y, beta=0.5, T1=1, T2=T2, free_state=free.state, settling=st).grads
    g64 = ep_estimate(n64, x32.astype(np.float64), y, beta=0.5, T1=1, T2=T2,
                      free_state=[s.astype(np.float64) for s in free.state], settling=st).grads
    return n32, g32, g64


def _bound(net, T2):
    """An a-priori worst case for the relative rounding error of T2 sweeps, each a chain of the deepest
    reduction (the largest fan-in c·k·k) and a few elementwise operations: γ_{T2·(d_max + 16)}(float32)."""
    d_max = max(layer.desc.in_channels * layer.kernel ** 2 for layer in net.layers if layer.kind == "conv")
    return gamma(np.float32, T2 * (d_max + 16))


def test_the_float32_difference_estimate_is_within_rounding_of_float64_at_every_layer():
    net, g32, g64 = _float32_vs_float64("difference")
    bound = _bound(net, 60)
    for layer in net.layers:
        ref = g64[layer.weight]
        rel = float(np.max(np.abs(g32[layer.weight] - ref))) / float(np.max(np.abs(ref)))
        assert rel <= bound, (layer.name, rel, bound)


def test_the_float32_state_estimate_misses_that_bound_at_conv1():
    """The same comparison for the state form: conv1's estimate is rounding of a state difference of order
    β ω⁷ (SPEC 3.18, "The price"), off by more than the difference form's bound (and than its own size)."""
    net, g32, g64 = _float32_vs_float64("state")
    ref = g64["conv1.weight"]
    rel = float(np.max(np.abs(g32["conv1.weight"] - ref))) / float(np.max(np.abs(ref)))
    assert rel > _bound(net, 60)
    assert rel > 1.0


def test_a_difference_phase_needs_a_nudge():
    net = _net64()
    x, y = _batch(net, 2, 0)
    free = settle(net, x, 5)
    with pytest.raises(ValueError, match="beta != 0"):
        settle_difference(net, x, 5, nudge=net.nudge(x, y), base=net.free_base(x, free.state))
    with pytest.raises(ValueError, match="nudged must be one of state, difference"):
        Settling(nudged="delta")


def test_the_default_nudged_phase_is_the_state_form():
    """The conformance vectors and every existing run keep the state form unless asked."""
    assert Settling().nudged == "state"
    assert dataclasses.replace(Settling(), nudged="difference").nudged == "difference"


def test_the_difference_estimate_is_the_same_on_every_backend(xp):
    """The δ phases and their estimate (Eq. 4.8) in pure Array API code: on the backend under test and on
    NumPy the float64 estimates agree within twice the a-priori rounding of one computation,
    2 γ_{T2·(d_max + 16)} max|g| per parameter (reductions may run in another order)."""
    from pyeqprop import backend

    T2, out = 30, []
    for name in (xp, "numpy"):
        net = pe.CRNN("c4-c6m-c6a-f12", (1, 8, 8), num_classes=10, dtype="float64", xp=name, seed=0, feedback=0.5)
        rng = np.random.default_rng(0)
        x = backend.asarray(rng.uniform(0, 1, (3, 1, 8, 8)), xp=net.xp, dtype="float64")
        y = backend.asarray(rng.integers(0, 10, 3), xp=net.xp)
        r = ep_estimate(net, x, y, beta=0.2, T1=50, T2=T2, settling=Settling("gauss-seidel", nudged="difference"))
        out.append({k: backend.to_numpy(v) for k, v in r.grads.items()})
    d_max = max(layer.desc.in_channels * layer.kernel ** 2 for layer in net.layers if layer.kind == "conv")
    g = gamma(np.float64, T2 * (d_max + 16))
    for k, ref in out[1].items():
        assert np.max(np.abs(out[0][k] - ref)) <= 2 * g * float(np.max(np.abs(ref))), k
