"""Response asymmetry of symmetric EP's two nudged phases (SPEC.md Eq. 4.9).

Oracles: the norms of s^{±β} − s^0 taken to the host and combined with NumPy, written here from (4.9)
(they share nothing with :mod:`pyeqprop.learning.response` but the estimate's states); the linear-
response limit a_l = β‖w_l‖/‖v_l‖ + O(β²), seen as a_l halving with β; and the two exact cases of
the definition, δ^− = −δ^+ (a = 0) and δ^− = δ^+ (a = 1).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pyeqprop.backend import asarray, to_numpy
from pyeqprop.learning.estimators import estimate
from pyeqprop.learning.response import asymmetry, response_sums, too_asymmetric
from pyeqprop.learning.settle import Settling
from pyeqprop.model.crnn import CRNN


def _net(xp, arch="c4-c6m-f8", dtype="float64"):
    return CRNN(arch, (2, 6, 6), num_classes=5, readout="softmax", dtype=dtype, xp=xp, seed=3, weight_scale=2.0)


def _batch(xp, net, n=6, seed=5):
    rng = np.random.default_rng(seed)
    x = asarray(rng.uniform(-1.0, 2.0, (n, *net.input_shape)), dtype=net.dtype, xp=xp)
    y = asarray(rng.integers(0, 5, n), dtype="int64", xp=xp)
    return x, y


def _oracle(est):
    """a_l from the host copies of s^{±β} and s^0 (Eq. 4.9)."""
    s0 = [to_numpy(s) for s in est.free.state]
    sp = [to_numpy(s) for s in est.nudged[0].state]
    sm = [to_numpy(s) for s in est.nudged[1].state]
    return [np.linalg.norm((p - f) + (m - f)) / np.linalg.norm((p - f) - (m - f)) for p, m, f in zip(sp, sm, s0)]


@pytest.mark.parametrize("form", ["state", "difference"])
def test_asymmetry_is_the_ratio_of_the_response_norms(xp, form):
    net = _net(xp)
    x, y = _batch(xp, net)
    settling = Settling("gauss-seidel", 1e-10, 5, form)
    est = estimate("symmetric", net, x, y, beta=0.05, T1=400, T2=400, settling=settling)
    assert all(ph.converged for ph in est.phases())
    got = asymmetry(response_sums(est))
    want = _oracle(est)
    # float64 sums of squares of δ (from s − s^0 in the state form: its rounding, 1e-16 of s, is ≤ 1e-12 of δ
    # at β = 0.05 on this net) against the oracle's norms: agreement to 1e-8 relative
    np.testing.assert_allclose(got, want, rtol=1e-8)
    assert all(0.0 < a < 1.0 for a in got)


def test_asymmetry_halves_with_beta_where_the_response_is_smooth(xp):
    # (4.9): a_l = β‖w_l‖/‖v_l‖ + O(β²); halving β halves a_l up to a relative O(β), here β ≤ 1e-3 times
    # constants of the size of a_l/β ≈ 1.6: within 1 % of 1/2 (dense layers only: no argmax to flip)
    net = _net(xp, arch="f12-f10")
    x, y = _batch(xp, net)
    settling = Settling("gauss-seidel", 1e-13, 5, "difference")
    a = [asymmetry(response_sums(estimate("symmetric", net, x, y, beta=b, T1=2000, T2=2000, settling=settling)))
         for b in (1e-3, 5e-4)]
    ratio = np.asarray(a[1]) / np.asarray(a[0])
    np.testing.assert_allclose(ratio, 0.5, rtol=0.01)


def test_mirrored_responses_give_zero_and_one_response_alone_gives_one(xp):
    # δ^− = −δ^+: the linear response exactly, a = 0; δ^− = 0 beside δ^+ (one phase moved, the other not, the
    # limit of one phase that jumped): a = ‖δ^+‖/‖δ^+‖ = 1; δ^− = δ^+: no antisymmetric part at all, a = inf
    net = _net(xp)
    x, y = _batch(xp, net)
    est = estimate("symmetric", net, x, y, beta=0.05, T1=30, T2=10,
                   settling=Settling("synchronous", 0.0, 5, "difference"))
    plus = est.nudged[0]
    assert all(float(to_numpy(xp.max(xp.abs(d)))) > 0 for d in plus.delta)

    def with_minus(delta):
        return dataclasses.replace(est, nudged=[plus, dataclasses.replace(plus, delta=delta)])

    L = len(net.layers)
    assert asymmetry(response_sums(with_minus([-d for d in plus.delta]))) == [0.0] * L
    assert asymmetry(response_sums(with_minus([xp.zeros_like(d) for d in plus.delta]))) == [1.0] * L
    assert asymmetry(response_sums(with_minus(list(plus.delta)))) == [float("inf")] * L


def test_too_asymmetric_compares_the_largest_layer_with_the_limit():
    assert too_asymmetric([0.1, 0.7], 0.5) and not too_asymmetric([0.1, 0.4], 0.5)
    assert not too_asymmetric([0.1, 0.9], 0.0)  # 0: the check is off
    with pytest.raises(ValueError, match="asymmetry limit must be a number >= 0"):
        too_asymmetric([0.1], -1.0)


def test_other_estimators_have_no_asymmetry(xp):
    net = _net(xp)
    x, y = _batch(xp, net)
    est = estimate("one-sided", net, x, y, beta=0.05, T1=10, T2=4)
    with pytest.raises(ValueError, match=r"needs the two nudged phases \+β and −β"):
        response_sums(est)
