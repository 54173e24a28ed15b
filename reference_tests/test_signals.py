"""Reference properties of the intermediate error signals (SPEC.md §6) and of EP with them (§4).

* Eqs. 6.2-6.6: each cost term's value equals an independent float64 formula, and its
  gradients in the states and in its own parameters (the readout's, for output distillation
  with the softmax readout) equal central finite differences of Σ_batch ``term.value``.
  Every term is smooth (affine maps, average pooling, log-softmax, squares), so no kink
  limits the step. Terms: local CE and local MSE heads (6.2-6.3, grid 1-3), distillation with
  "mean" and "sum" normalisation (6.4-6.5, conv or fc layer), output distillation (6.6) for
  both readouts; the teacher is a real :class:`~pyeqprop.model.teacher.Teacher`.
* Eqs. 6.1 + 4.4: with local errors, distillation, or both, on a random non-empty set of
  conv layers, symmetric (4.2) and one-sided (4.1) EP tend to the BPTT gradient (5.4) of the
  total cost C, for every parameter (network, readout, heads, maps), at the rates O(β²) and O(β).
* Eq. 6.1: terms with weight 0 leave EP (4.1-4.3) bit-for-bit unchanged (and get zero
  gradients); heads and maps never change inference.
* Backend parity under array_api_strict for one signals configuration.

Architectures come from :func:`pyeqprop.testing.model_strategies.crnn_configs` (valid by
construction); all arrays are float64 drawn on the host from the config's seed.

Rounding-error bound of one value evaluation (used by the oracle and FD tests)
---------------------------------------------------------------------------
Model of ``pyeqprop.testing.rounding``: each operation rounds with relative error ≤ u, and a
sum of m products, computed in any order, errs by ≤ γ_d·Σ|terms| with d the rounding depth.
Perturbing θ + t·d or s + t·d on the host rounds each entry once more (one more level).

* average pool of k_h·k_w entries: γ_{k_h k_w + 2}·avgpool(|s|);
* affine map A v + a with m inputs: γ_{m+3}(|A||v| + |a|) + |A|·ε_v;
* log-softmax entries (Teacher test derivation, Eq. 7.2): with E ≥ the logits' error and
  Z ≥ max|z| per sample, each entry errs by ≤ 2E + γ_{K+8}(6Z + 3 log K + 3); the local CE
  picks one entry (products with exact one-hot zeros are exact); the output distillation
  weights the entries by p (Σp = 1) and adds γ_{K+3}·τ²Σ p|log q|, its logits z/τ carrying
  E/τ + u·Z/τ;
* ½·scale·Σ r² with |ε_r| ≤ e_r per entry: scale·Σ(|r|e_r + ½e_r²) + γ_{N+3}·value;
* the sum over the batch: γ_{n+1}·Σ|value|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from hypothesis import event, given, reject, settings
from hypothesis import strategies as st

from pyeqprop import backend
from pyeqprop.diagnostics.gdu import contracting_weight_scale
from pyeqprop.learning import bptt, ep_estimate, predict
from pyeqprop.model.arch import ConvLayer
from pyeqprop.learning.signals import (DistillationMap, LocalErrorHead, OutputDistillation, SignalConfig,
                                    TeacherFeatures, attach_signals)
from pyeqprop.model.teacher import Teacher
from pyeqprop.testing import oracles
from pyeqprop.testing.checks import assert_within_bound
from pyeqprop.testing.model_strategies import CRNNConfig, crnn_configs
from pyeqprop.testing.rounding import gamma, unit_roundoff

F64 = np.float64
U = unit_roundoff(F64)


def _g(d: int) -> float:
    return gamma(F64, d)


def _host(a) -> np.ndarray:
    return np.asarray(backend.to_numpy(a), dtype=F64)


def _teacher(cfg: CRNNConfig, xp="numpy") -> Teacher:
    """A real backprop teacher with the student's spec (random init, another seed than the student)."""
    return Teacher(cfg.arch, cfg.input_shape, num_classes=cfg.num_classes, activation=cfg.activation,
                   dtype="float64", xp=xp, seed=(cfg.seed + 1) % 2**32)


def _largest_divisor(h: int, g: int) -> int:
    """Written out again here (Eq. 6.2) so the test does not trust the library's helper."""
    return max(d for d in range(1, min(h, g) + 1) if h % d == 0)


# ---------------------------------------------------------------------- independent values and bounds
def _affine(v, W, b, ev):
    """A v + a through the oracle, and its error bound (module docstring)."""
    z = oracles.linear(v, W, b)
    e = _g(W.shape[1] + 3) * (np.abs(v) @ np.abs(W).T + np.abs(b)) + ev @ np.abs(W).T
    return z, e


def _log_softmax(z, E):
    """Row-wise log-softmax of the logits z (n, K) with per-sample logit error E (n,), and the
    per-entry error bound of the library's evaluation (module docstring)."""
    zs = z - z.max(axis=1, keepdims=True)
    ls = zs - np.log(np.exp(zs).sum(axis=1, keepdims=True))
    K = z.shape[1]
    Z = np.abs(z).max(axis=1)
    return ls, 2 * E + _g(K + 8) * (6 * Z + 3 * math.log(K) + 3)


def _quadratic(r, er, scale):
    """scale·½Σ r² per sample and its error bound (module docstring)."""
    n = r.shape[0]
    r, er = r.reshape(n, -1), er.reshape(n, -1)
    val = 0.5 * scale * (r * r).sum(axis=1)
    return val, scale * (np.abs(r) * er + 0.5 * er * er).sum(axis=1) + _g(r.shape[1] + 3) * val


def _readout_logits(term, P, S):
    """Student logits z_s of the readout (s_L for mse, W_out vec(s_L) + b_out for softmax) and their error."""
    s = S[term.layer]
    if term.kind == "mse":
        return s, _g(1) * np.abs(s)
    v = s.reshape(s.shape[0], -1)
    return _affine(v, P[f"{term.name}.weight"], P[f"{term.name}.bias"], _g(1) * np.abs(v))


def oracle_value(term, P: dict, S: list, ctx, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """C_k per sample (n,) written from SPEC.md Eqs. 6.2-6.6, and the bound on its rounding error.

    ``grid``: the local heads' g (the head itself stores only the pool it derived from g)."""
    if isinstance(term, LocalErrorHead):  # Eqs. 6.2-6.3
        s = S[term.layer]
        n = s.shape[0]
        if s.ndim == 4:
            _, _, h, w = s.shape
            gh, gw = _largest_divisor(h, grid), _largest_divisor(w, grid)
            k = (h // gh, w // gw)
            v = oracles.avg_pool2d(s, kernel_size=k, stride=k).reshape(n, -1)
            ev = _g(k[0] * k[1] + 2) * oracles.avg_pool2d(np.abs(s), kernel_size=k, stride=k).reshape(n, -1)
        else:
            v, ev = s, _g(1) * np.abs(s)
        hl, eh = _affine(v, P[f"{term.name}.weight"], P[f"{term.name}.bias"], ev)
        if term.loss == "ce":
            ls, el = _log_softmax(hl, eh.max(axis=1))
            return -(ls * ctx).sum(axis=1), el
        r = hl - ctx
        return _quadratic(r, eh + _g(1) * np.abs(r), 1.0)
    if isinstance(term, DistillationMap):  # Eqs. 6.4-6.5
        s, W, b = S[term.layer], P[f"{term.name}.weight"], P[f"{term.name}.bias"]
        if s.ndim == 4:
            m = oracles.conv2d(s, W, b)
            em = _g(W.shape[1] + 3) * (oracles.conv2d(np.abs(s), np.abs(W)) + np.abs(b)[None, :, None, None])
        else:
            m, em = _affine(s, W, b, _g(1) * np.abs(s))
        r = m - ctx
        elements = int(np.prod(ctx.shape[1:]))  # |t_l| = c_t·h_l·w_l
        scale = 1.0 / elements if term.normalisation == "mean" else 1.0
        return _quadratic(r, em + _g(1) * np.abs(r), scale)
    if isinstance(term, OutputDistillation):  # Eq. 6.6
        tau = term.tau
        z, ez = _readout_logits(term.readout, P, S)
        zt = z / tau
        ls, el = _log_softmax(zt, ez.max(axis=1) / tau + U * np.abs(zt).max(axis=1))
        val = -(tau ** 2) * (ctx * ls).sum(axis=1)
        K = z.shape[1]
        return val, tau ** 2 * el + _g(K + 3) * tau ** 2 * (ctx * np.abs(ls)).sum(axis=1)
    raise TypeError(term)


# ---------------------------------------------------------------------- Eqs. 6.2-6.6: values and gradients
@dataclass(frozen=True)
class TermCase:
    """A CRNN config, the hidden spec layer (0-based) the heads and maps sit on, the head grid g
    and the distillation temperature τ."""

    cfg: CRNNConfig
    layer: int
    grid: int
    temperature: float


@st.composite
def term_cases(draw) -> TermCase:
    cfg = draw(crnn_configs())
    hidden = len(cfg.convs) + (1 if cfg.fc else 0)  # the spec's layers (the mse output layer excluded)
    return TermCase(cfg, draw(st.integers(0, hidden - 1)), draw(st.integers(1, 3)),
                    draw(st.sampled_from((1.0, 4.0))))


def _build_terms(case: TermCase):
    """Net, every term kind on ``case.layer`` (weight 1), host params, random states in [0, 1],
    the prepared contexts, and the generator for directions."""
    cfg = case.cfg
    net = cfg.net()
    teacher = _teacher(cfg)
    provider = TeacherFeatures(teacher)
    l = case.layer
    shp, tshp = net.arch.state_shapes[l], teacher.arch.state_shapes[l]
    K = cfg.num_classes
    terms = [LocalErrorHead(l, shp, K, grid=case.grid, loss="ce", name="hce", init="uniform"),
             LocalErrorHead(l, shp, K, grid=case.grid, loss="mse", name="hmse", init="uniform"),
             DistillationMap(l, shp, tshp, provider, normalisation="mean", name="kdmean", init="uniform"),
             DistillationMap(l, shp, tshp, provider, normalisation="sum", name="kdsum", init="uniform"),
             OutputDistillation(net.readout_term, provider, temperature=case.temperature)]
    for t in terms:
        net.add_cost_term(t, 1.0)
    rng = cfg.rng()
    x, y = cfg.data(rng)
    xb, yb = backend.asarray(x, xp="numpy"), backend.asarray(y, xp="numpy")
    states = [rng.random(shape) for shape in net.state_shapes(cfg.n)]
    ctxs = [t.prepare(net.params, xb, yb) for t in terms]
    params = {k: _host(v) for k, v in net.params.items()}
    return net, terms, params, states, [None if c is None else _host(c) for c in ctxs], rng


@given(case=term_cases())
def test_term_values_match_formulas(case):
    """Eqs. 6.2-6.6: C_k(s) per sample equals the formula of SPEC.md evaluated by the float64
    oracles, within the sum of the two evaluations' rounding bounds; parameter shapes follow 6.2/6.4."""
    net, terms, P, S, ctxs, _ = _build_terms(case)
    for term, ctx in zip(terms, ctxs):
        got = _host(term.value(P, S, ctx))
        want, e = oracle_value(term, P, S, ctx, case.grid)
        assert_within_bound(got, want, 2 * e, err_msg=f"{type(term).__name__} {getattr(term, 'name', '')} {case}")
    s = S[case.layer]
    head = terms[0]
    if s.ndim == 4:
        c, h, w = s.shape[1:]
        feat = c * _largest_divisor(h, case.grid) * _largest_divisor(w, case.grid)
    else:
        feat = s.shape[1]
    assert P["hce.weight"].shape == (case.cfg.num_classes, feat), head.pool
    ct = ctxs[2].shape[1]
    assert P["kdmean.weight"].shape == ((ct, s.shape[1], 1, 1) if s.ndim == 4 else (ct, s.shape[1]))


STEPS = tuple(2.0**-k for k in range(4, 19, 2))  # FD steps tried; directions have entries of the size of the values


def _check_fd(f_and_bound, gd, what):
    """Assert ⟨grad, d⟩ = f'(0) where f(t) = Σ_batch C_k at (s or θ) + t·d.

    For a step h: D(h) = (f(h) − f(−h))/(2h) = f'(0) + h²f‴/6 + O(h⁴), and D(2h) − D(h) =
    h²f‴/2 + O(h⁴) measures the truncation; e (the rounding bound of one evaluation of f, the
    largest over the four points) contributes ≤ 2.5e/h. Tolerance: 2|D(2h) − D(h)|/3 + 3e/h
    (as in the teacher's test). It is a valid bound for every h, so the test uses the h in
    ``STEPS`` that gives the smallest one. The library's ⟨grad, d⟩ carries rounding of
    relative size ~u·(depth), below e/h by the factor 1/h ≥ 16, so it is not added.
    """
    best = None
    for h in STEPS:
        vals = {s: f_and_bound(s * h) for s in (-2, -1, 1, 2)}
        e = max(b for _, b in vals.values())
        D1 = (vals[1][0] - vals[-1][0]) / (2 * h)
        D2 = (vals[2][0] - vals[-2][0]) / (4 * h)
        tol = 2 * abs(D2 - D1) / 3 + 3 * e / h
        if best is None or tol < best[0]:
            best = (tol, D1, h)
    tol, D1, h = best
    assert abs(gd - D1) <= tol, (f"{what}: <grad, d> = {gd!r}, central difference {D1!r} (h = {h:.1e}), "
                                 f"|diff| {abs(gd - D1):.3e} > tol {tol:.3e}")
    # the check must be able to fail: the tolerance is far below a gradient error of relative size 1e-4
    # (output distillation is the worst conditioned: C ≈ τ² log K while its gradient τ(q − p) can be small)
    assert tol <= 1e-4 * abs(D1) + 1e-8, f"{what}: tolerance {tol:.2e} too loose to test anything (D = {D1:.3e})"


@given(case=term_cases())
def test_term_gradients_equal_finite_differences(case):
    """Eqs. 6.2-6.6: state_grads and param_grads of every term equal central finite differences of
    f(t) = Σ_batch term.value along random directions: in all states at once (layers a term does
    not read must get no gradient, so ⟨grad, d⟩ sums only the layers returned) and in each
    parameter tensor the term differentiates (heads, maps, and the softmax readout for 6.6)."""
    net, terms, P, S, ctxs, rng = _build_terms(case)
    for term, ctx in zip(terms, ctxs):
        what = f"{type(term).__name__} {getattr(term, 'name', '')} of {case}"

        def total(params, states):
            _, e = oracle_value(term, params, states, ctx, case.grid)  # bound only; the value is the library's
            got = _host(term.value(params, states, ctx))
            return float(got.sum()), float(e.sum() + _g(got.shape[0] + 1) * np.abs(got).sum())

        # states
        d = [rng.standard_normal(s.shape) for s in S]
        sg = term.state_grads(P, S, ctx)
        assert set(sg) <= {term.layer}, f"{what}: gradient on layers {sorted(sg)}"
        gd = sum(float(np.sum(_host(g) * d[l])) for l, g in sg.items())
        _check_fd(lambda t: total(P, [s + t * dl for s, dl in zip(S, d)]), gd, f"{what}, states")
        # parameters
        pg = term.param_grads(P, S, ctx)
        expected = {s.name for s in term.param_specs()}
        if isinstance(term, OutputDistillation) and term.readout.kind == "softmax":
            expected = {f"{term.readout.name}.weight", f"{term.readout.name}.bias"}
        assert set(pg) == expected, f"{what}: param grads for {sorted(pg)}"
        for name, g in pg.items():
            scale = max(float(np.max(np.abs(P[name]))), 1e-3)
            dn = rng.standard_normal(P[name].shape) * scale

            def at(t, name=name, dn=dn):
                return total({**P, name: P[name] + t * dn}, S)

            _check_fd(at, float(np.sum(_host(g) * dn)), f"{what}, {name}")


def test_distillation_pools_larger_teacher_maps():
    """Eq. 6.4: teacher features larger than the student's map are average-pooled to its size."""
    rng = np.random.default_rng(5)
    t = rng.random((2, 3, 8, 6))

    class Provider:
        def get(self, x):
            return [t], None

    m = DistillationMap(0, (2, 4, 3), (3, 8, 6), Provider(), init="uniform")
    got = _host(m.prepare({}, None, None))
    want = oracles.avg_pool2d(t, kernel_size=(2, 2), stride=(2, 2))
    assert_within_bound(got, want, 2 * _g(6) * oracles.avg_pool2d(np.abs(t)))
    assert m.elements == 3 * 4 * 3


# ---------------------------------------------------------------------- Eqs. 6.1 + 4.4: EP -> BPTT
BETAS = (1e-2, 1e-3, 1e-4)
T_SETTLE = 60  # free steps = nudged steps = BPTT horizon
RESIDUAL_MAX = 1e-13  # every phase must have converged to this residual (Eq. 3.11)
CONTRACTION = 0.4  # target of the contraction bound of the free dynamics (weight_scale)
SLOPE_ONE_SIDED, SLOPE_SYMMETRIC = 0.9, 1.8
FLOOR_FACTOR = 10.0  # a β pair enters the rate only when both errors exceed FLOOR_FACTOR × the floor
CANCELLATION = 10.0  # allowance for sums whose terms cancel to a tenth of their absolute sum


@dataclass(frozen=True)
class SignalCase:
    """A CRNN config and the signals to attach (Eq. 6.1)."""

    cfg: CRNNConfig
    local_layers: tuple
    kd_layers: tuple
    local_loss: str
    grid: int
    kd_normalisation: str
    output_kd_weight: float
    temperature: float

    def config(self) -> SignalConfig:
        return SignalConfig(local_layers=list(self.local_layers) or "none", local_weight=0.5,
                            local_grid=self.grid, local_loss=self.local_loss,
                            kd_layers=list(self.kd_layers) or "none", kd_weight=1.0,
                            kd_normalisation=self.kd_normalisation, output_kd_weight=self.output_kd_weight,
                            temperature=self.temperature, init="uniform")


@st.composite
def signal_cases(draw) -> SignalCase:
    """Local errors, distillation, or both ("which"), each on a non-empty set of conv layers."""
    cfg = draw(crnn_configs())
    convs = list(range(1, len(cfg.convs) + 1))
    which = draw(st.sampled_from(("local", "kd", "both")))
    layers = st.lists(st.sampled_from(convs), min_size=1, unique=True).map(lambda v: tuple(sorted(v)))
    local = draw(layers) if which in ("local", "both") else ()
    kd = draw(layers) if which in ("kd", "both") else ()
    return SignalCase(cfg, local, kd, draw(st.sampled_from(("ce", "mse"))), draw(st.integers(1, 3)),
                      draw(st.sampled_from(("mean", "sum"))),
                      draw(st.sampled_from((0.0, 0.5))) if kd else 0.0, draw(st.sampled_from((1.0, 4.0))))


def _pattern(net, x, state, nudge=None):
    """The linear piece of ρ of every pre-activation (below / inside / above the kinks) and the argmaxes."""
    lo, hi = net.act.kinks
    d = net.drive(x, state, nudge)
    return [(np.where(_host(u) <= lo, 0, np.where(_host(u) >= hi, 2, 1)), None if i is None else backend.to_numpy(i))
            for u, i in zip(d.u, d.indices)]


def _same(pa, pb) -> bool:
    return all(np.array_equal(r1, r2) and (i1 is None or np.array_equal(i1, i2)) for (r1, i1), (r2, i2) in zip(pa, pb))


def _vec(grads, names):
    return np.concatenate([_host(grads[k]).ravel() for k in names])


def _max_reduction(net, n: int) -> int:
    """Largest number of products summed into one entry of Σ_batch ∂Φ/∂θ (Eq. 3.9)."""
    d = 0
    for layer in net.arch.layers:
        if isinstance(layer, ConvLayer):
            h, w = layer.conv_hw
            d = max(d, n * h * w)
        else:
            d = max(d, n)
    return d + 4


def _assert_rate(betas, errs, floors, slope, what) -> int:
    """For every consecutive pair β_a > β_b:
    err(β_b) ≤ max(err(β_a)·(β_b/β_a)^slope, FLOOR_FACTOR·floor(β_b)), i.e. the error falls at
    least at the rate (log-log slope ≥ ``slope``) until it reaches the float64 floor, where it
    must stay. Returns the number of pairs on which the rate was tested."""
    tested = 0
    for i in range(len(betas) - 1):
        (ba, ea), (bb, eb, fb) = (betas[i], errs[i]), (betas[i + 1], errs[i + 1], floors[i + 1])
        if eb <= FLOOR_FACTOR * fb:
            continue
        tested += 1
        got = math.log(ea / eb) / math.log(ba / bb) if ea > 0 else -math.inf
        assert got >= slope, (f"{what}: slope {got:.3f} < {slope} between beta {ba:g} and {bb:g} with the error "
                              f"above {FLOOR_FACTOR:g} x the floor; errors {[f'{e:.2e}' for e in errs]}, "
                              f"floors {[f'{f:.1e}' for f in floors]}")
    return tested


@settings(max_examples=max(10, settings.default.max_examples // 4))
@given(case=signal_cases())
def test_ep_tends_to_bptt_with_signals(case):
    """Eqs. 6.1 + 4.4: with local errors and/or distillation (and output distillation) attached,
    the EP estimate of every parameter — network, readout, heads, maps — tends to the BPTT
    gradient of the batch-mean total cost C after T steps, one-sided at rate ≥ 0.9 and symmetric
    at rate ≥ 1.8 in log-log slope, down to a float64 floor (``_assert_rate``).

    Premises (4.4), asserted: weight_scale makes the free dynamics' contraction bound 0.4
    (``contracting_weight_scale``), so T = 60 steps converge every phase (residual ≤ 1e-13) and
    BPTT over T steps is the gradient at the fixed point. β ∈ {1e-2, 1e-3, 1e-4}: β = 0.1
    crosses an activation kink in some drawn examples (slopes of 3 or more appear where the
    nudged fixed point changes piece), where the rates do not apply. Each β also has its
    premise checked: no pre-activation leaves its linear piece of ρ and no max-pool argmax
    changes between s^0 and s^{±β}; β that fail are left out, and the example is rejected
    (rarely) when fewer than two remain.

    Error: ‖g_EP − g_BPTT‖/‖g_BPTT‖ separately for the network's Φ parameters and for the
    cost-only ones (readout, heads, maps). Floor: EP subtracts two Σ_batch ∂Φ/∂θ, each a
    sum of ≤ d products with rounding γ_d·A (A = that sum on absolute values, at s^0, with |x|),
    and the states carry an error of the same size, so the estimate errs by ≤ 2γ_d·‖A‖/(βn);
    relative to ‖g_BPTT‖ of the group this is the floor. The cost-only parameters' estimate
    has no 1/β, but it can have no β-dependence at all (a head on a layer that the nudge does
    not move): EP is then exact and the error is the rounding of their own sums, ≤ 2γ_d times
    their absolute sum, taken as CANCELLATION × the result; this term is added to every floor.
    """
    cfg = case.cfg
    weight_scale = contracting_weight_scale(cfg.net(), target=CONTRACTION)
    net = cfg.net(weight_scale=weight_scale)
    attach_signals(net, case.config(), _teacher(cfg))
    x, y = cfg.data()
    xb, yb = backend.asarray(x, xp="numpy"), backend.asarray(y, xp="numpy")
    ref = bptt(net, xb, yb, T=T_SETTLE)
    assert ref.residual <= RESIDUAL_MAX, f"BPTT forward residual {ref.residual:.2e} ({case})"
    network = net.network_param_names()
    groups = {"network": network, "cost-only": [k for k in net.params if k not in network]}
    nudge = net.nudge(xb, yb)
    free_run = ep_estimate(net, xb, yb, beta=BETAS[0], T1=T_SETTLE, T2=T_SETTLE)
    free = free_run.free
    assert free.residual <= RESIDUAL_MAX, f"free residual {free.residual:.2e} ({case})"
    base = _pattern(net, xb, free.state)
    A = net.dphi_dtheta(backend.asarray(np.abs(x), xp="numpy"), free.state)
    floor_num = 2 * _g(_max_reduction(net, cfg.n)) * float(np.linalg.norm(_vec(A, network))) / cfg.n

    kept, est = [], {"one-sided": [], "symmetric": []}
    for beta in BETAS:
        sym = free_run if beta == BETAS[0] else ep_estimate(net, xb, yb, beta=beta, T1=T_SETTLE, T2=T_SETTLE,
                                                            free_state=free.state)
        one = ep_estimate(net, xb, yb, beta=beta, T1=T_SETTLE, T2=T_SETTLE, estimator="one-sided",
                          free_state=free.state)
        for ph in sym.nudged + one.nudged:
            assert ph.residual <= RESIDUAL_MAX, f"nudged residual {ph.residual:.2e} at beta {beta:g} ({case})"
        plus, minus = sym.nudged
        if not (_same(_pattern(net, xb, plus.state, nudge.at(beta)), base)
                and _same(_pattern(net, xb, minus.state, nudge.at(-beta)), base)):
            continue  # this β crosses a kink or flips an argmax: outside the premise of Eq. 4.4
        kept.append(beta)
        est["one-sided"].append(one.grads)
        est["symmetric"].append(sym.grads)
    if len(kept) < 2:
        reject()
    for group, names in groups.items():
        if not names:
            continue
        g_ref = _vec(ref.grads, names)
        norm = float(np.linalg.norm(g_ref))
        if norm == 0.0:  # e.g. every head reads a dead layer: EP must give exactly zero too
            for grads in est["symmetric"] + est["one-sided"]:
                assert not np.any(_vec(grads, names)), f"{group}: BPTT gives 0, EP does not ({case})"
            continue
        floors = [floor_num / (b * norm) + 2 * _g(_max_reduction(net, cfg.n)) * CANCELLATION for b in kept]
        for name, slope in (("one-sided", SLOPE_ONE_SIDED), ("symmetric", SLOPE_SYMMETRIC)):
            errs = [float(np.linalg.norm(_vec(g, names) - g_ref)) / norm for g in est[name]]
            pairs = _assert_rate(kept, errs, floors, slope, f"{name} EP, {group} parameters, {case}")
            event(f"{name} {group}: {'rate on ' + str(pairs) + ' pair(s)' if pairs else 'at the floor'}")


# ---------------------------------------------------------------------- Eq. 6.1: zero weights, inference
def _all_signals(net, teacher, weight):
    """Local heads and distillation maps on every conv layer and output distillation, weight ``weight``."""
    attach_signals(net, SignalConfig(local_layers="all", local_weight=weight, kd_layers="all", kd_weight=weight,
                                     init="uniform"),
                   teacher)
    net.add_cost_term(OutputDistillation(net.readout_term, TeacherFeatures(teacher), temperature=2.0), weight)


@given(cfg=crnn_configs(), estimator=st.sampled_from(("symmetric", "one-sided", "random-sign")))
def test_zero_weights_leave_ep_unchanged(cfg, estimator):
    """Eq. 6.1 with λ = γ = κ = 0: attaching every term with weight 0 gives, for the network's
    parameters (and the readout), bit-for-bit the plain EP estimate on the same inputs, under
    each estimator (Eqs. 4.1-4.3; random-sign with the same generator state); the head and
    map parameters get exactly zero."""
    plain = cfg.net()
    signals = cfg.net()
    _all_signals(signals, _teacher(cfg), 0.0)
    x, y = cfg.data()
    xb, yb = backend.asarray(x, xp="numpy"), backend.asarray(y, xp="numpy")
    kw = dict(beta=0.5, T1=8, T2=4, estimator=estimator)
    g0 = ep_estimate(plain, xb, yb, rng=np.random.default_rng(cfg.seed), **kw).grads
    g1 = ep_estimate(signals, xb, yb, rng=np.random.default_rng(cfg.seed), **kw).grads
    for k in plain.params:
        assert np.array_equal(backend.to_numpy(g0[k]), backend.to_numpy(g1[k])), f"{k} differs ({cfg})"
    extra = [k for k in signals.params if k not in plain.params]
    assert extra, "no head or map parameters were attached"
    for k in extra:
        assert not np.any(backend.to_numpy(g1[k])), f"{k} is not zero ({cfg})"


@given(cfg=crnn_configs())
def test_signals_do_not_change_inference(cfg):
    """Eq. 6.1, "inference uses the readout only": predict() and the settled logits are identical
    with and without heads, maps and output distillation attached (same network parameters)."""
    plain = cfg.net()
    signals = cfg.net()
    _all_signals(signals, _teacher(cfg), 1.0)
    for k in plain.params:
        assert np.array_equal(backend.to_numpy(plain.params[k]), backend.to_numpy(signals.params[k])), k
    x, _ = cfg.data()
    xb = backend.asarray(x, xp="numpy")
    assert np.array_equal(backend.to_numpy(predict(plain, xb, 6)), backend.to_numpy(predict(signals, xb, 6)))


# ---------------------------------------------------------------------- backend parity
def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _abs_cost_grads(term, P, S, ctx, grid) -> dict:
    """Σ_batch of the absolute values of the products the library sums into ∂C_k/∂θ (Eqs. 6.2-6.6,
    3.4): the scale of its rounding error (``rounding`` model)."""
    n = S[0].shape[0]
    if isinstance(term, LocalErrorHead):
        s = S[term.layer]
        if s.ndim == 4:
            _, _, h, w = s.shape
            k = (h // _largest_divisor(h, grid), w // _largest_divisor(w, grid))
            v = oracles.avg_pool2d(s, kernel_size=k, stride=k).reshape(n, -1)
        else:
            v = s
        hl = oracles.linear(v, P[f"{term.name}.weight"], P[f"{term.name}.bias"])
        d = np.abs(_softmax(hl) - ctx if term.loss == "ce" else hl - ctx)
        return {f"{term.name}.weight": d.T @ np.abs(v), f"{term.name}.bias": d.sum(axis=0)}
    if isinstance(term, DistillationMap):
        s, W, b = S[term.layer], P[f"{term.name}.weight"], P[f"{term.name}.bias"]
        r = np.abs(oracles.conv2d(s, W, b) - ctx) / np.prod(ctx.shape[1:])  # "mean" normalisation
        wg = np.einsum("nohw,nchw->oc", r, np.abs(s))[:, :, None, None]  # (o, c, 1, 1)
        return {f"{term.name}.weight": wg, f"{term.name}.bias": r.sum(axis=(0, 2, 3))}
    ro = term.readout if isinstance(term, OutputDistillation) else term
    if ro.kind == "mse":
        return {}
    v = S[ro.layer].reshape(n, -1)
    z = oracles.linear(v, P[f"{ro.name}.weight"], P[f"{ro.name}.bias"])
    if isinstance(term, OutputDistillation):
        d = term.tau * np.abs(_softmax(z / term.tau) - ctx)
    else:
        d = np.abs(_softmax(z) - ctx)
    return {f"{ro.name}.weight": d.T @ np.abs(v), f"{ro.name}.bias": d.sum(axis=0)}


def test_array_api_strict_parity_with_signals():
    """EP with local errors, distillation and output distillation under array_api_strict gives the
    NumPy numbers to round-off. array_api_strict wraps the same NumPy kernels, so the settled
    states (elementwise updates and convolutions) are identical bit for bit; the parameter
    reductions over (n, h, w) may add in another order (np.sum picks its order from the memory
    layout, which array_api_strict does not preserve), so each estimate entry is allowed
    2γ_d·S, S the absolute sum of what it adds: [A(s^β) + A(s^−β)]/(2βn) for Φ's parameters
    (A = Σ_batch ∂Φ/∂θ on |x| and the states ≥ 0) plus w_k[S_k(s^β) + S_k(s^−β)]/(2n) from
    every cost term (``_abs_cost_grads``)."""
    from pyeqprop.model import CRNN

    rng = np.random.default_rng(11)
    x, y = rng.standard_normal((3, 1, 6, 6)), rng.integers(0, 3, size=3)
    beta, n = 0.3, 3
    out = {}
    for name in ("numpy", "array_api_strict"):
        net = CRNN("c3m-c2", (1, 6, 6), num_classes=3, readout="softmax", dtype="float64", xp=name, seed=3)
        teacher = Teacher("c3m-c2", (1, 6, 6), num_classes=3, dtype="float64", xp=name, seed=4)
        attach_signals(net, SignalConfig(local_layers="all", local_weight=0.5, kd_layers="1,2",
                                         output_kd_weight=0.5, temperature=2.0, init="uniform"), teacher)
        xb = backend.asarray(x, xp=name, dtype="float64")
        yb = backend.asarray(y, xp=name)
        res = ep_estimate(net, xb, yb, beta=beta, T1=10, T2=5)
        out[name] = (net, net.nudge(xb, yb).ctx, res)
    (net, ctx, r0), (_, _, r1) = out["numpy"], out["array_api_strict"]
    for ph0, ph1 in zip([r0.free] + r0.nudged, [r1.free] + r1.nudged):
        for a, b in zip(ph0.state, ph1.state):
            np.testing.assert_array_equal(backend.to_numpy(b), backend.to_numpy(a))
    P = {k: _host(v) for k, v in net.params.items()}
    hx = backend.asarray(np.abs(x), xp="numpy")
    S = {k: 0.0 for k in P}
    for ph in r0.nudged:
        for k, v in net.dphi_dtheta(hx, ph.state).items():
            S[k] = S[k] + _host(v) / (2 * beta * n)
        states = [_host(s) for s in ph.state]
        for (w_k, term), c in zip(net.cost_terms, ctx):
            for k, v in _abs_cost_grads(term, P, states, None if c is None else _host(c), 2).items():
                S[k] = S[k] + w_k * v / (2 * n)
    d = _max_reduction(net, n) + 8  # the reduction, the weighting and the EP combination
    assert list(r0.grads) == list(r1.grads)
    assert any(k.startswith("head") for k in r0.grads) and any(k.startswith("kd") for k in r0.grads)
    for k in r0.grads:
        assert_within_bound(r1.grads[k], r0.grads[k], 2 * _g(d) * S[k], err_msg=k)
