"""Batch shards (SPEC.md Eq. 4.7): k sub-batch estimates combined into the whole batch's estimate.

The reference is the unsharded estimate of the same batch. Both are rounded computations of one
exact quantity, each within the EP rounding bound of the conformance vectors
(``pyeqprop.conformance.tolerances.ep_tolerance``, computed for the whole batch; a shard's bound is
the part of it that its samples contribute), so they differ by at most twice that bound plus the
rounding of the combination itself (k products and k − 1 sums: γ_{2k} Σ_j (n_j/n)|g_j|). Shard
sizes are unequal (5 samples in 2 or 3 shards), so a combination with the wrong weights is off by
O(|g|), far outside the bound.
"""
from __future__ import annotations

import numpy as np
import pytest

from pyeqprop.conformance.tolerances import bptt_tolerance, ep_tolerance
from pyeqprop.diagnostics import contracting_weight_scale
from pyeqprop.learning import Settling
from pyeqprop.learning.bptt import bptt
from pyeqprop.learning.estimators import estimate
from pyeqprop.learning.shards import merge_settled, shard_bounds, sharded
from pyeqprop.model.crnn import CRNN
from pyeqprop.testing.rounding import unit_roundoff

BETA, T1, T2 = 0.25, 10, 4


@pytest.fixture(scope="module")
def case():
    """A contracting float64 conv net (max and average pooling, softmax readout) and a batch of 5."""
    kw = dict(num_classes=3, readout="softmax", activation="half_hard_sigmoid", dtype="float64", xp="numpy", seed=12)
    base = CRNN("c3a-c4m", (2, 4, 8), **kw)
    net = CRNN("c3a-c4m", (2, 4, 8), weight_scale=float(f"{contracting_weight_scale(base, target=0.8):.3g}"), **kw)
    rng = np.random.default_rng(12)
    return net, rng.uniform(0.0, 1.0, (5, 2, 4, 8)), rng.integers(0, 3, 5).astype(np.int64)


def _combination_bound(parts, bounds, n, k):
    """γ_{2k} Σ_j (n_j/n)|g_j|: the rounding of the combination of Eq. 4.7 itself."""
    u = unit_roundoff(np.float64)
    gamma = 2 * k * u / (1 - 2 * k * u)
    return {name: gamma * sum(((sl.stop - sl.start) / n) * np.abs(p.grads[name]) for sl, p in zip(bounds, parts))
            for name in parts[0].grads}


@pytest.mark.parametrize("shards", [2, 3, 5])
@pytest.mark.parametrize("name", ["symmetric", "one-sided", "random-sign"])
def test_sharded_ep_estimate_is_the_batch_estimate(case, name, shards):
    """Eq. 4.7: Σ_j (n_j/n) g_j equals the whole batch's EP estimate (Eqs. 4.1-4.3) within twice its
    rounding bound, and the merged phases are the whole batch's phases (states in batch order)."""
    net, x, y = case
    sign = -1 if name == "random-sign" else None
    whole = estimate(name, net, x, y, beta=BETA, T1=T1, T2=T2, sign=sign)
    split = estimate(name, net, x, y, beta=BETA, T1=T1, T2=T2, sign=sign, shards=shards)
    tol, cond = ep_tolerance(net, x, y, net.prepare(x, y), name, whole, beta=BETA, T1=T1, T2=T2)
    bounds = shard_bounds(x.shape[0], shards)
    parts = [estimate(name, net, x[sl], y[sl], beta=BETA, T1=T1, T2=T2, sign=sign) for sl in bounds]
    comb = _combination_bound(parts, bounds, x.shape[0], shards)
    for k, g in whole.grads.items():
        bound = 2.0 * tol[f"grads/{k}"]["atol"] + comb[k]
        err = np.abs(split.grads[k] - g)
        assert np.all(err <= bound), f"{k}: max |Δ| {err.max():.3e} > bound {np.max(bound):.3e}"
    assert split.betas == whole.betas and len(split.nudged) == len(whole.nudged)
    for ph_split, ph_whole, e in [(split.free, whole.free, cond["free_state_error_bound"])] + \
            [(a, b, cond["nudged_state_error_bound"]) for a, b in zip(split.nudged, whole.nudged)]:
        assert ph_split.steps == ph_whole.steps
        for a, b in zip(ph_split.state, ph_whole.state):
            assert a.shape == b.shape and np.max(np.abs(a - b)) <= 2.0 * e


def test_sharded_bptt_is_the_batch_gradient(case):
    """Eq. 4.7 for the exact gradient through T1 steps (Eqs. 5.1-5.4): within twice BPTT's rounding bound
    (``bptt_tolerance``) plus the combination's own rounding."""
    net, x, y = case
    whole = bptt(net, x, y, T=T1, per_step=True)
    split = estimate("bptt", net, x, y, beta=BETA, T1=T1, T2=T2, shards=2)
    tol, _ = bptt_tolerance(net, x, y, whole, T=T1)
    bounds = shard_bounds(x.shape[0], 2)
    parts = [estimate("bptt", net, x[sl], y[sl], beta=BETA, T1=T1, T2=T2) for sl in bounds]
    comb = _combination_bound(parts, bounds, x.shape[0], 2)
    for k, g in whole.grads.items():
        err = np.abs(split.grads[k] - g)
        assert np.all(err <= 2.0 * tol[f"grads/{k}"]["atol"] + comb[k]), f"{k}: max |Δ| {err.max():.3e}"


def test_settling_to_a_tolerance_settles_every_shard(case):
    """With a tolerance (Eq. 3.14) each shard stops on its own residual: the merged phase has the largest
    residual (≤ tol), the most steps of any shard, and converged only when every shard did."""
    net, x, y = case
    st = Settling("synchronous", tol=1e-9, check_every=1)
    split = estimate("symmetric", net, x, y, beta=BETA, T1=400, T2=400, settling=st, shards=3)
    parts = [estimate("symmetric", net, x[sl], y[sl], beta=BETA, T1=400, T2=400, settling=st)
             for sl in shard_bounds(5, 3)]
    for i, ph in enumerate(split.phases()):
        shard_phases = [p.phases()[i] for p in parts]
        assert ph.converged and ph.residual <= 1e-9
        assert ph.residual == max(p.residual for p in shard_phases)
        assert ph.steps == max(p.steps for p in shard_phases)
    capped = estimate("symmetric", net, x, y, beta=BETA, T1=2, T2=2, settling=st, shards=2)
    assert capped.free.converged is False and capped.free.steps == 2


def test_merge_settled_fixed_steps_and_nan_residuals():
    """Fixed step counts give converged None; a shard without a known residual (NaN) makes it NaN."""
    from pyeqprop.learning.settle import Settled

    a = Settled([np.zeros((2, 3))], 0.5, [0.9, 0.5], 2, None)
    b = Settled([np.ones((1, 3))], 0.7, [0.8, 0.7], 2, None)
    m = merge_settled(np, [a, b])
    assert m.converged is None and m.residual == 0.7 and m.residuals == [0.9, 0.7] and m.steps == 2
    np.testing.assert_array_equal(m.state[0], np.array([[0, 0, 0], [0, 0, 0], [1, 1, 1]], float))
    assert np.isnan(merge_settled(np, [a, Settled([np.ones((1, 3))], float("nan"), [], 0, None)]).residual)


def test_shard_bounds():
    """Contiguous, in order, sizes ⌈n/k⌉ first; k outside [1, n] is named with the allowed range."""
    assert [(s.start, s.stop) for s in shard_bounds(7, 3)] == [(0, 3), (3, 5), (5, 7)]
    assert [(s.start, s.stop) for s in shard_bounds(4, 4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    for bad in (0, 6, 2.0, "2"):
        with pytest.raises(ValueError, match=r"shards must be an integer in \[1, 5\] for a batch of 5, got"):
            shard_bounds(5, bad)


def test_one_shard_is_the_plain_estimator(case):
    """shards = 1 runs the estimator itself: bit-identical to calling it directly."""
    net, x, y = case
    from pyeqprop.learning.estimators import symmetric

    a = sharded(symmetric, net, x, y, shards=1, beta=BETA, T1=T1, T2=T2)
    b = symmetric(net, x, y, beta=BETA, T1=T1, T2=T2)
    for k in a.grads:
        np.testing.assert_array_equal(a.grads[k], b.grads[k])
