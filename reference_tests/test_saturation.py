"""Saturated neurons (SPEC.md Eq. 3.19): the entries of a state at ρ = 0 and ρ = 1 are the units with ρ'(u) = 0.

Oracle: the pre-activation u_l = ∂Φ/∂s_l of one step, taken to the host, and the kinks of the two hard sigmoids
written here from SPEC §2 (u ≤ 0 below, u ≥ a above, a = 1 or 2), counted with NumPy; the state
compared is the step's s_l = ρ(u_l) on the backend under test. Counts are integers: exact equality.
"""
from __future__ import annotations

import numpy as np
import pytest

from pyeqprop.backend import asarray, to_numpy
from pyeqprop.learning.estimators import estimate
from pyeqprop.model.crnn import CRNN
from pyeqprop.model.saturation import saturated_counts
from pyeqprop.train.step import Update, step_metrics

UPPER_KINK = {"hard_sigmoid": 1.0, "half_hard_sigmoid": 2.0}  # SPEC §2: ρ = clip(u/a, 0, 1)


def _net(xp, activation, dtype="float64"):
    # weight scale 8: wide pre-activations, so that each layer has units below, inside and above the piece
    return CRNN("c4-c6m-f8", (2, 6, 6), num_classes=5, readout="mse", activation=activation, dtype=dtype, xp=xp,
                seed=3, weight_scale=8.0)


def _inputs(xp, net, n=7, seed=11):
    rng = np.random.default_rng(seed)
    x = asarray(rng.uniform(-1.0, 2.0, (n, *net.input_shape)), dtype=net.dtype, xp=xp)
    state = [asarray(rng.uniform(0.0, 1.0, sh), dtype=net.dtype, xp=xp) for sh in net.state_shapes(n)]
    return x, state


@pytest.mark.parametrize("activation", sorted(UPPER_KINK))
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_counts_are_the_units_below_and_above_the_linear_piece(xp, activation, dtype):
    net = _net(xp, activation, dtype)
    x, state = _inputs(xp, net)
    u = net.drive(x, state).u
    s = net.step(x, state)  # s_l = ρ(u_l): one synchronous step
    counts = saturated_counts(net, s)
    assert len(counts) == len(s)
    a = UPPER_KINK[activation]
    for l, ((lo, hi), ul) in enumerate(zip(counts, u)):
        uh = to_numpy(ul)
        want_lo, want_hi = int(np.count_nonzero(uh <= 0.0)), int(np.count_nonzero(uh >= a))
        assert 0 < want_lo and 0 < want_hi and want_lo + want_hi < uh.size, (l, want_lo, want_hi)  # all three kinds
        assert (int(to_numpy(lo)), int(to_numpy(hi))) == (want_lo, want_hi), (l, activation)


def test_step_metrics_report_the_free_states_counts_per_layer(xp):
    net = _net(xp, "half_hard_sigmoid")
    x, _ = _inputs(xp, net)
    y = asarray(np.arange(x.shape[0]) % net.num_classes, dtype=xp.int64, xp=xp)
    est = estimate("symmetric", net, x, y, beta=0.1, T1=20, T2=6)
    m = step_metrics(net, Update(est, {}), x, y)
    assert list(m.saturated_free) == [layer.name for layer in net.layers]
    for s, (name, (lo, hi, size)) in zip(est.free.state, m.saturated_free.items()):
        sh = to_numpy(s)
        assert size == sh.size
        assert (lo, hi) == (int(np.count_nonzero(sh == 0.0)), int(np.count_nonzero(sh == 1.0))), name
    assert any(lo + hi > 0 for lo, hi, _ in m.saturated_free.values())  # something to count
