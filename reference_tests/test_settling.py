"""Settling to equilibrium: the Gauss–Seidel schedule (Eq. 3.13), settling to a tolerance (Eq. 3.14), the
Lyapunov function (Eq. 3.15), BPTT through Gauss–Seidel sweeps (Eq. 5.6) and the equilibrium gradient
(Eq. 5.7), each property over random small CRNNs (float64, NumPy).

Tolerances come from the rounding-error model (``pyeqprop.testing.rounding``): a sum of d terms
is within γ_d·Σ|terms| of the exact one. Where a quantity is a limit (EP → the equilibrium
gradient as β → 0, finite differences as h → 0), the test asserts the rate on a geometric
sequence until the error reaches its stated floor.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pyeqprop.diagnostics.gdu import contracting_weight_scale, lipschitz_bound
from pyeqprop.learning.bptt import bptt
from pyeqprop.learning.estimators import ep_estimate, estimate
from pyeqprop.learning.implicit import conjugate_gradient, equilibrium_gradient
from pyeqprop.learning.lyapunov import lyapunov, quadratic_weight
from pyeqprop.learning.settle import Settling, gauss_seidel_blocks, residual, settle, sweep
from pyeqprop.testing.model_strategies import crnn_configs
from pyeqprop.testing.rounding import gamma

F64 = np.float64
EPS = float(np.finfo(F64).eps)
SCHEDULES = ("synchronous", "gauss-seidel")


def _examples(divisor: int, minimum: int = 4):
    return settings(max_examples=max(minimum, settings.default.max_examples // divisor))


FEEDBACK = (1.0, 0.3)
"""Feedback gains ω of Eq. 3.18 the properties are checked at: the plain network and a weak top-down term."""


def _contracting(cfg, target=0.4, feedback=1.0):
    """The config's network with weights scaled so that its Lipschitz bound is ≤ ½ (a unique fixed point).

    The bound is the plain network's (ω = 1); with ω < 1 the top-down terms only shrink and the
    readout's nudge on s_L (c_L = 1) is unchanged, so it bounds the map at ``feedback`` too (Eq. 3.18)."""
    scale = contracting_weight_scale(cfg.net(weight_scale=1.0), target=target)
    while lipschitz_bound(cfg.net(weight_scale=scale)) > 0.5:
        scale *= 0.5
    return cfg.net(weight_scale=scale, feedback=feedback)


def _vec(g, names):
    return np.concatenate([np.ravel(np.asarray(g[k], dtype=F64)) for k in names])


def _maxdiff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(u) - np.asarray(v)))) for u, v in zip(a, b))


def _piece(net, x, s, nudge=None):
    """The linear piece of ρ of every pre-activation (below / inside / above the kinks) and the argmaxes."""
    lo, hi = net.act.kinks
    d = net.drive(x, s, nudge)
    return [(np.where(u <= lo, 0, np.where(u >= hi, 2, 1)), None if i is None else np.asarray(i))
            for u, i in zip(d.u, d.indices)]


def _same_piece(p, q) -> bool:
    return all(np.array_equal(a, c) and ((b is None and e is None) or np.array_equal(b, e))
               for (a, b), (c, e) in zip(p, q))


# =========================================================================== (3.13) the schedule
@given(cfg=crnn_configs(), beta=st.sampled_from((0.0, 0.6)))
def test_a_gauss_seidel_sweep_is_odd_layers_then_even_layers(cfg, beta):
    """Eq. 3.13 from its definition: s_l ← ρ(∂Φ^β/∂s_l(s)) for the odd layers (1, 3, …) at the current
    state, then for the even layers at the new one; every other layer is kept. The sweep (which
    reuses the first block's bottom-up drives) equals it bit for bit."""
    net = cfg.net()
    rng = cfg.rng()
    x, y = cfg.data(rng)
    s = [rng.random(shape) for shape in net.state_shapes(cfg.n)]
    nudge = net.nudge(x, y, beta)
    first, second = gauss_seidel_blocks(len(net.layers))
    assert first == [l for l in range(len(net.layers)) if (l + 1) % 2 == 1] and second == [
        l for l in range(len(net.layers)) if (l + 1) % 2 == 0]
    want = list(s)
    for block in (first, second):
        u = net.dphi_ds(x, want, nudge)
        want = [net.act.fn(u[l]) if l in block else want[l] for l in range(len(want))]
    got, _ = sweep(net, x, s, nudge, "gauss-seidel")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


@_examples(2)
@given(cfg=crnn_configs())
def test_both_schedules_reach_the_one_fixed_point_of_a_contracting_net(cfg):
    """Eqs. 3.13-3.15: where s ↦ ρ(u(s)) is a contraction (Lipschitz bound q ≤ ½), the fixed point is
    unique and both schedules settle to it. Settled to r ≤ τ, each state is within τ·q/(1 − q) ≤ τ of
    it (geometric tail), so the two differ by at most 2τ plus round-off.

    The bound covers a continuous map only: a max pool in layer l + 1 > 1 routes the feedback T_l
    through the argmax of B_{l+1}(s_l), which jumps when that argmax changes, and then even small
    weights can leave two fixed points (a hypothesis example found one 5e-3 apart). Such nets are
    left out; a max pool in layer 1 reads the constant input and is kept."""
    assume(all(c.pool != "max" for c in cfg.convs[1:]))
    net = _contracting(cfg)
    x, _ = cfg.data(cfg.rng())
    tol = 1e-12
    states = []
    for schedule in SCHEDULES:
        st_ = settle(net, x, 2000, settling=Settling(schedule, tol=tol))
        assert st_.converged, f"{schedule} did not reach {tol} in 2000 steps ({cfg})"
        states.append(st_.state)
    assert _maxdiff(*states) <= 2 * tol + 64 * EPS, cfg


def test_gauss_seidel_takes_fewer_sweeps_than_synchronous_steps_on_a_two_layer_net():
    """Eq. 3.13's point, on a net whose synchronous dynamics oscillate (J = DH has eigenvalues ±λ): a sweep
    uses each new odd state at once, and the even layers' error contracts by λ² per sweep rather than
    λ per step. Counted to the same tolerance from zero."""
    import pyeqprop as pe

    net = pe.CRNN("c8-c8", (1, 6, 6), num_classes=3, readout="mse", dtype="float64", seed=5, weight_scale=1.5)
    x = np.random.default_rng(0).uniform(0, 1, (4, 1, 6, 6))
    steps = {s: settle(net, x, 3000, settling=Settling(s, tol=1e-10, check_every=1)) for s in SCHEDULES}
    assert all(r.converged for r in steps.values()), {s: r.residual for s, r in steps.items()}
    assert steps["gauss-seidel"].steps < steps["synchronous"].steps, {s: r.steps for s, r in steps.items()}


# =========================================================================== (3.14) tolerance
@given(cfg=crnn_configs(), k=st.integers(1, 7), schedule=st.sampled_from(SCHEDULES))
def test_settling_stops_at_the_first_checked_step_below_tol(cfg, k, schedule):
    """Eq. 3.14: with τ > 0 the phase stops at the first step t that is a multiple of k (or T) with
    r_t ≤ τ; it reports that step count, r_t and converged; the state is that of t plain steps."""
    net = cfg.net()
    x, _ = cfg.data(cfg.rng())
    T = 40
    rec = settle(net, x, T, record=True, settling=Settling(schedule))  # every r_t of the fixed-count run
    tol = float(np.quantile(rec.residuals, 0.3)) or 1e-300
    checked = [t for t in range(1, T + 1) if t % k == 0 or t == T]
    first = next((t for t in checked if rec.residuals[t - 1] <= tol), None)
    got = settle(net, x, T, settling=Settling(schedule, tol=tol, check_every=k))
    if first is None:
        assert got.steps == T and got.converged is False and got.residual == rec.residuals[-1]
    else:
        assert got.steps == first and got.converged is True and got.residual == rec.residuals[first - 1]
    again = settle(net, x, got.steps, settling=Settling(schedule))
    for a, b in zip(got.state, again.state):
        np.testing.assert_array_equal(a, b)


def test_a_fixed_count_reports_no_convergence_claim_and_a_bad_settling_is_named():
    import pyeqprop as pe

    net = pe.CRNN("c3m", (1, 4, 4), num_classes=2, dtype="float64")
    x = np.zeros((1, 1, 4, 4))
    r = settle(net, x, 3)
    assert r.steps == 3 and r.converged is None and math.isfinite(r.residual)
    for kw, words in ((dict(schedule="jacobi"), "schedule must be one of synchronous, gauss-seidel, got 'jacobi'"),
                      (dict(tol=-1.0), "tol must be a number >= 0"), (dict(check_every=0), "check_every must be")):
        with pytest.raises(ValueError, match=words):
            Settling(**kw)


# =========================================================================== (3.15) Lyapunov
def _lyapunov_scale(net, x, s) -> np.ndarray:
    """Σ|terms| of F per sample: c Σ‖s_l‖² + Σ_l ⟨|W_l| * |s_{l−1}| + |b_l|, |s_l|⟩ (pooled at the maximum)."""
    absnet = type(net)(net.arch_name, net.input_shape, num_classes=net.num_classes, readout=net.readout,
                       activation=net.activation, dtype="float64", feedback=net.feedback)
    for k in net.params:
        absnet.params[k] = np.abs(np.asarray(net.params[k]))
    return quadratic_weight(net) * sum(c * np.sum(a.reshape(a.shape[0], -1) ** 2, axis=1)
                                       for a, c in zip(s, net.layer_weights)) \
        + np.abs(absnet.phi(np.abs(x), [np.abs(a) for a in s]))


@given(cfg=crnn_configs(), scale=st.sampled_from((1.0, 2.0, 4.0)), feedback=st.sampled_from(FEEDBACK))
def test_lyapunov_never_increases_under_gauss_seidel(cfg, scale, feedback):
    """Eq. 3.15: F(s) = c Σ‖s_l‖² − Φ(s) does not rise over a Gauss–Seidel sweep (β = 0), at any weight
    scale (the nets need not contract: with large weights the dynamics have many fixed points), and with
    a feedback gain ω < 1 F_ω = c Σ c_l‖s_l‖² − Φ_ω does not either (Eq. 3.18). Each
    evaluation of F is within γ_d·S of the exact value (S its Σ|terms|), so a rise is allowed up to
    the sum of the two bounds."""
    net = cfg.net(weight_scale=scale, feedback=feedback)
    rng = cfg.rng()
    x, _ = cfg.data(rng)
    s = [rng.random(shape) for shape in net.state_shapes(cfg.n)]  # any state in the box
    d = 4 * max(int(np.prod(shape[1:])) for shape in net.state_shapes(1)) + 64 + max(
        int(np.prod(v.shape[1:])) if v.ndim > 1 else 1 for v in net.params.values()) * 9
    F = lyapunov(net, x, s)
    for _ in range(6):
        new, _ = sweep(net, x, s, None, "gauss-seidel")
        F_new = lyapunov(net, x, new)
        slack = gamma(F64, d) * (_lyapunov_scale(net, x, s) + _lyapunov_scale(net, x, new))
        assert np.all(F_new <= F + slack), (cfg, scale, F_new - F, slack)
        s, F = new, F_new


def test_lyapunov_can_rise_under_the_synchronous_schedule():
    """Eq. 3.15 claims monotonicity for Gauss–Seidel only: under synchronous updates both neighbours of a
    layer move at once, and F rises on this net (a two-layer net started where its 2-cycle mode is
    excited). Without this the Gauss–Seidel test above would not distinguish the schedules."""
    import pyeqprop as pe

    rises = 0
    for seed in range(5):
        net = pe.CRNN("c6-c6", (1, 5, 5), num_classes=2, readout="mse", dtype="float64", seed=seed, weight_scale=3.0)
        rng = np.random.default_rng(seed)
        x = rng.uniform(0, 1, (3, 1, 5, 5))
        s = [rng.random(shape) for shape in net.state_shapes(3)]
        F = lyapunov(net, x, s)
        for _ in range(10):
            s = net.step(x, s)
            F_new = lyapunov(net, x, s)
            rises += int(np.sum(F_new > F + 1e-9 * np.abs(F)))
            F = F_new
    assert rises > 0


# =========================================================================== (5.6) BPTT, Gauss–Seidel
@_examples(2)
@given(cfg=crnn_configs(), T=st.integers(1, 5), feedback=st.sampled_from(FEEDBACK))
def test_bptt_through_gauss_seidel_is_the_derivative_of_its_loss(cfg, T, feedback):
    """Eq. 5.6: BPTT through T Gauss–Seidel sweeps is the gradient of L(θ) = (1/n) Σ C(s_T(θ)), at feedback
    gain 1 and below (Eq. 3.18: (∂u/∂s)ᵀ and (∂u/∂θ)ᵀ carry ω on their bottom-up and W_l-from-μ_{l−1} terms).

    Along a random direction d, the central difference D(h) = [L(θ + hd) − L(θ − hd)]/(2h) tends to
    ⟨∂L/∂θ, d⟩ at rate h² within one piece (every block update's kinks and argmaxes unchanged at
    θ ± hd; else the example is rejected): from h to h/10 its error falls ≥ 50× until it meets the
    round-off floor 4·γ_d·S/h (S the Σ|terms| scale of L)."""
    net = _contracting(cfg, feedback=feedback)
    rng = cfg.rng()
    x, y = cfg.data(rng)
    ref = bptt(net, x, y, T=T, schedule="gauss-seidel")
    theta = {k: np.array(v) for k, v in net.params.items()}
    dtheta = {k: rng.standard_normal(v.shape) for k, v in theta.items()}
    directional = sum(float(np.sum(ref.grads[k] * dtheta[k])) for k in theta)

    def pieces_and_loss(h):
        for k in theta:
            net.params[k] = theta[k] + h * dtheta[k]
        nudge = net.nudge(x, y)  # B_1(x) depends on θ: a nudge holds for the parameters it was built with
        s, pieces = net.init_state(cfg.n), []
        for _ in range(T):
            s, blocks = sweep(net, x, s, nudge, "gauss-seidel")
            pieces += [_piece(net, x, s_in) for _, s_in, _ in blocks]
        loss = float(np.sum(net.cost(x, s, nudge))) / cfg.n
        for k in theta:
            net.params[k] = theta[k]
        return pieces, loss

    center, L0 = pieces_and_loss(0.0)
    errors, floors = [], []
    for h in (1e-3, 1e-4, 1e-5):
        (pp, lp), (pm, lm) = pieces_and_loss(h), pieces_and_loss(-h)
        assume(all(_same_piece(a, b) for a, b in zip(center, pp)) and all(
            _same_piece(a, b) for a, b in zip(center, pm)))
        errors.append(abs((lp - lm) / (2 * h) - directional))
        floors.append(4 * gamma(F64, 4096) * (abs(L0) + 1.0) / h + 1e3 * EPS * abs(directional))
    for i in range(len(errors) - 1):
        assert errors[i + 1] <= max(errors[i] / 50.0, 10 * floors[i + 1]), (cfg, T, errors, floors)


# =========================================================================== (5.7) equilibrium gradient
@_examples(2)
@given(cfg=crnn_configs(), schedule=st.sampled_from(SCHEDULES), feedback=st.sampled_from(FEEDBACK))
def test_the_equilibrium_gradient_is_bptt_over_many_steps(cfg, schedule, feedback):
    """Eq. 5.7 is the T → ∞ limit of BPTT (Eq. 5.4 / 5.6), at feedback gain 1 and below (Eq. 3.18: the
    symmetric form M^{−1/2} H_Φ M^{−1/2} in the solve, (∂u/∂s)ᵀ in BPTT). On a net with Lipschitz bound q ≤ ½ the
    BPTT sum is geometric: after T steps its tail is below q^T/(1 − q) of its size, negligible at
    T = 120; the solve stops at a relative residual ρ_cg = 1000·eps of A = I − D^{1/2}HD^{1/2}, whose
    condition number is ≤ (1 + q)/(1 − q) = 3, so μ is within 3ρ_cg; and each of the T steps adds
    round-off γ_d of its terms. Together: relative error ≤ 3ρ_cg + T·γ_d."""
    net = _contracting(cfg, feedback=feedback)
    x, y = cfg.data(cfg.rng())
    T = 120
    ref = bptt(net, x, y, T=T, schedule=schedule)
    # at BPTT's own last state: after T steps it is within q^T ≤ 2^-120 of s*, so the two gradients
    # differ by round-off only (a state settled to a tolerance τ would add ∂g/∂s·τ, which on a small
    # gradient can exceed the round-off)
    assert ref.residual <= 64 * EPS, (cfg, ref.residual)
    imp = equilibrium_gradient(net, x, y, T1=T, free_state=ref.final_state)
    assert imp.solved, (cfg, imp.rel_residual)
    names = list(net.params)
    g_ref = _vec(ref.grads, names)
    d = 8 * max(int(np.prod(shape[1:])) for shape in net.state_shapes(1)) + 256
    tol = (3 * 1000 * EPS + T * gamma(F64, d)) * float(np.linalg.norm(g_ref)) + 1e-14 * float(np.linalg.norm(g_ref))
    assert float(np.linalg.norm(_vec(imp.grads, names) - g_ref)) <= tol, (cfg, schedule)


@_examples(2)
@given(cfg=crnn_configs(), schedule=st.sampled_from(SCHEDULES), feedback=st.sampled_from(FEEDBACK))
def test_symmetric_ep_with_converged_phases_tends_to_the_equilibrium_gradient(cfg, schedule, feedback):
    """Eqs. 4.2, 4.4, 5.7: with every phase settled to τ (Eq. 3.14), symmetric EP approaches the
    equilibrium gradient at rate β² and one-sided EP at rate β, for either schedule and at feedback gain
    1 or below (Eq. 3.18: EP differences ∂Φ_ω/∂θ, the solve M^{−1/2} H_Φ M^{−1/2}), for the β whose
    nudged states stay in the free state's piece. Floor: the phases' settling error τ/(1 − q) and
    round-off γ_d, each times the scale ‖∂Φ/∂θ‖ of the difference EP takes, over βn‖g‖, plus the
    relative round-off 2γ_d of the estimate itself."""
    net = _contracting(cfg, feedback=feedback)
    x, y = cfg.data(cfg.rng())
    tol = 1e-13
    settling = Settling(schedule, tol=tol)
    imp = equilibrium_gradient(net, x, y, T1=3000, settling=settling)
    assert imp.free.converged and imp.solved
    names = list(net.params)
    g = _vec(imp.grads, names)
    norm = float(np.linalg.norm(g))
    assume(norm > 0.0)
    free = imp.free.state
    base = _piece(net, x, free)
    nudge = net.nudge(x, y)
    A = float(np.linalg.norm(_vec(net.dphi_dtheta(np.abs(x), [np.abs(s) for s in free]), names)))
    d = 8 * max(int(np.prod(shape[1:])) for shape in net.state_shapes(1)) + 256
    kept, errs = [], {"symmetric": [], "one-sided": []}
    for beta in (1e-1, 1e-2, 1e-3, 1e-4):
        est = {e: ep_estimate(net, x, y, beta=beta, T1=3000, T2=3000, estimator=e, free_state=free, settling=settling)
               for e in errs}
        if not all(ph.converged for r in est.values() for ph in r.nudged):
            continue
        if not all(_same_piece(base, _piece(net, x, ph.state, nudge.at(b)))
                   for r in est.values() for ph, b in zip(r.nudged, r.betas)):
            continue
        kept.append(beta)
        for e, r in est.items():
            errs[e].append(float(np.linalg.norm(_vec(r.grads, names) - g)) / norm)
    assume(len(kept) >= 2)
    # plus the estimate's own round-off relative to itself (the cost-only parameters' terms, and
    # everything when every state is zero, A = 0)
    floors = [(2 * tol / (1 - 0.5) + 2 * gamma(F64, d)) * A / (b * cfg.n * norm) + 2 * gamma(F64, d) for b in kept]
    for e, slope in (("symmetric", 1.8), ("one-sided", 0.9)):
        for i in range(len(kept) - 1):
            ratio = kept[i + 1] / kept[i]
            allowed = max(errs[e][i] * ratio ** slope, 10 * floors[i + 1])
            assert errs[e][i + 1] <= allowed, (cfg, schedule, e, kept, errs[e], floors)


def test_the_solve_stops_on_the_residual_of_the_system_in_mu_on_a_deep_net_with_weak_feedback():
    """Eq. 5.7's stopping rule: the solve runs in ν = (M D)^{-1/2} μ, whose layer l shrinks like ω^{(L−l)/2},
    but stops on the residual of (I − J) μ = D g as written, r = D g − μ + D (∂u/∂s)ᵀ μ, recomputed
    here with ``hessian_vector`` (not the symmetric product the solve uses). Ten layers at ω = 0.1 and
    rtol = 1e-4 (float32's 1000·eps): a stop in ν ends after a few iterations, where the Krylov space
    (one layer per iteration from the readout) has not reached the bottom layers or their μ has not
    converged (on this net the old stop left a true residual of 0.16·‖D g‖).

    Bounds, float64: the recursive residual CG stops on drifts from the true one by at most
    k·γ_d·(‖D g‖ + (1 + ‖K‖₂)‖μ‖) after k iterations (K = D (∂u/∂s)ᵀ, assembled densely); the error of μ
    is then at most ‖(I − K)⁻¹‖₂·‖r‖, plus the reference solve's own (rtol 1e-13, same bound)."""
    import pyeqprop as pe
    from pyeqprop.learning.costs import mean_cost_gradients

    net = pe.CRNN("-".join(["c2"] * 10), (1, 4, 4), num_classes=3, readout="softmax", dtype="float64", seed=0,
                  weight_scale=2.0, feedback=0.1)
    x = np.random.default_rng(3).uniform(0, 1, (2, 1, 4, 4))
    y = np.array([0, 2])
    ref = equilibrium_gradient(net, x, y, T1=3000, settling=Settling("gauss-seidel", tol=1e-13), rtol=1e-13)
    assert ref.free.converged and ref.solved
    s = ref.free.state
    rtol = 1e-4
    got = equilibrium_gradient(net, x, y, T1=0, free_state=s, rtol=rtol)
    assert got.solved and got.rel_residual <= rtol

    nudge = net.nudge(x, y)
    d = net.drive(x, s, nudge)
    D = [net.act.grad(u) for u in d.u]
    g, _ = mean_cost_gradients(net, s, nudge, x.shape[0])
    Dg = [a * b for a, b in zip(D, g)]
    shapes = [a.shape for a in s]
    sizes = [int(np.prod(sh)) for sh in shapes]

    def K(mu):  # D (∂u/∂s)ᵀ μ, Eq. 5.3 with (3.18)
        hv = net.hessian_vector(mu, d.indices)
        return [dl * (np.zeros_like(dl) if h is None else h) for dl, h in zip(D, hv)]

    def split(v):
        return [np.reshape(p, sh) for p, sh in zip(np.split(v, np.cumsum(sizes)[:-1]), shapes)]

    def flat(a):
        return np.concatenate([np.ravel(v) for v in a])

    n = sum(sizes)
    Kd = np.stack([flat(K(split(np.eye(n)[i]))) for i in range(n)], axis=1)  # (n, n) dense K
    norm_K = float(np.linalg.norm(Kd, 2))
    inv_norm = float(np.linalg.norm(np.linalg.inv(np.eye(n) - Kd), 2))
    gam = gamma(F64, 8 * max(int(np.prod(sh[1:])) for sh in shapes) + 256)

    def true_residual(mu):
        return float(np.linalg.norm(flat(Dg) - flat(mu) + flat(K(mu))))

    bdg = float(np.linalg.norm(flat(Dg)))
    for r, tol in ((got, rtol), (ref, 1e-13)):
        drift = r.iterations * gam * (bdg + (1 + norm_K) * float(np.linalg.norm(flat(r.mu))))
        assert true_residual(r.mu) <= tol * bdg + drift, (r.iterations, true_residual(r.mu) / bdg)
    err = float(np.linalg.norm(flat(got.mu) - flat(ref.mu)))
    bound = inv_norm * (true_residual(got.mu) + true_residual(ref.mu))
    assert err <= bound, (err, bound)
    # the bound is small enough to say something about every layer, conv1 included
    assert bound < 0.1 * float(np.linalg.norm(ref.mu[0])), (bound, float(np.linalg.norm(ref.mu[0])))


def test_the_implicit_estimator_reports_its_solve():
    import pyeqprop as pe

    net = pe.CRNN("c3m-c4", (1, 6, 6), num_classes=3, readout="softmax", dtype="float64", seed=1, weight_scale=0.5)
    x = np.random.default_rng(2).uniform(0, 1, (2, 1, 6, 6))
    y = np.array([0, 2])
    r = estimate("implicit", net, x, y, beta=None, T1=500, T2=None, settling=Settling(tol=1e-13))
    assert r.free.converged and r.info["solved"] and r.info["cg_iterations"] > 0
    assert r.info["cg_rel_residual"] <= 1000 * EPS and r.nudged == [] and set(r.grads) == set(net.params)


def test_conjugate_gradient_solves_a_known_system_and_stops_on_negative_curvature():
    """The solver of Eq. 5.7 on explicit matrices: an SPD system to its tolerance, and an indefinite one
    (a fixed point with an eigenvalue of J above 1) stopped instead of returning garbage silently."""
    rng = np.random.default_rng(0)
    M = rng.standard_normal((6, 6))
    A = M @ M.T + 6 * np.eye(6)
    b = rng.standard_normal(6)
    nu, it, rel = conjugate_gradient(lambda v: [A @ v[0]], [b], rtol=1e-12, max_iter=100, xp=np)
    assert rel <= 1e-12 and it <= 12
    np.testing.assert_allclose(nu[0], np.linalg.solve(A, b), rtol=0, atol=1e-10 * np.linalg.norm(nu[0]))
    B = np.diag([1.0, -1.0, 2.0])
    _, _, rel = conjugate_gradient(lambda v: [B @ v[0]], [np.array([1.0, 1.0, 0.0])], rtol=1e-12, max_iter=50,
                                   xp=np)
    assert rel > 1e-12


def test_conjugate_gradient_measures_its_stop_in_the_weighted_norm():
    """``weights`` w: the solve stops at ‖w ⊙ (b − Aν)‖ ≤ rtol·‖w ⊙ b‖ and reports that ratio, recomputed here
    from ν; on a system whose second block is scaled down by 1e-6 (as ν's bottom layers are, Eq. 5.7)
    the unweighted stop leaves that block far less solved than the weighted one."""
    rng = np.random.default_rng(1)
    n = 8
    M = rng.standard_normal((n, n))
    A = M @ M.T / n + np.eye(n)
    scale = np.concatenate([np.ones(n // 2), np.full(n // 2, 1e-6)])
    As = scale[:, None] * A * scale[None, :]  # the same system in variables scaled by `scale`, still SPD
    b = scale * rng.standard_normal(n)
    w = 1.0 / scale
    rtol = 1e-6

    def blocks(v):
        return [v[: n // 2], v[n // 2:]]

    def apply(v):
        return blocks(As @ np.concatenate(v))

    def rel_in(weight, nu):
        r = b - As @ np.concatenate(nu)
        return float(np.linalg.norm(weight * r) / np.linalg.norm(weight * b))

    nu_w, it_w, rel_w = conjugate_gradient(apply, blocks(b), rtol=rtol, max_iter=200, xp=np, weights=blocks(w))
    # the recursive residual it stops on and the true one differ by O(k·eps·κ(A)) relative (w ⊙ r is the
    # residual of the unscaled system A, κ(A) = cond(A))
    assert rel_w <= rtol and abs(rel_w - rel_in(w, nu_w)) <= it_w * n * EPS * float(np.linalg.cond(A))
    nu_u, it_u, rel_u = conjugate_gradient(apply, blocks(b), rtol=rtol, max_iter=200, xp=np)
    assert rel_u <= rtol and it_u < it_w and rel_in(w, nu_u) > 10 * rtol, (it_u, it_w, rel_in(w, nu_u))
    with pytest.raises(ValueError, match="1 weights for 2 blocks"):
        conjugate_gradient(apply, blocks(b), rtol=rtol, max_iter=5, xp=np, weights=[1.0])


def test_residual_is_the_largest_change_of_any_neuron():
    """Eq. 3.11, one transfer for all layers."""
    a = [np.zeros((2, 3)), np.zeros((2, 1, 2, 2))]
    b = [np.full((2, 3), 0.25), np.zeros((2, 1, 2, 2))]
    b[1][1, 0, 1, 0] = -0.5
    assert residual(b, a) == 0.5


def test_per_sweep_gdu_fails_for_gauss_seidel_as_derived():
    """Eq. 4.5's per-step identity is a property of the synchronous schedule. For Gauss–Seidel, at a
    fixed point and as β → 0, the first nudged sweep moves by −ΔEP_s(0) = P_1Dg + P_2Dg + P_2DH P_1Dg
    while BPTT's μ of the last sweep is P_1Dg + P_2Dg + P_1DH P_2Dg (SPEC.md Eq. 4.5): both formulas are
    checked here on a contracting net, and their mixed terms differ."""
    import pyeqprop as pe

    net = pe.CRNN("c4-c5-f6", (1, 6, 6), num_classes=4, readout="softmax", dtype="float64", seed=3,
                  weight_scale=0.7)
    rng = np.random.default_rng(1)
    x, y, n = rng.uniform(0, 1, (2, 1, 6, 6)), rng.integers(0, 4, 2), 2
    free = settle(net, x, 3000, settling=Settling("gauss-seidel", tol=1e-15)).state
    nudge = net.nudge(x, y)
    d = net.drive(x, free, nudge)
    D = [net.act.grad(u) for u in d.u]
    g = [np.zeros_like(s) for s in free]
    for (w, term), c in zip(net.cost_terms, nudge.ctx):
        for l, v in term.state_grads(net.params, free, c).items():
            g[l] = g[l] + (w / n) * v
    first, second = gauss_seidel_blocks(len(net.layers))

    def P(block, v):
        return [a if l in block else np.zeros_like(a) for l, a in enumerate(v)]

    def DH(v):
        return [dl * h for dl, h in zip(D, net.hessian_vector(v, d.indices))]

    Dg = [dl * a for dl, a in zip(D, g)]
    ep_formula = [a + b + c for a, b, c in zip(P(first, Dg), P(second, Dg), P(second, DH(P(first, Dg))))]
    bptt_formula = [a + b + c for a, b, c in zip(P(first, Dg), P(second, Dg), P(first, DH(P(second, Dg))))]
    beta = 1e-7
    s1, _ = sweep(net, x, free, nudge.at(beta), "gauss-seidel")
    ep = [-(a - b) / (beta * n) for a, b in zip(s1, free)]  # per unit of the batch-mean cost, as g
    mu = bptt(net, x, y, T=3000, per_step=True, schedule="gauss-seidel").state_steps[0]
    scale = max(float(np.max(np.abs(a))) for a in ep_formula)
    assert _maxdiff(ep, ep_formula) <= 1e-5 * scale  # O(β) + round-off/β: 1e-7 + 1e-16/1e-7
    assert _maxdiff(mu, bptt_formula) <= 1e3 * EPS * scale
    assert _maxdiff(ep_formula, bptt_formula) >= 0.1 * scale
