"""The EP estimate's difference formed before the reductions (Eq. 4.6): its float32 rounding error is
bounded by the size of the difference, not of the two sums it replaces.

Given the same states (float32 values, exact inputs to both computations), the float32 result of
``dphi_dtheta_diff`` and the float64 one differ by at most γ_d(float32)·S_diff + γ_d(float64)·S_diff,
where S_diff is the Σ|terms| of Eq. 4.6 (W-adjoint(|a − a2|, |g|) + W-adjoint(|a2|, |g − g2|),
Σ|g − g2| for the bias), d the longest reduction (n·h·w positions per weight entry) plus the
elementwise operations. Subtracting after the reductions would carry γ_d·S of the summands instead,
up to 10⁷ times larger at conv1 (the second test shows the old way miss this bound).
"""
from __future__ import annotations

import numpy as np

import pyeqprop as pe
from pyeqprop.learning.estimators import ep_estimate
from pyeqprop.learning.settle import Settling
from pyeqprop.ops import conv2d_weight_grad
from pyeqprop.testing.rounding import gamma

ARCH, SHAPE = "c8-c8m-c16-c16m", (1, 8, 8)  # a 4-conv net on digits-sized inputs


def _nets():
    kw = dict(num_classes=10, readout="softmax", activation="half_hard_sigmoid", seed=0, weight_scale=1.5)
    return pe.CRNN(ARCH, SHAPE, dtype="float32", **kw), pe.CRNN(ARCH, SHAPE, dtype="float64", **kw)


def _phases():
    """Converged float32 phases of one symmetric estimate (the states both computations start from)."""
    n32, n64 = _nets()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (32, *SHAPE)).astype(np.float32)
    y = rng.integers(0, 10, 32)
    r = ep_estimate(n32, x, y, beta=0.05, T1=300, T2=200, settling=Settling("gauss-seidel", tol=1e-6))
    assert r.free.converged and all(p.converged for p in r.nudged)
    return n32, n64, x, y, r


def _s_diff_conv1(net64, x, s_p, s_m, idx_p, idx_m):
    """Σ|terms| of Eq. 4.6 for conv1 (its input x is shared: only the W-adjoint(|x|, |g − g2|) term)."""
    layer = net64.layers[0]
    g_p, g_m = layer.unpool(np.abs(s_p), idx_p), layer.unpool(np.abs(s_m), idx_m)
    dg = np.abs(layer.unpool(s_p, idx_p) - layer.unpool(s_m, idx_m))
    return (conv2d_weight_grad(np.abs(x), dg, kernel_size=layer.kernel, padding=layer.padding),
            dg.sum(axis=(0, 2, 3)), (g_p, g_m))


def test_the_float32_difference_is_within_the_bound_of_the_difference():
    """Eq. 4.6 at conv1 of a 4-conv net: float32 against float64 on the same (float32) states."""
    n32, n64, x, y, r = _phases()
    plus, minus = r.nudged
    x64 = x.astype(np.float64)
    sp64, sm64 = [s.astype(np.float64) for s in plus.state], [s.astype(np.float64) for s in minus.state]
    g32 = n32.dphi_dtheta_diff(x, plus.state, n32.nudge(x, y, 0.05), minus.state, n32.nudge(x, y, -0.05))
    for k in n64.params:
        n64.params[k] = n32.params[k].astype(np.float64)
    g64 = n64.dphi_dtheta_diff(x64, sp64, n64.nudge(x64, y, 0.05), sm64, n64.nudge(x64, y, -0.05))
    idx_p = n64.nudge(x64).x_drive[1]
    S_w, S_b, _ = _s_diff_conv1(n64, x64, sp64[0], sm64[0], idx_p, idx_p)
    n, (h, w) = x.shape[0], n64.layers[0].desc.conv_hw
    d = n * h * w + 4
    bound_w = (gamma(np.float32, d) + gamma(np.float64, d)) * S_w
    bound_b = (gamma(np.float32, d) + gamma(np.float64, d)) * S_b
    assert np.all(np.abs(g32["conv1.weight"] - g64["conv1.weight"]) <= bound_w)
    assert np.all(np.abs(g32["conv1.bias"] - g64["conv1.bias"]) <= bound_b)
    # the bound is about the difference: far below the summands' scale at conv1
    S_sum = conv2d_weight_grad(np.abs(x64), n64.layers[0].unpool(np.abs(sp64[0]), idx_p),
                               kernel_size=3, padding=1)
    assert float(np.max(S_w)) < 1e-2 * float(np.max(S_sum))


def test_subtracting_after_the_reductions_misses_that_bound():
    """The same comparison for Σ∂Φ/∂θ(s⁺) − Σ∂Φ/∂θ(s⁻) computed as two float32 sums: its error at
    conv1 exceeds the difference's bound (so the test above tells the two formulations apart)."""
    n32, n64, x, y, r = _phases()
    plus, minus = r.nudged
    x64 = x.astype(np.float64)
    sp64, sm64 = [s.astype(np.float64) for s in plus.state], [s.astype(np.float64) for s in minus.state]
    old = (n32.dphi_dtheta(x, plus.state, n32.nudge(x, y, 0.05))["conv1.weight"]
           - n32.dphi_dtheta(x, minus.state, n32.nudge(x, y, -0.05))["conv1.weight"])
    for k in n64.params:
        n64.params[k] = n32.params[k].astype(np.float64)
    exact = n64.dphi_dtheta_diff(x64, sp64, n64.nudge(x64, y, 0.05), sm64, n64.nudge(x64, y, -0.05))["conv1.weight"]
    idx_p = n64.nudge(x64).x_drive[1]
    S_w, _, _ = _s_diff_conv1(n64, x64, sp64[0], sm64[0], idx_p, idx_p)
    n, (h, w) = x.shape[0], n64.layers[0].desc.conv_hw
    bound = (gamma(np.float32, n * h * w + 4) + gamma(np.float64, n * h * w + 4)) * S_w
    assert np.any(np.abs(old - exact) > bound)
