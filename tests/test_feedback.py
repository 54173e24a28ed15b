"""The feedback gain ω and its per-layer energy weights (SPEC.md Eq. 3.18).

Oracle: Φ_ω = Σ_l ω^{l−L} ⟨B_l(s_{l−1}), s_l⟩ − β C rebuilt in torch from the network's parameters
(written from the SPEC, sharing no code with pyeqprop), differentiated by autograd. The settling,
BPTT, equilibrium-gradient and EP-limit properties at ω < 1 are in reference_tests/test_settling.py;
the dense Jacobian of the step and its radius in tests/test_spectrum.py.

Tolerances: float64 sums of at most d terms are within γ_d = d·u/(1 − d·u) of Σ|terms|
(u = 2^-53); the nets here have d < 10^3, so 1e-12 of the largest magnitude bounds the
difference of two such evaluations with room to spare.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from pyeqprop.learning.settle import Settling, settle
from pyeqprop.model.crnn import CRNN
from pyeqprop.model.spectrum import linearisation, step_radius

torch = pytest.importorskip("torch")
F = torch.nn.functional

ARCH, SHAPE = "c3-c4m-f6", (2, 6, 6)


def _net(feedback, **kw):
    return CRNN(ARCH, SHAPE, num_classes=6, readout="mse", activation="half_hard_sigmoid", dtype="float64",
                xp="numpy", seed=4, weight_scale=2.0, feedback=feedback, **kw)


def _torch_phi(net, x, s, params, beta, y):
    """Φ_ω^β per batch in torch (Eqs. 3.2, 3.3, 3.6, 3.18): Σ_l ω^{l−L}⟨B_l, s_l⟩ − β ½‖s_L − onehot(y)‖²."""
    L = len(net.arch.layers)
    phi = 0.0
    for l, desc in enumerate(net.arch.layers):
        below = x if l == 0 else s[l - 1]
        W, b = params[f"{desc.name}.weight"], params[f"{desc.name}.bias"]
        if desc.kind == "conv":
            z = F.conv2d(below, W, b, padding=desc.padding)
            z = F.max_pool2d(z, 2, 2) if desc.pool == "max" else z
        else:
            z = F.linear(below.flatten(1), W, b)
        phi = phi + net.feedback ** ((l + 1) - L) * (z * s[l]).sum()
    target = F.one_hot(torch.from_numpy(y), net.num_classes).double()
    return phi - beta * 0.5 * ((s[-1] - target) ** 2).sum()


def _case(feedback):
    net = _net(feedback)
    rng = np.random.default_rng(9)
    x = rng.uniform(0.0, 1.0, (3, *SHAPE))
    y = rng.integers(0, 6, size=3)
    s = [rng.uniform(0.0, 1.0, shape) for shape in net.state_shapes(3)]
    return net, x, y, s


@pytest.mark.parametrize("feedback", [1.0, 0.3, 0.05])
@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_the_drive_is_the_weighted_state_gradient_of_phi(feedback, beta):
    """Eq. 3.18: u_l = (1/c_l) ∂Φ_ω^β/∂s_l with c_l = ω^{l−L}; dphi_ds is ∂Φ_ω^β/∂s itself, and phi is Φ_ω^β."""
    net, x, y, s = _case(feedback)
    nudge = net.nudge(x, y, beta)
    P = {k: torch.from_numpy(np.asarray(v)) for k, v in net.params.items()}
    st = [torch.from_numpy(a).requires_grad_(True) for a in s]
    phi = _torch_phi(net, torch.from_numpy(x), st, P, beta, y)
    grads = torch.autograd.grad(phi, st)
    u = net.drive(x, s, nudge).u
    L = len(net.layers)
    for l, (g, ul, dl) in enumerate(zip(grads, u, net.dphi_ds(x, s, nudge))):
        c = feedback ** (l - (L - 1))
        assert net.layer_weights[l] == pytest.approx(c, rel=1e-15)
        scale = float(np.max(np.abs(g.numpy()))) + 1.0
        np.testing.assert_allclose(c * ul, g.numpy(), rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(dl, g.numpy(), rtol=0, atol=1e-12 * scale)
    assert float(np.sum(net.phi(x, s, nudge))) == pytest.approx(float(phi.detach()), rel=1e-12)


@pytest.mark.parametrize("feedback", [1.0, 0.3])
def test_dphi_dtheta_is_the_parameter_gradient_of_the_weighted_phi(feedback):
    """Eqs. 3.9, 3.18: layer l's ∂Φ_ω/∂θ carries c_l; the EP estimators difference exactly these (Eq. 4.6)."""
    net, x, y, s = _case(feedback)
    nudge = net.nudge(x, y, 0.4)
    P = {k: torch.from_numpy(np.array(v)).requires_grad_(True) for k, v in net.params.items()}
    phi = _torch_phi(net, torch.from_numpy(x), [torch.from_numpy(a) for a in s], P, 0.4, y)
    want = dict(zip(P, torch.autograd.grad(phi, list(P.values()))))
    got = net.dphi_dtheta(x, s, nudge)
    s2 = [np.clip(a + 0.01, 0.0, 1.0) for a in s]
    diff = net.dphi_dtheta_diff(x, s, nudge, s2, nudge.at(0.0))
    other = net.dphi_dtheta(x, s2, nudge.at(0.0))
    for k in net.params:
        scale = float(np.max(np.abs(want[k].numpy()))) + 1.0
        np.testing.assert_allclose(got[k], want[k].numpy(), rtol=0, atol=1e-12 * scale)
        np.testing.assert_allclose(diff[k], got[k] - other[k], rtol=0, atol=1e-12 * scale)


DEEP = "c8-c8-c16m-c16-c16-c32m-c32-c32"


def test_the_radius_is_sqrt_omega_times_the_plain_networks_at_the_same_linearisation():
    """Eq. 3.18: M⁻¹H_Φ is similar to √ω H, so with the same slopes and argmaxes the power iteration
    returns √ω times the ω = 1 radius (same start vector: the iterates agree up to the factor, and
    each norm is a float64 sum of < 10⁴ terms). This pins the operator the power iteration uses to
    that identity; that the radius is the Jacobian's is checked against a dense autograd Jacobian at
    ω = 0.3 in tests/test_spectrum.py. On the study's deep net at weight scale 4 the plain
    network's step is unstable (radius > 1) and ω = 0.1 makes it contract."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, (4, 1, 8, 8))
    plain = CRNN(DEEP, (1, 8, 8), num_classes=10, readout="softmax", activation="half_hard_sigmoid",
                 dtype="float64", seed=0, weight_scale=4.0)
    weak = CRNN(DEEP, (1, 8, 8), num_classes=10, readout="softmax", activation="half_hard_sigmoid",
                dtype="float64", seed=0, weight_scale=4.0, feedback=0.1)
    state = settle(weak, x, 200, settling=Settling("gauss-seidel", tol=1e-12))
    assert state.converged
    slopes, idx = linearisation(weak, x, state.state)
    start = [rng.standard_normal(a.shape) for a in state.state]
    r_plain = step_radius(plain, slopes, idx, iterations=200, tol=0.0, start=start)
    r_weak = step_radius(weak, slopes, idx, iterations=200, tol=0.0, start=start)
    np.testing.assert_allclose(r_weak.per_sample, math.sqrt(0.1) * r_plain.per_sample, rtol=1e-10)
    assert r_plain.radius > 1.0 > r_weak.radius


def test_a_vanishing_feedback_gain_gives_the_feed_forward_pass():
    """Eq. 3.18: as ω → 0 the free fixed point is s_l = ρ(B_l(s_{l−1})), the teacher's forward pass (7.1).

    At the fixed point u_l = B_l(s_{l−1}) + ω T_l(s_{l+1}); with a_l the forward pass and e_l =
    max|s_l − a_l|, e_l ≤ ρ'_max (G_l e_{l−1} + ω τ_l), where G_l is the ∞-norm of B_l's linear part
    (the largest Σ|W_l| over an output unit; a max pool does not increase it) and τ_l = max|T_l(s_{l+1})|,
    read off the drive as (u_l − B_l)/ω. The settled state's own error (tol 1e-14) adds to e_L."""
    gamma = 1e-12  # c_1 = ω^{-7} = 1e84: still a float64
    net = CRNN(DEEP, (1, 8, 8), num_classes=10, readout="softmax", activation="half_hard_sigmoid",
               dtype="float64", seed=1, weight_scale=4.0, feedback=gamma)
    x = np.random.default_rng(1).uniform(0.0, 1.0, (5, 1, 8, 8))
    got = settle(net, x, 300, settling=Settling("gauss-seidel", tol=1e-14))
    assert got.converged
    d = net.drive(x, got.state)
    bound, a = 0.0, x
    for l, layer in enumerate(net.layers):
        a = net.act.fn(layer.bottom_up(net.params, a)[0])  # the feed-forward pass, layer by layer
        W = np.asarray(net.params[layer.weight])
        G = float(np.max(np.sum(np.abs(W.reshape(W.shape[0], -1)), axis=1)))
        tau = float(np.max(np.abs(d.u[l] - d.bottom_up[l]))) / gamma
        bound = net.act.max_slope * (G * bound + gamma * tau) + 1e-14
        err = float(np.max(np.abs(got.state[l] - a)))
        assert err <= bound * (1 + 1e-9), (l, err, bound)
    assert bound < 1e-3  # the bound is small: the two passes agree to that


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), "0.5", True, None])
def test_a_bad_feedback_gain_is_named(bad):
    with pytest.raises(ValueError, match=r"feedback must be a number in \(0, 1\] .* got " + repr(bad).replace(
            "(", r"\(").replace(")", r"\)")):
        _net(bad)


def test_the_train_flag_builds_the_gain_and_rejects_a_bad_one(tmp_path, capsys):
    from pyeqprop.cli import main
    from pyeqprop.train.config import TrainConfig
    from pyeqprop.train.student import build_network

    cfg = TrainConfig(arch="c4m-c4", feedback=0.25)
    net = build_network(cfg, (1, 8, 8), 10, np)
    assert net.feedback == 0.25 and net.layer_weights == (0.25 ** -1, 1.0)
    rc = main(["train", "--feedback", "0", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "'feedback' has value 0.0" in err and not (tmp_path / "r").exists()
