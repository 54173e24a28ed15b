"""Reference properties of the feed-forward teacher (SPEC.md §7).

* Eq. 7.1 / 7.2: forward pass and loss agree with an independent loop-based float64 oracle
  (``pyeqprop.testing.oracles``), within a forward rounding-error bound.
* Eq. 7.3: the hand-derived reverse pass equals central finite differences of the loss
  along random directions, one parameter tensor at a time, in float64, with a step chosen
  so that no pre-activation crosses a kink of ρ and no max-pool argmax changes.
* Eq. 7.4: the features have the CRNN's state shapes; the initialisation is the CRNN's.
* Backend parity: array_api_strict agrees with NumPy within the sum of two rounding bounds.

Architectures are drawn by hypothesis, valid by construction: 1-2 conv layers with kernels
1-3, paddings 0-1 and max / average / no pooling (pooling only where the map is even), then
0-2 fc layers (at least one layer in all), both activations, 1-3 samples, 2-4 classes.

Rounding-error bound of one loss evaluation (used by the oracle and FD tests)
----------------------------------------------------------------------------
Model of ``pyeqprop.testing.rounding``: every operation rounds with relative error ≤ u, a sum
of m products computed in any order has error ≤ γ_{m+1}·Σ|terms| (γ from ``rounding.gamma``).
Write ‖W‖ for the largest absolute row sum of a layer (conv: max_o Σ_{c,a,β}|W[o,c,a,β]|),
A_{l−1} ≥ max|a_{l−1}| (max|x| for the input, 1 for hidden layers since ρ ∈ [0, 1]), and
e_l ≥ max|â_l − a_l| the error of the computed activations. Then
    |ẑ_l − z_l| ≤ γ_{m+2}(‖W_l‖A_{l−1} + max|b_l|) + ‖W_l‖e_{l−1}
(m + 2: the bias add and one rounding of θ + t·d on the host, which is a relative change
≤ u of each weight), average pooling adds γ_3 times the same magnitude, max pooling and
clipping are exact and 1-Lipschitz, ρ is L_ρ-Lipschitz (1, or ½ for the half hard sigmoid):
    e_l ≤ L_ρ·(rounding_l + ‖W_l‖e_{l−1}).
The logits z get E by the same rule and |z| ≤ Z. The per-sample loss ℓ = log Σ exp(z − max z)
− (z_y − max z) is 1-Lipschitz in each of the two terms (∞-norm), so propagated error ≤ 2E;
its own evaluation (subtraction, exp and log with ≤ 1 ulp = 2u each, a K-term sum, the final
subtraction) adds at most γ_{K+8}(6Z + 3 log K + 3); the batch mean adds γ_{n+1}(2Z + log K).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyeqprop import backend
from pyeqprop.model import CRNN
from pyeqprop.model.arch import ConvLayer
from pyeqprop.model.teacher import Teacher, TeacherCache
from pyeqprop.testing import oracles
from pyeqprop.testing.checks import assert_within_bound
from pyeqprop.testing.rounding import gamma

F64 = np.float64
ACT = {"hard_sigmoid": (1.0, (0.0, 1.0)), "half_hard_sigmoid": (0.5, (0.0, 2.0))}  # L_ρ, kinks


# ---------------------------------------------------------------------- strategy
@dataclass(frozen=True)
class TeacherConfig:
    """A valid small teacher: spec string, input (c, h, w), K classes, n samples."""

    spec: str
    input_shape: tuple[int, int, int]
    num_classes: int
    n: int
    activation: str
    seed: int


@st.composite
def teacher_configs(draw) -> TeacherConfig:
    """Small architectures valid by construction (see the module docstring)."""
    c = draw(st.integers(1, 2))
    h = 2 * draw(st.integers(1, 3)) + draw(st.sampled_from([0, 0, 1]))
    w = 2 * draw(st.integers(1, 3)) + draw(st.sampled_from([0, 0, 1]))
    n_conv = draw(st.integers(0, 2))
    n_fc = draw(st.integers(1 if n_conv == 0 else 0, 2))
    tokens, (hi, wi) = [], (h, w)
    for _ in range(n_conv):
        p = draw(st.integers(0, 1))
        k = draw(st.integers(1, min(3, min(hi, wi) + 2 * p)))
        hc, wc = hi + 2 * p - k + 1, wi + 2 * p - k + 1  # Eq. 2.2, stride 1
        pool = draw(st.sampled_from(["m", "a", ""]))
        if pool and (hc < 2 or wc < 2 or hc % 2 or wc % 2):
            pool = ""
        hi, wi = (hc // 2, wc // 2) if pool else (hc, wc)
        tokens.append(f"c{draw(st.integers(1, 3))}k{k}p{p}{pool}")
    tokens += [f"f{draw(st.integers(1, 5))}" for _ in range(n_fc)]
    return TeacherConfig("-".join(tokens), (c, h, w), draw(st.integers(2, 4)), draw(st.integers(1, 3)),
                         draw(st.sampled_from(sorted(ACT))), draw(st.integers(0, 2**32 - 1)))


def make_teacher(cfg: TeacherConfig, xp):
    t = Teacher(cfg.spec, cfg.input_shape, num_classes=cfg.num_classes, activation=cfg.activation,
                dtype="float64", xp=xp, seed=cfg.seed % 2**31)
    rng = np.random.default_rng(cfg.seed)
    x = rng.standard_normal((cfg.n, *cfg.input_shape))
    y = rng.integers(0, cfg.num_classes, size=cfg.n)
    return t, x, y, rng


# ---------------------------------------------------------------------- independent oracle and bound
def oracle_forward(t: Teacher, params: dict, x: np.ndarray):
    """Eq. 7.1 with the loop-based oracles: pre-activations, activations, logits; and Eq. 7.2's ℓ_i."""
    lip, kinks = ACT[t.activation]
    a, pre, acts = x, [], []
    for layer in t.arch.layers:
        W, b = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]
        if isinstance(layer, ConvLayer):
            z = oracles.conv2d(a, W, b, padding=layer.padding)
            p = {"max": lambda v: oracles.max_pool2d(v)[0], "avg": oracles.avg_pool2d,
                 "none": lambda v: v}[layer.pool](z)
        else:
            p = oracles.linear(a.reshape(a.shape[0], -1), W, b)
        a = np.clip(lip * p, 0.0, 1.0)
        pre.append(p)
        acts.append(a)
    ro = t.readout
    z = oracles.linear(a.reshape(a.shape[0], -1), params[f"{ro.name}.weight"], params[f"{ro.name}.bias"])
    zs = z - z.max(axis=1, keepdims=True)
    return pre, acts, z, np.log(np.exp(zs).sum(axis=1, keepdims=True)) - zs  # last: (n, K) per-class −log p


def rounding_bounds(t: Teacher, params: dict, x: np.ndarray, n: int):
    """Per-layer activation error bounds e_l, logits bound E, and the loss bound (module docstring)."""
    lip, _ = ACT[t.activation]
    A, e, per_layer = float(np.max(np.abs(x))), 0.0, []
    for layer in t.arch.layers:
        W, b = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]
        m = int(np.prod(W.shape[1:]))
        norm = float(np.max(np.abs(W).reshape(W.shape[0], -1).sum(axis=1)))
        s = norm * A + float(np.max(np.abs(b)))
        r = gamma(F64, m + 2) * s
        if isinstance(layer, ConvLayer) and layer.pool == "avg":
            r += gamma(F64, 3) * s
        e = lip * (r + norm * e)
        per_layer.append(e)
        A = 1.0
    W, b = params[f"{t.readout.name}.weight"], params[f"{t.readout.name}.bias"]
    norm = float(np.max(np.abs(W).sum(axis=1)))
    s = norm * A + float(np.max(np.abs(b)))
    E = gamma(F64, W.shape[1] + 2) * s + norm * e
    Z, K = s + E, t.num_classes
    loss = 2 * E + gamma(F64, K + 8) * (6 * Z + 3 * math.log(K) + 3) + gamma(F64, n + 1) * (2 * Z + math.log(K))
    return per_layer, E, loss


def host_params(t: Teacher) -> dict:
    return {k: np.array(backend.to_numpy(v), dtype=F64) for k, v in t.params.items()}


# ---------------------------------------------------------------------- Eq. 7.1, 7.2: oracle agreement
@given(cfg=teacher_configs())
def test_forward_and_loss_match_oracle(xp, cfg):
    """Eqs. 7.1-7.2: logits, features and loss equal the loop-based oracle within twice the bound."""
    t, x, y, _ = make_teacher(cfg, xp)
    hp = host_params(t)
    logits, cache = t.forward(backend.asarray(x, xp=xp))
    loss = t.loss(backend.asarray(x, xp=xp), backend.asarray(y, xp=xp))
    _, acts, z, nll = oracle_forward(t, hp, x)
    e_l, E, e_loss = rounding_bounds(t, hp, x, cfg.n)
    for l, (a_lib, a_ref) in enumerate(zip(cache.acts, acts)):
        assert_within_bound(a_lib, a_ref, 2 * e_l[l], err_msg=f"a_{l + 1} of {cfg}")
    assert_within_bound(logits, z, 2 * E, err_msg=f"logits of {cfg}")
    expected = nll[np.arange(cfg.n), y].mean()
    assert abs(loss - expected) <= 2 * e_loss, (loss, expected, e_loss, cfg)


# ---------------------------------------------------------------------- Eq. 7.3: finite differences
def _pattern(t: Teacher, cache):
    """Which linear piece every pre-activation is on (below, inside, above the kinks) and the argmaxes."""
    _, (k0, k1) = ACT[t.activation]
    out = []
    for p, idx in zip(cache.pre, cache.indices):
        p = backend.to_numpy(p)
        out.append((np.where(p <= k0, 0, np.where(p >= k1, 2, 1)), None if idx is None else backend.to_numpy(idx)))
    return out


def _same(pa, pb) -> bool:
    return all(np.array_equal(r1, r2) and (i1 is None or np.array_equal(i1, i2)) for (r1, i1), (r2, i2) in zip(pa, pb))


H0 = 2.0**-12  # initial FD step (direction entries are of the size of the parameters)
MAX_HALVINGS = 40  # h is divided by 2 until the pattern is constant on [−2h, 2h]


@given(cfg=teacher_configs())
def test_backprop_equals_finite_differences(xp, cfg):
    """Eq. 7.3: ⟨∂L/∂θ, d⟩ equals the central difference of L along d, for each parameter tensor.

    Step: h = H0/2^j, the largest for which the pattern of linear pieces of ρ and the max-pool
    argmaxes is the same at t ∈ {−2h, −h, 0, h, 2h}; on that segment L(θ + t d) is smooth.
    With D(h) = (L(θ + hd) − L(θ − hd))/(2h) = f'(0) + h²f'''/6 + O(h⁴), and e the rounding
    bound of one loss evaluation, |D(h) − f'(0)| ≤ |D(2h) − D(h)|/3 + 2.5e/h + O(h⁴): D(2h) −
    D(h) = h²f'''/2 + O(h⁴) measures the truncation term. The tolerance doubles the measured
    term (covering the O(h⁴) remainder, which it overestimates fivefold when f''' = 0) and
    takes 3e/h for rounding.
    """
    t, x, y, rng = make_teacher(cfg, xp)
    xb, yb = backend.asarray(x, xp=xp), backend.asarray(y, xp=xp)
    _, grads = t.loss_and_grads(xb, yb)
    theta = host_params(t)
    _, _, e_loss = rounding_bounds(t, theta, x, cfg.n)
    base_pattern = _pattern(t, t.forward(xb)[1])

    def at(name, d, s):
        t.params[name] = backend.asarray(theta[name] + s * d, xp=xp)
        try:
            _, cache = t.forward(xb)
            return t.loss(xb, yb), _pattern(t, cache)
        finally:
            t.params[name] = backend.asarray(theta[name], xp=xp)

    for name in theta:
        scale = max(float(np.max(np.abs(theta[name]))), 1e-3)
        d = rng.standard_normal(theta[name].shape) * scale
        gd = float(np.sum(backend.to_numpy(grads[name]) * d))
        h = H0
        for _ in range(MAX_HALVINGS):
            vals = {s: at(name, d, s * h) for s in (-2, -1, 1, 2)}
            if all(_same(p, base_pattern) for _, p in vals.values()):
                break
            h /= 2
        else:
            pytest.fail(f"{name}: no kink-free step down to h = {h:.1e} for {cfg}")
        D1 = (vals[1][0] - vals[-1][0]) / (2 * h)
        D2 = (vals[2][0] - vals[-2][0]) / (4 * h)
        tol = 2 * abs(D2 - D1) / 3 + 3 * e_loss / h
        assert abs(gd - D1) <= tol, (
            f"{name}: <grad, d> = {gd!r}, central difference {D1!r} (h = {h:.2e}), |diff| {abs(gd - D1):.3e} "
            f"> tol {tol:.3e}; config {cfg}")
        # the check must be able to fail: the tolerance is far below any gradient error of relative size 1e-4
        assert tol <= 1e-4 * abs(D1) + 1e-7, f"{name}: tolerance {tol:.2e} too loose to test anything ({cfg})"


# ---------------------------------------------------------------------- Eq. 7.4 and initialisation
@given(cfg=teacher_configs())
def test_features_have_crnn_state_shapes_and_crnn_init(cfg):
    """Eq. 7.4: t_l(x) has the shape of the CRNN's s_l; parameters equal CRNN(readout='softmax')'s."""
    t, x, _, _ = make_teacher(cfg, "numpy")
    net = CRNN(cfg.spec, cfg.input_shape, num_classes=cfg.num_classes, readout="softmax", dtype="float64",
               xp="numpy", seed=cfg.seed % 2**31)
    feats = t.features(backend.asarray(x, xp="numpy"))
    assert [tuple(f.shape) for f in feats] == net.state_shapes(cfg.n)
    assert list(t.params) == list(net.params)
    for k in net.params:
        np.testing.assert_array_equal(backend.to_numpy(t.params[k]), backend.to_numpy(net.params[k]), err_msg=k)


# ---------------------------------------------------------------------- backend parity
def gradient_rounding_bound(t: Teacher, x: np.ndarray, y: np.ndarray) -> dict:
    """Bound on |ĝ − ∂L/∂θ| for the gradient of Eq. 7.3 computed in float64 (NumPy teacher ``t``).

    The reverse pass is a multilinear map B(a, δ) of the forward factors (a_0 = x exact,
    a_1 … a_L, δ) with coefficients |W|, ρ' ≥ 0 and the (un)pooling weights ≥ 0; write
    B_abs for it with every coefficient replaced by its absolute value. The computed
    factors carry errors e_l (``rounding_bounds``) and e_δ (below), so by
    Π(|x_i| + Δ_i) − Π|x_i| ≥ |Π(x_i + Δ_i) − Π x_i| and the summation bound,
        |ĝ − g| ≤ γ_D·S⁺ + (S⁺ − S) (+ 4u·S⁺ for the subtraction), S = B_abs(|â|, |δ̂|),
        S⁺ = B_abs(|â| + e, |δ̂| + e_δ),
    with D the longest chain of roundings: K (readout transpose) + Σ_l (o_l·k_l² or m_l)
    (transposed convolutions / fc transposes) + n·max h'w' (weight-gradient sums) + 2L + 4.
    δ = (softmax(z) − onehot(y))/n: log softmax(z)_k has the per-sample error ε_ℓ of
    ``rounding_bounds``, exp adds 2u, p ≤ 1, so e_δ = (1.01·ε_ℓ + 5u)/n.
    Assumes no pre-activation lies within its rounding error of a kink (ρ' and the argmaxes
    are those of the exact network), an event of probability ~1e−15 per unit.
    """
    n, K = x.shape[0], t.num_classes
    hp = host_params(t)
    e_l, E, _ = rounding_bounds(t, hp, x, n)
    logits, cache = t.forward(x)
    W = hp[f"{t.readout.name}.weight"]
    Z = float(np.max(np.abs(W).sum(axis=1))) + float(np.max(np.abs(hp[f"{t.readout.name}.bias"]))) + E
    eps_l = 2 * E + gamma(F64, K + 8) * (6 * Z + 3 * math.log(K) + 3)
    u = float(np.finfo(F64).eps) / 2
    zs = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(zs) / np.exp(zs).sum(axis=1, keepdims=True)
    delta = np.abs(p - np.eye(K)[y]) / n
    e_delta = (1.01 * eps_l + 5 * u) / n
    D, hw = K + 2 * len(t.arch.layers) + 4, 1
    for layer in t.arch.layers:
        if isinstance(layer, ConvLayer):
            D += layer.out_channels * layer.kernel**2
            hw = max(hw, layer.conv_hw[0] * layer.conv_hw[1])
        else:
            D += layer.out_features
    D += n * hw
    t_abs = Teacher(t.arch_name, t.input_shape, num_classes=K, activation=t.activation, dtype="float64", xp="numpy")
    t_abs.params = {k: np.abs(v) for k, v in hp.items()}
    S = t_abs.backward(TeacherCache(np.abs(x), cache.pre, [np.abs(a) for a in cache.acts], cache.indices, None),
                       delta)
    S_plus = t_abs.backward(TeacherCache(np.abs(x), cache.pre, [np.abs(a) + e for a, e in zip(cache.acts, e_l)],
                                         cache.indices, None), delta + e_delta)
    return {k: (gamma(F64, D) + 4 * u) * S_plus[k] + (S_plus[k] - S[k]) for k in S}


@given(cfg=teacher_configs())
def test_array_api_strict_parity(cfg):
    """Backend parity: under array_api_strict the teacher's activations, logits, loss and
    gradients (Eqs. 7.1-7.3) agree with NumPy's within the sum of the two rounding bounds.
    (They are not always bitwise equal: intermediate arrays can have different memory layouts
    in the two namespaces (views versus copies), and BLAS's summation order depends on the
    layout; e.g. conv2 weight gradients differing by 7e-18.)"""
    out = {}
    for name in ("numpy", "array_api_strict"):
        xp = backend.get_namespace(name)
        t, x, y, _ = make_teacher(cfg, xp)
        xb, yb = backend.asarray(x, xp=xp), backend.asarray(y, xp=xp)
        loss, grads = t.loss_and_grads(xb, yb)
        logits, cache = t.forward(xb)
        out[name] = (loss, backend.to_numpy(logits), [backend.to_numpy(a) for a in cache.acts],
                     {k: backend.to_numpy(v) for k, v in grads.items()})
    t, x, y, _ = make_teacher(cfg, "numpy")
    e_l, E, e_loss = rounding_bounds(t, host_params(t), x, cfg.n)
    g_bound = gradient_rounding_bound(t, x, y)
    (l0, z0, a0, g0), (l1, z1, a1, g1) = out["numpy"], out["array_api_strict"]
    assert abs(l0 - l1) <= 2 * e_loss, (l0, l1, e_loss, cfg)
    assert_within_bound(z1, z0, 2 * E, err_msg=f"logits, {cfg}")
    for l, (u, v) in enumerate(zip(a0, a1)):
        assert_within_bound(v, u, 2 * e_l[l], err_msg=f"a_{l + 1}, {cfg}")
    for k in g0:
        assert_within_bound(g1[k], g0[k], 2 * g_bound[k], err_msg=f"{k}, {cfg}")
