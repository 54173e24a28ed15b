"""Reference properties of the CRNN, its EP estimators and BPTT (SPEC.md §3-5), in float64.

(1) ∂Φ^β/∂s and ∂Φ^β/∂θ are the gradients of Φ^β (Eqs. 3.2-3.7, 3.9): finite differences;
(2) BPTT is the gradient of the loss after T steps (Eqs. 5.1-5.4): finite differences;
(3) EP → BPTT as β → 0, one-sided O(β), symmetric O(β²) (Eqs. 4.1, 4.2, 4.4); random sign (4.3);
(4) GDU: per-step EP updates → per-step BPTT gradients (Eqs. 4.5, 5.5);
(5) backend parity of (1)-(3) under every backend of the ``xp`` fixture.

Networks are drawn by ``pyeqprop.testing.model_strategies.crnn_configs`` (1-3 conv layers
with max/avg/no pooling, an optional fc layer, input sizes derived so every pool is valid,
batch 1-3, both readouts, both activations); arrays come from the config's seed.

Tolerances come from a rounding-error model (``pyeqprop.testing.rounding``): a computed sum
differs from the exact one by at most γ_d · Σ|terms|, γ_d the relative factor for rounding
depth d (:func:`_depth`, an upper bound on the length of any reduction chain plus the
elementwise operations on its path, from the layers' reduction lengths of
``pyeqprop.testing.propagation``). Σ|terms| is computed by running the same layer maps on
|θ|, |x|, |s| (with every pooled value spread over its whole window, which bounds both max
selection and averaging), or bounded by norms where only a norm is needed:

* ‖A_l v‖ ≤ a_l ‖v‖ with a_l from :func:`pyeqprop.diagnostics.block_norm_bounds`; the
  dynamics' Jacobian within a piece is diag(ρ′)·H with ‖H‖ ≤ ‖M‖ (tridiagonal matrix of the
  a_l), so one step is q-Lipschitz, q = max ρ′ ‖M‖ (+ |β|κ for the nudge);
* for the bilinear ∂Φ/∂θ (Eq. 3.9), ‖Σ_batch ∂⟨B_l(a), b⟩/∂θ_l‖_F ≤ k_l ‖a‖ ‖b‖ + √(n P_l) ‖b‖
  (k_l the kernel size, P_l the spatial positions of s_l; 1 for fc), which bounds both the
  absolute terms and the Lipschitz constant in s;
* states lie in [0, 1], so ‖s_l‖ ≤ √(n·units_l).

The conformance generator bounds the same quantities differently: elementwise, in the max norm,
at the reference's argmaxes, for fixed inputs (``pyeqprop.testing.propagation.CRNNBounds``). The
2-norm bounds here hold for every drawn network and are kept apart from it.

"Kinks": Φ is piecewise bilinear in (θ, s) and the dynamics piecewise polynomial; a piece is
fixed by the argmax of every max pool and the side of every activation kink each
pre-activation lies on (:func:`_piece`). Finite differences and the β → 0 expansions hold
within a piece; the tests detect when a perturbation leaves its piece and then either
reject the example (probability O(h) for a finite-difference step h) or, for the EP limit,
use the largest β range that stays inside (the limit statement is local; that range depends on
how close s^0 lies to a kink, so β is scanned down by decades, :func:`_beta_decades`).
"""
from __future__ import annotations

import math

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import pyeqprop
from pyeqprop import backend, ops
from pyeqprop.diagnostics import (
    activation_slope,
    block_norm_bounds,
    contracting_weight_scale,
    lipschitz_bound,
    tridiagonal_norm,
)
from pyeqprop.model.arch import ConvLayer
from pyeqprop.testing.rounding import gamma, unit_roundoff
from pyeqprop.testing.model_strategies import crnn_configs
from pyeqprop.testing.propagation import conv_positions, fan_in, fan_out

F64 = np.float64
U = unit_roundoff(F64)
H_FD = 1e-6  # finite-difference step
T_SETTLE = 50  # free and nudged steps: with a contraction bound q ≤ 1/2, r_T ≤ 2^-(T-1) r_1 ≤ 1.8e-15
RESIDUAL_MAX = 1e-12
K_GDU = 6  # nudged steps compared step by step (Eq. 4.5)


def _examples(divisor: int, minimum: int = 4):
    """max_examples of the loaded profile (``ci`` 40) divided by ``divisor`` for the costly tests."""
    return settings(max_examples=max(minimum, settings.default.max_examples // divisor))


# --------------------------------------------------------------------------- host/backend moves
def _h(a) -> np.ndarray:
    return np.asarray(backend.to_numpy(a), dtype=F64)


def _dev(a, net):
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        return backend.asarray(a.astype(np.int64), xp=net.xp)
    return backend.asarray(a.astype(F64), xp=net.xp, dtype="float64")


def _drawn(cfg):
    """The example's network, its rng after drawing the data, and the data on host (xh, yh) and device (x, y)."""
    net = cfg.net()
    rng = cfg.rng()
    xh, yh = cfg.data(rng)
    return net, rng, xh, yh, _dev(xh, net), _dev(yh, net)


def _devs(arrays, net):
    return [_dev(a, net) for a in arrays]


def _vdot(a, b) -> float:
    return float(np.vdot(np.asarray(a, F64).ravel(), np.asarray(b, F64).ravel()))


def _global_norm(d: dict) -> float:
    return math.sqrt(sum(float(np.sum(_h(v) ** 2)) for v in d.values()))


def _distance(g: dict, ref: dict) -> float:
    """‖g − ref‖ in the global L2 norm over all parameters."""
    return math.sqrt(sum(float(np.sum((_h(g[k]) - _h(ref[k])) ** 2)) for k in ref))


def _rel_error(g: dict, ref: dict) -> float:
    """Relative error in the global L2 norm over all parameters."""
    return _distance(g, ref) / _global_norm(ref)


class _params_set:
    """Temporarily replace ``net.params`` by host arrays ``new`` (moved to the net's backend)."""

    def __init__(self, net, new):
        self.net, self.new = net, new

    def __enter__(self):
        self.old = self.net.params
        self.net.params = {k: _dev(v, self.net) for k, v in self.new.items()}
        return self.net

    def __exit__(self, *exc):
        self.net.params = self.old


# --------------------------------------------------------------------------- pieces (kinks)
def _piece(net, x, state, y=None, beta=0.0):
    """The piece s lies in for the dynamics of Φ^β: per layer, the side of each kink of ρ that
    u_l = ∂Φ^β/∂s_l is on (0: u ≤ k₀, 1: k₀ < u < k₁, 2: u ≥ k₁, matching ρ′) and the max-pool argmaxes."""
    d = net.drive(x, list(state), net.nudge(x, y if beta != 0.0 else None, beta))
    k0, k1 = net.act.kinks
    regions = [np.where(_h(u) <= k0, 0, np.where(_h(u) < k1, 1, 2)) for u in d.u]
    idx = [None if i is None else backend.to_numpy(i).copy() for i in d.indices]
    return regions, idx


def _same_piece(p, q) -> bool:
    return all(np.array_equal(a, b) for a, b in zip(p[0], q[0])) and all(
        (a is None and b is None) or np.array_equal(a, b) for a, b in zip(p[1], q[1]))


def _trajectory_pieces(net, x, T):
    """The piece of every free step s_t, t = 0 … T − 1, and s_T (Eq. 3.8 from zero)."""
    s = net.init_state(x.shape[0])
    pieces = []
    for _ in range(T):
        pieces.append(_piece(net, x, s))
        s = net.step(x, s)
    return pieces, s


# --------------------------------------------------------------------------- rounding model
def _pool_positions(layer) -> int:
    return layer.out_hw[0] * layer.out_hw[1] if isinstance(layer, ConvLayer) else 1


def _kernel(layer) -> int:
    return layer.kernel if isinstance(layer, ConvLayer) else 1


def _depth(net, n: int) -> int:
    """An upper bound on the rounding depth of any one output of Φ, ∂Φ/∂s, ∂Φ/∂θ, C or ∂C/∂s
    (Eqs. 3.2-3.9): the longest reduction of each kind plus a few elementwise operations."""
    fan = max(fan_in(ly) for ly in net.arch.layers)
    fan_t = max(fan_out(ly) for ly in net.arch.layers)
    units = max(int(np.prod(s)) for s in net.arch.state_shapes)
    conv_pos = max(conv_positions(ly) for ly in net.arch.layers)
    ro = net.arch.readout
    cost = net.num_classes + (ro.in_features if ro is not None else 0)
    return fan + fan_t + n * units + n * conv_pos + len(net.arch.layers) + cost + n + 16


def _abs_params(net, params=None) -> dict:
    return {k: np.abs(_h(v)) for k, v in (net.params if params is None else params).items()}


def _spread(v, layer):
    """Every pooled value copied to its whole 2×2 window: bounds |max unpool| and |avg unpool|."""
    if isinstance(layer, ConvLayer) and layer.pool != "none":
        return np.repeat(np.repeat(v, 2, axis=2), 2, axis=3)  # (n, o, h', w') -> (n, o, 2h', 2w')
    return v


def _drive_abs(net, P, x, s):
    """Elementwise Σ|terms| bounds of B_l(s_{l−1}) and of u_l = ∂Φ/∂s_l (Eqs. 3.1, 3.7) at
    |θ| = P, |x|, |s| (host float64)."""
    n = x.shape[0]
    below = [np.abs(x)] + [np.abs(a) for a in s]
    bu = []
    for l, layer in enumerate(net.arch.layers):
        W, b = P[f"{layer.name}.weight"], P[f"{layer.name}.bias"]
        if isinstance(layer, ConvLayer):
            z = _h(ops.conv2d(below[l], W, b, padding=layer.padding))
            if layer.pool != "none":
                z = _h(ops.max_pool2d(z)[0])  # the window maximum of |terms| bounds max and mean
        else:
            z = below[l].reshape(n, -1) @ W.T + b  # (n, in) -> (n, out)
        bu.append(z)
    u = [z.copy() for z in bu]
    for l in range(1, len(net.arch.layers)):
        layer = net.arch.layers[l]
        W = P[f"{layer.name}.weight"]
        g = _spread(np.abs(s[l]), layer)
        if isinstance(layer, ConvLayer):
            u[l - 1] += _h(ops.conv2d_transpose(g, W, padding=layer.padding, output_size=s[l - 1].shape[2:]))
        else:
            u[l - 1] += (g @ W).reshape(s[l - 1].shape)  # (n, out) @ (out, in) -> shape of s_{l−1}
    return bu, u


def _phi_abs(net, P, x, s) -> float:
    """Σ over the batch of Σ|terms| of Φ (Eq. 3.2) at |θ| = P, |x|, |s|."""
    bu, _ = _drive_abs(net, P, x, s)
    return float(sum(np.sum(b * np.abs(a)) for b, a in zip(bu, s)))


def _cost_abs(net, P, s, y) -> float:
    """Σ over the batch of a bound on the rounding scale of C (Eqs. 3.3-3.4) and of ⟨∂C/∂s, ·⟩.

    mse: ½ Σ (|s_L| + |onehot|)². softmax: per sample 4 max_k z_k + log K + 2 with z the
    Σ|terms| of the logits: z carries γ z, the shift by the maximum and ∂C/∂z (‖·‖₁ ≤ 2)
    double it twice, exp/sum/log add log K + 2 (module docstring of checks)."""
    yoh = np.eye(net.num_classes)[y]
    if net.readout == "mse":
        return float(0.5 * np.sum((np.abs(s[-1]) + yoh) ** 2))
    ro = net.arch.readout
    z = np.abs(s[-1]).reshape(s[-1].shape[0], -1) @ P[f"{ro.name}.weight"].T + P[f"{ro.name}.bias"]
    return float(np.sum(4.0 * z.max(axis=1) + math.log(net.num_classes) + 2.0))


def _state_norms(net, n):
    """S_l ≤ √(n·units_l) for states in [0, 1] (ρ maps into [0, 1])."""
    return [math.sqrt(n * int(np.prod(shape))) for shape in net.arch.state_shapes]


def _bilinear_bound(net, n, a_norms, b_norms, *, with_bias=True) -> float:
    """Bound on ‖Σ_batch Σ_l ∂⟨B_l(a_l), b_l⟩/∂θ_l‖_F, a_l the layer's lower argument (module docstring)."""
    return sum(_kernel(ly) * a_norms[l] * b_norms[l] + with_bias * math.sqrt(n * _pool_positions(ly)) * b_norms[l]
               for l, ly in enumerate(net.arch.layers))


def _drive_norm_bound(net, x, beta=0.0) -> float:
    """Bound on ‖Σ|terms| of u‖₂ over all steps: ‖M(|θ|)‖ S + a_1(|θ|) ‖x‖ + ‖bias field‖ + |β| cost part."""
    n = x.shape[0]
    P = _abs_params(net)
    S = math.sqrt(sum(v * v for v in _state_norms(net, n)))
    a_abs = block_norm_bounds(net, P)
    bias = math.sqrt(sum(n * _pool_positions(ly) * float(np.sum(P[f"{ly.name}.bias"] ** 2)) for ly in net.arch.layers))
    total = tridiagonal_norm(a_abs) * S + a_abs[0] * float(np.linalg.norm(x)) + bias
    if beta != 0.0:
        S_L = _state_norms(net, n)[-1]
        if net.readout == "mse":
            total += abs(beta) * (S_L + math.sqrt(n))
        else:  # |W_out|ᵀ |p − onehot| with |p − onehot| ≤ 1 per entry
            W = P[f"{net.arch.readout.name}.weight"]
            total += abs(beta) * float(np.linalg.norm(W, 2)) * math.sqrt(n * net.num_classes)
    return total


def _state_error(net, x, beta=0.0) -> float:
    """Bound on ‖computed s_t − exact s_t‖₂ for any t (within one piece): e_{t+1} ≤ q e_t + ρ′ γ ‖U‖,
    so e ≤ ρ′ γ ‖U‖ / (1 − q), q = lipschitz_bound(β) < 1."""
    q = lipschitz_bound(net, beta=beta)
    assert q < 1.0, f"contraction bound {q} >= 1: the rounding bound needs a contracting network"
    d = _depth(net, x.shape[0])
    return activation_slope(net) * gamma(F64, d) * _drive_norm_bound(net, x, beta) / (1.0 - q)


def _dphi_dtheta_error(net, x, e_s) -> float:
    """Bound on the error of Σ_batch ∂Φ/∂θ (Eq. 3.9) at a computed state with state error e_s:
    γ·(abs terms) + Lipschitz in s times e_s."""
    n = x.shape[0]
    d = _depth(net, n)
    S = [float(np.linalg.norm(x))] + _state_norms(net, n)
    absterms = _bilinear_bound(net, n, S[:-1], S[1:])
    # G(s + δ) − G(s): lower ⊗ δ_upper + δ_lower ⊗ upper + δ_lower ⊗ δ_upper (+ bias), δ_lower = 0 for the input
    E = [0.0] + [e_s] * len(net.arch.layers)
    lip = sum(_kernel(ly) * (S[l] * E[l + 1] + E[l] * S[l + 1] + E[l] * E[l + 1])
              + math.sqrt(n * _pool_positions(ly)) * E[l + 1] for l, ly in enumerate(net.arch.layers))
    return gamma(F64, d) * absterms + lip


def _cost_param_error(net, x, e_s) -> float:
    """Bound on the error of (1/n) ∂C/∂θ for cost-only parameters (softmax readout):
    ∂C/∂W_out = (p − onehot)ᵀ vec(s_L), ‖·‖_F ≤ √2 ‖s_L‖; Lipschitz in s_L ≤ ‖W_out‖ ‖s_L‖ + √2."""
    if net.readout != "softmax":
        return 0.0
    n = x.shape[0]
    S_L = _state_norms(net, n)[-1]
    W = _h(net.params[f"{net.arch.readout.name}.weight"])
    return (gamma(F64, _depth(net, n)) * math.sqrt(2.0) * (S_L + math.sqrt(n))
            + (float(np.linalg.norm(W, 2)) * S_L + math.sqrt(2.0)) * e_s) / n


def _ep_floor(net, x, beta, estimator) -> float:
    """Round-off floor (absolute, global L2) of the EP estimate (Eqs. 4.1-4.2): each ∂Φ/∂θ at a
    settled state carries _dphi_dtheta_error; the difference is divided by β n (2β n)."""
    n = x.shape[0]
    e0 = _state_error(net, x, 0.0)
    eb = max(_state_error(net, x, beta), _state_error(net, x, -beta))
    if estimator == "symmetric":
        net_part = 2.0 * _dphi_dtheta_error(net, x, eb) / (2.0 * beta * n)
    else:
        net_part = (_dphi_dtheta_error(net, x, eb) + _dphi_dtheta_error(net, x, e0)) / (beta * n)
    return net_part + 2.0 * _cost_param_error(net, x, eb)


def _bptt_floor(net, x, mu_norms, *, per_step_mu=False):
    """Round-off floor (absolute, global L2) of BPTT (Eqs. 5.1-5.4).

    ``mu_norms[k][l]`` = ‖μ_{T−1−k, l}‖ (from ``state_steps``). Reverse errors: ε_μ starts at
    ρ′ ε_λT and obeys ε_μ(t−1) ≤ q ε_μ(t) + ρ′ γ ‖M(|θ|)‖ ‖μ_t‖ + u ‖μ_{t−1}‖; each step term
    (Eq. 5.4) is bilinear in (s, μ) and adds γ·(abs terms) + bilinear bound·ε_μ + 2 k ‖μ‖ e_s;
    the accumulation over T steps adds γ_T Σ ‖step‖. With ``per_step_mu`` also returns the
    bounds ε_μ of every μ_{T−1−k}."""
    n = x.shape[0]
    d = _depth(net, n)
    g = gamma(F64, d)
    rho = activation_slope(net)
    q = lipschitz_bound(net)
    e_s = _state_error(net, x, 0.0)
    S = [float(np.linalg.norm(x))] + _state_norms(net, n)
    S_L = S[-1]
    m_abs = tridiagonal_norm(block_norm_bounds(net, _abs_params(net)))
    if net.readout == "mse":
        eps_lam = (e_s + g * (S_L + math.sqrt(n))) / n
    else:
        W = _h(net.params[f"{net.arch.readout.name}.weight"])
        w2 = float(np.linalg.norm(W, 2))
        eps_lam = (w2 * w2 * e_s + g * float(np.linalg.norm(W)) * math.sqrt(2.0 * n)) / n
    kmax = max(_kernel(ly) for ly in net.arch.layers)
    L = len(net.arch.layers)
    ones, below_ones = [1.0] * L, [0.0] + [1.0] * (L - 1)
    # Lipschitz constant of the step term (Eq. 5.4) in μ, for fixed s
    lip_mu = (_bilinear_bound(net, n, S[:-1], ones)
              + _bilinear_bound(net, n, below_ones, S[1:], with_bias=False))
    norms = [math.sqrt(sum(v * v for v in mu)) for mu in mu_norms] + [0.0]
    total, steps, eps_all = 0.0, 0.0, []
    eps_mu = rho * eps_lam + U * norms[0]
    for k, mu in enumerate(mu_norms):
        eps_all.append(eps_mu)
        step_abs = (_bilinear_bound(net, n, S[:-1], list(mu))
                    + _bilinear_bound(net, n, [0.0] + list(mu[:-1]), S[1:], with_bias=False))
        total += g * step_abs + lip_mu * eps_mu + 2.0 * kmax * norms[k] * e_s
        steps += step_abs
        eps_mu = q * eps_mu + rho * g * m_abs * norms[k] + U * norms[k + 1]
    total = total + gamma(F64, len(mu_norms) + 1) * steps + _cost_param_error(net, x, e_s)
    return (total, eps_all) if per_step_mu else total


def _contracting_net(cfg, *, beta_max=0.0, xp="numpy"):
    """The config's network with weights scaled so that lipschitz_bound(β_max) ≤ 1/2 (weights only
    scale; the same seed draws the same uniform numbers)."""
    base = cfg.net(weight_scale=1.0)
    scale = contracting_weight_scale(base, target=0.4)
    while lipschitz_bound(cfg.net(weight_scale=scale), beta=beta_max) > 0.5:
        scale *= 0.5  # only the softmax readout's κ = ‖W_out‖² can need this
    return cfg.net(xp=xp, weight_scale=scale)


# =========================================================================== (1) gradients of Φ
def _softmax_third(net, P_out, v_flat) -> float:
    """Σ_n 2‖W v_n‖∞³ (no bias) or with the bias direction: bound on Σ_n |d³C/dτ³| when the
    logits move along z′ (|κ₃| ≤ 2 a³ for a variable in [−a, a])."""
    return float(np.sum(2.0 * np.max(np.abs(v_flat), axis=1) ** 3))


@given(cfg=crnn_configs(), beta=st.sampled_from((0.0, 0.7, -0.4)))
def test_dphi_ds_equals_finite_differences_of_phi(cfg, beta):
    """∂Φ^β/∂s (Eq. 3.7) is the gradient of Φ^β = Φ − βC (Eqs. 3.2, 3.3-3.6) summed over the batch.

    Along a random direction d, the central difference [Φ^β(s + hd) − Φ^β(s − hd)]/(2h) equals
    Σ_l ⟨∂Φ^β/∂s_l, d_l⟩. Within a piece of fixed argmaxes Φ is a quadratic polynomial in s
    (bilinear in neighbouring layers), and so is the mse cost: the central difference is
    then exact and only round-off remains, γ_d·A/h for each of the two evaluations
    (A = Σ|terms| at |s| + |d|), plus 2u·A/h for rounding s ± hd. The softmax cost adds the
    truncation |β| h²/6 · Σ_n 2‖W_out d_L,n‖∞³. Examples where ±hd moves a max-pool argmax
    (probability O(h)) are rejected.
    """
    net, rng, xh, yh, x, y = _drawn(cfg)
    n = cfg.n
    s = [rng.random(shape) for shape in net.state_shapes(n)]
    d = [rng.standard_normal(shape) for shape in net.state_shapes(n)]
    plus = [a + H_FD * b for a, b in zip(s, d)]
    minus = [a - H_FD * b for a, b in zip(s, d)]
    p0 = _piece(net, x, _devs(s, net))
    assume(_same_piece(p0, _piece(net, x, _devs(plus, net))) and _same_piece(p0, _piece(net, x, _devs(minus, net))))
    yy = y if beta != 0.0 else None

    def phi(state):
        return float(np.sum(_h(net.phi(x, _devs(state, net), net.nudge(x, yy, beta)))))

    fd = (phi(plus) - phi(minus)) / (2.0 * H_FD)
    grads = net.dphi_ds(x, _devs(s, net), net.nudge(x, yy, beta))
    directional = sum(_vdot(_h(g), b) for g, b in zip(grads, d))

    P = _abs_params(net)
    sd = [np.abs(a) + np.abs(b) for a, b in zip(s, d)]
    A = _phi_abs(net, P, xh, sd) + abs(beta) * _cost_abs(net, P, sd, yh)
    g = gamma(F64, _depth(net, n))
    trunc = 0.0
    if net.readout == "softmax" and beta != 0.0:
        W = _h(net.params[f"{net.arch.readout.name}.weight"])
        trunc = abs(beta) * H_FD ** 2 / 6.0 * _softmax_third(net, W, d[-1].reshape(n, -1) @ W.T)
    tol = (g + 2 * U) * A / H_FD + g * A + 2 * U * abs(fd) + trunc
    assert abs(fd - directional) <= tol, (
        f"{cfg}: FD {fd!r} vs <dphi_ds, d> {directional!r}, |diff| {abs(fd - directional):.3e} > tol {tol:.3e}")


@given(cfg=crnn_configs(), beta=st.sampled_from((0.0, 0.7, -0.4)))
def test_dphi_dtheta_equals_finite_differences_of_phi(cfg, beta):
    """Σ_batch ∂Φ^β/∂θ (Eq. 3.9; cost-only parameters −β ∂C/∂θ, Eqs. 3.4, 3.6) is the gradient of
    Σ_batch Φ^β in θ.

    For fixed s, Φ is linear in the network parameters (B_l is affine in (W_l, b_l)) away from
    argmax flips, so the central difference along a random direction d_θ is exact up to
    round-off γ_d·A/h per evaluation (A = Σ|terms| at |θ| + |d_θ|), plus 2u·A/h for rounding
    θ ± h d_θ; the softmax readout's parameters add the truncation |β| h²/6 Σ_n 2‖z′_n‖∞³ with
    z′ = W_d vec(s_L) + b_d. Examples where the perturbation moves an argmax are rejected.
    """
    net, rng, xh, yh, x, y = _drawn(cfg)
    n = cfg.n
    s = [rng.random(shape) for shape in net.state_shapes(n)]
    theta = {k: _h(v) for k, v in net.params.items()}
    dtheta = {k: rng.standard_normal(v.shape) for k, v in theta.items()}
    plus = {k: theta[k] + H_FD * dtheta[k] for k in theta}
    minus = {k: theta[k] - H_FD * dtheta[k] for k in theta}
    st_dev = _devs(s, net)
    yy = y if beta != 0.0 else None
    p0 = _piece(net, x, st_dev)
    with _params_set(net, plus):
        pp, fp = _piece(net, x, st_dev), float(np.sum(_h(net.phi(x, st_dev, net.nudge(x, yy, beta)))))
    with _params_set(net, minus):
        pm, fm = _piece(net, x, st_dev), float(np.sum(_h(net.phi(x, st_dev, net.nudge(x, yy, beta)))))
    assume(_same_piece(p0, pp) and _same_piece(p0, pm))
    fd = (fp - fm) / (2.0 * H_FD)
    grads = net.dphi_dtheta(x, st_dev, net.nudge(x, yy, beta))
    assert list(grads) == list(net.params)
    directional = sum(_vdot(_h(grads[k]), dtheta[k]) for k in theta)

    Pd = {k: np.abs(theta[k]) + np.abs(dtheta[k]) for k in theta}
    A = _phi_abs(net, Pd, xh, s) + abs(beta) * _cost_abs(net, Pd, s, yh)
    g = gamma(F64, _depth(net, n))
    trunc = 0.0
    if net.readout == "softmax" and beta != 0.0:
        name = net.arch.readout.name
        zdot = s[-1].reshape(n, -1) @ dtheta[f"{name}.weight"].T + dtheta[f"{name}.bias"]
        trunc = abs(beta) * H_FD ** 2 / 6.0 * _softmax_third(net, None, zdot)
    tol = (g + 2 * U) * A / H_FD + g * A + 2 * U * abs(fd) + trunc
    assert abs(fd - directional) <= tol, (
        f"{cfg}: FD {fd!r} vs <dphi_dtheta, d> {directional!r}, |diff| {abs(fd - directional):.3e} > tol {tol:.3e}")


# =========================================================================== (2) BPTT
def _loss_error(net, x, yh, state, e_s) -> float:
    """Bound on the error of L = (1/n) Σ_n C(s_T) (Eq. 5.1) computed at a state with error e_s:
    ‖∇C‖ e_s + ½ κ e_s² + γ·(cost abs terms), over n."""
    n = x.shape[0]
    s_host = [_h(a) for a in state]
    yoh = np.eye(net.num_classes)[yh]
    P = _abs_params(net)
    if net.readout == "mse":
        grad, kappa = float(np.linalg.norm(s_host[-1] - yoh)), 1.0
    else:
        W = _h(net.params[f"{net.arch.readout.name}.weight"])
        w2 = float(np.linalg.norm(W, 2))
        # ‖Wᵀ(p − onehot)‖ ≤ ‖W‖ ‖p − onehot‖ and ‖p − onehot‖₂ ≤ √2 per sample
        grad, kappa = w2 * math.sqrt(2.0 * n), w2 * w2
    return (grad * e_s + 0.5 * kappa * e_s ** 2 + gamma(F64, _depth(net, n)) * _cost_abs(net, P, s_host, yh)) / n


def _loss_third_derivative(net, x, T, dtheta) -> float:
    """Bound on |d³L/dτ³| along θ + τ d_θ, |τ| ≤ h, within one piece (Eqs. 3.8, 5.1).

    With u_t = H(τ) s_t + g(τ) (H, g affine in τ) and s_{t+1} = D_t u_t + c_t in the piece:
    s′ = D(H_d s + H s′ + g_d), s″ = D(2 H_d s′ + H s″), s‴ = D(3 H_d s″ + H s‴), so with
    ‖D‖ ≤ ρ′, ‖H‖ ≤ ‖M(θ)‖ + h‖M(d)‖, ‖H_d‖ ≤ ‖M(d)‖, ‖s‖ ≤ S, ‖g_d‖ ≤ a_1(d)‖x‖ + ‖bias field of d‖,
    σ_k bounds ‖s^(k)‖ by recursion from s_0 = 0. mse: C‴ = 3⟨s′, s″⟩ + ⟨s − y, s‴⟩;
    softmax: z = W s_L + b, C‴ ≤ 2‖z′‖∞³ + 3‖z′‖∞‖z″‖∞ + 2‖z‴‖∞ (cumulant bounds of softmax)."""
    n = x.shape[0]
    rho = activation_slope(net)
    hd = tridiagonal_norm(block_norm_bounds(net, dtheta))
    hn = tridiagonal_norm(block_norm_bounds(net)) + H_FD * hd
    S = math.sqrt(sum(v * v for v in _state_norms(net, n)))
    bias_d = math.sqrt(sum(n * _pool_positions(ly) * float(np.sum(dtheta[f"{ly.name}.bias"] ** 2))
                           for ly in net.arch.layers))
    gd = block_norm_bounds(net, dtheta)[0] * float(np.linalg.norm(x)) + bias_d
    s1 = s2 = s3 = 0.0
    for _ in range(T):
        s1, s2, s3 = rho * (hd * S + hn * s1 + gd), rho * (2 * hd * s1 + hn * s2), rho * (3 * hd * s2 + hn * s3)
    if net.readout == "mse":
        return (3 * s1 * s2 + math.sqrt(n * net.num_classes) * s3) / n
    name = net.arch.readout.name
    wd = float(np.linalg.norm(dtheta[f"{name}.weight"], 2))
    w = float(np.linalg.norm(_h(net.params[f"{name}.weight"]), 2)) + H_FD * wd
    S_L = _state_norms(net, n)[-1]
    z1 = wd * S_L + w * s1 + math.sqrt(n) * float(np.linalg.norm(dtheta[f"{name}.bias"]))
    z2 = 2 * wd * s1 + w * s2
    z3 = 3 * wd * s2 + w * s3
    return (2 * z1 ** 3 + 3 * z1 * z2 + 2 * math.sqrt(n) * z3) / n


def _mu_norms(ref):
    return [[float(np.linalg.norm(_h(m))) for m in mu] for mu in ref.state_steps]


@_examples(2)
@given(cfg=crnn_configs(), T=st.integers(1, 6))
def test_bptt_equals_finite_differences_of_loss(cfg, T):
    """BPTT (Eqs. 5.1-5.4) is the gradient of L(θ) = (1/n) Σ_n C(s_T(θ)) after T free steps from zero.

    Along a random direction d_θ (all parameters, readout included), the central difference
    [L(θ + h d) − L(θ − h d)]/(2h) equals Σ_k ⟨∂L/∂θ_k, d_k⟩. Within one piece (no activation
    kink crossed, no argmax moved at any step: checked at θ ± h d, else the example is rejected)
    L is smooth and the difference carries the truncation h²/6·sup|L‴| (bounded by
    :func:`_loss_third_derivative`) and the round-off 2·err(L)/(2h) (err(L) from the state error
    of the contracting network, :func:`_loss_error`), plus the BPTT round-off itself.
    """
    net = _contracting_net(cfg)
    rng = cfg.rng()
    xh, yh = cfg.data(rng)
    x, y = _dev(xh, net), _dev(yh, net)
    n = cfg.n
    ref = pyeqprop.bptt(net, x, y, T=T, per_step=True)
    theta = {k: _h(v) for k, v in net.params.items()}
    dtheta = {k: rng.standard_normal(v.shape) for k, v in theta.items()}
    center, _ = _trajectory_pieces(net, x, T)
    losses, errs = [], []
    for sign in (1.0, -1.0):
        with _params_set(net, {k: theta[k] + sign * H_FD * dtheta[k] for k in theta}):
            pieces, sT = _trajectory_pieces(net, x, T)
            assume(all(_same_piece(a, b) for a, b in zip(center, pieces)))
            losses.append(float(np.sum(_h(net.cost(x, sT, net.nudge(x, y))))) / n)
            errs.append(_loss_error(net, xh, yh, sT, _state_error(net, xh)))
    fd = (losses[0] - losses[1]) / (2.0 * H_FD)
    directional = sum(_vdot(_h(ref.grads[k]), dtheta[k]) for k in theta)
    dnorm = math.sqrt(sum(float(np.sum(v ** 2)) for v in dtheta.values()))
    g_err = _bptt_floor(net, xh, _mu_norms(ref)) * dnorm + gamma(F64, len(theta) + sum(
        v.size for v in theta.values())) * sum(float(np.sum(np.abs(_h(ref.grads[k]) * dtheta[k]))) for k in theta)
    tol = sum(errs) / (2.0 * H_FD) + H_FD ** 2 / 6.0 * _loss_third_derivative(net, xh, T, dtheta) + g_err \
        + 2 * U * abs(fd)
    assert abs(fd - directional) <= tol, (
        f"{cfg}, T={T}: FD {fd!r} vs <bptt, d> {directional!r}, |diff| {abs(fd - directional):.3e} > tol {tol:.3e}")


# =========================================================================== (3) EP → BPTT
SLOPE_MARGIN = 10.0  # errors within SLOPE_MARGIN × their floor are treated as round-off


def _assert_rate(errors, floors, slope_min, what):
    """For consecutive β and β/10: E(β/10) ≤ max(E(β)·10^−slope_min, SLOPE_MARGIN·floor(β/10)),
    i.e. the log-log slope is at least slope_min while the error is above its round-off floor.
    A floor-level error that rises above the floor at a smaller β fails as well."""
    for i in range(len(errors) - 1):
        allowed = max(errors[i] * 10.0 ** (-slope_min), SLOPE_MARGIN * floors[i + 1])
        assert errors[i + 1] <= allowed, (
            f"{what}: E({i + 1}) = {errors[i + 1]:.3e} > max(E({i})·10^-{slope_min}, {SLOPE_MARGIN}·floor) = "
            f"{allowed:.3e}; errors {errors}, floors {floors}")


def _ep_errors_in_piece(net, x, y, free, piece0, betas, *, window=3):
    """Scan ``betas`` (descending) and stop after ``window`` consecutive β whose nudged fixed points
    s^{±β} lie in the piece of s^0. Returns {β: (errors, in_piece, results)}."""
    out, run = {}, 0
    for beta in betas:
        res = {est: pyeqprop.ep_estimate(net, x, y, beta=beta, T1=T_SETTLE, T2=T_SETTLE, estimator=est,
                                         free_state=free.state) for est in ("one-sided", "symmetric")}
        sym = res["symmetric"]
        inside = all(_same_piece(_piece(net, x, ph.state, y, b), piece0) for ph, b in zip(sym.nudged, sym.betas))
        out[beta] = (res, inside)
        run = run + 1 if inside else 0
        if run == window:
            break
    return out


BETA_MAX = 1e-1  # the first β of every scan (the contraction bound includes its nudge)
BETA_SCAN = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # the scan where no relative floor exists (zero BPTT gradient)


def _beta_decades(rel_floor):
    """β = 1e-1, 1e-2, … while SLOPE_MARGIN · rel_floor(β) < 1 (``rel_floor``: the round-off floor
    relative to the reference, ∝ 1/β).

    How small β must be for the nudged states to stay in the piece of s^0 depends on the example,
    not on the code: a pre-activation at distance δ from a kink that the nudge moves at rate v
    crosses it for β > δ/|v|, and δ is as small as the draw makes it (a drawn 1-conv net had an
    output unit at u = −9.8e-5 below the kink at 0 of half_hard_sigmoid, pushed up at v = 1, so only
    β ≤ 1e-5 stayed inside; the scan used to end at 1e-6 and found two). So the scan has no fixed
    end: it stops where the floor would let a relative error of 100 % pass, below which EP and
    BPTT cannot be told apart. An example with no three consecutive β in the piece above that
    lies within round-off reach of a kink and is rejected (probability O(β_end) for the last β
    scanned, like the finite differences' O(h))."""
    k = 1
    while SLOPE_MARGIN * rel_floor(10.0 ** -k) < 1.0:
        yield 10.0 ** -k
        k += 1


@_examples(4)
@given(cfg=crnn_configs())
def test_ep_tends_to_bptt_as_beta_vanishes(cfg):
    """EP → BPTT as β → 0 (Eq. 4.4): one-sided (Eq. 4.1) with error O(β), symmetric (Eq. 4.2) O(β²).

    Convergence. The weights are scaled so the dynamics contract (bound q ≤ 1/2, nudge
    included), and the free and every nudged phase (T1 = T2 = 50 steps) are asserted to reach
    a residual (Eq. 3.11) ≤ 1e-12: q ≤ 1/2 and r_1 ≤ 1 give r_50 ≤ 2^-49 ≈ 1.8e-15 within a
    piece. A free residual r leaves an error of order r/β in the one-sided estimate, far below
    its O(β) error for every β used here; the symmetric estimate does not use s^0. BPTT runs
    T = T1 steps, which differs from the fixed-point gradient by O(q^T1).

    Locality. The expansion in β holds while s^{±β} stays in the piece of s^0 (same argmaxes,
    same side of every activation kink). A unit whose free pre-activation lies within
    β·|∂u/∂β| of a kink crosses it, and the error then jumps (e.g. mse + hard_sigmoid,
    one-sided 2.5e-1, 3.6e-2, 2.1e-3 for β = 1e-1, 1e-2, 1e-3). That distance is drawn, so β
    runs down the decades 1e-1, 1e-2, … until three consecutive β stay in the piece (usually
    {1e-1, 1e-2, 1e-3}) and the rates are asserted on those three; the scan ends where the
    floor reaches the error scale (:func:`_beta_decades`), and an example with no three β in
    the piece above that is rejected.

    Rates. With g(β) the one-sided estimate and g(0⁺) = ∇BPTT its limit, g(β) − g(0⁺) =
    β a + β² c + O(β³): the symmetric estimate ½[g(β) + g(−β)] keeps the even part, error
    β² c + O(β⁴), and one-sided − symmetric = ½[g(β) − g(−β)] is the odd part, β a + O(β³).
    The one-sided error is their sum, whose slope per decade is 1 only up to O(β): at β = 0.1
    the even part can cancel a third of the odd one (a measured case in
    :func:`test_gdu_per_step_ep_updates_tend_to_bptt`). So the two parts are asserted: the
    symmetric error against BPTT must fall by 10^1.8 and the odd part (relative to ‖∇BPTT‖)
    by 10^0.9 per decade of β while above 10× their float64 floors (:func:`_ep_floor` +
    :func:`_bptt_floor`, resp. the two EP floors, relative to ‖∇BPTT‖: the round-off of
    ∂Φ/∂θ at a settled state, ~γ_d·Σ|terms|, divided by β n); one-sided error ≤ odd part +
    symmetric error then falls as O(β). At β = 1e-3 (when in the
    piece) the symmetric error must be ≤ 1e-4. A zero BPTT gradient (every output unit
    saturated) must give an EP estimate at its round-off floor for every β in the piece.
    """
    net = _contracting_net(cfg, beta_max=BETA_MAX)
    rng = cfg.rng()
    xh, yh = cfg.data(rng)
    x, y = _dev(xh, net), _dev(yh, net)
    free = pyeqprop.settle(net, x, T_SETTLE)
    assert free.residual <= RESIDUAL_MAX, f"{cfg}: free phase residual {free.residual:.2e}"
    ref = pyeqprop.bptt(net, x, y, T=T_SETTLE, per_step=True)
    gnorm = _global_norm(ref.grads)
    bfloor = _bptt_floor(net, xh, _mu_norms(ref))

    known = {}

    def rel_floors(b):
        """Floors of the asserted quantities relative to ‖∇BPTT‖ (gnorm > 0)."""
        if b not in known:
            f_one, f_sym = _ep_floor(net, xh, b, "one-sided"), _ep_floor(net, xh, b, "symmetric")
            known[b] = {"symmetric": (f_sym + bfloor) / gnorm, "odd": (f_one + f_sym) / gnorm}
        return known[b]

    betas = BETA_SCAN if gnorm == 0.0 else _beta_decades(lambda b: max(rel_floors(b).values()))
    scan = _ep_errors_in_piece(net, x, y, free, _piece(net, x, free.state), betas)
    for beta, (res, inside) in scan.items():
        for est, r in res.items():
            for ph, b in zip(r.nudged, r.betas):
                assert ph.residual <= RESIDUAL_MAX, f"{cfg}: {est} phase beta={b} residual {ph.residual:.2e}"
            if gnorm == 0.0 and inside:  # saturated outputs stay saturated: s^β = s^0 up to round-off
                floor = SLOPE_MARGIN * (_ep_floor(net, xh, beta, est) + bfloor)
                assert _global_norm(r.grads) <= floor, f"{cfg}: BPTT gradient is zero but {est} EP is not"
    if gnorm == 0.0:
        return
    betas = list(scan)
    inside = [scan[b][1] for b in betas]
    errors = {est: [_rel_error(scan[b][0][est].grads, ref.grads) for b in betas] for est in ("one-sided", "symmetric")}
    errors["odd"] = [_distance(scan[b][0]["one-sided"].grads, scan[b][0]["symmetric"].grads) / gnorm for b in betas]
    floors = {est: [rel_floors(b)[est] for b in betas] for est in ("symmetric", "odd")}
    note = f"{cfg}: betas {betas}, in piece {inside}, errors {errors}, floors {floors}"
    assume(len(inside) >= 3 and all(inside[-3:]))  # s^0 within round-off reach of a kink (_beta_decades)
    window = slice(len(betas) - 3, len(betas))
    _assert_rate(errors["odd"][window], floors["odd"][window], 0.9, f"odd part (one-sided − symmetric). {note}")
    _assert_rate(errors["symmetric"][window], floors["symmetric"][window], 1.8, f"symmetric. {note}")
    if 1e-3 in scan and scan[1e-3][1]:
        assert errors["symmetric"][betas.index(1e-3)] <= 1e-4, f"symmetric error at beta=1e-3 > 1e-4. {note}"


@_examples(8)
@given(cfg=crnn_configs())
def test_random_sign_is_one_sided_with_the_drawn_sign(cfg):
    """Random-sign EP (Eq. 4.3) is the one-sided estimate (Eq. 4.1) with β replaced by the drawn ±β.

    With a seeded generator the draw is reproducible; the estimate equals the one-sided formula
    −[∂Φ^b/∂θ(s^b) − ∂Φ/∂θ(s^0)]/(b n) evaluated here from ``settle`` and ``dphi_dtheta`` at the
    drawn b (and equals ``ep_gradients(one-sided)`` when b = +β), within twice the EP round-off
    floor (the two computations run the same operations, so they normally agree exactly).
    """
    beta = 1e-2
    net = _contracting_net(cfg, beta_max=beta)
    xh, yh = cfg.data()
    x, y = _dev(xh, net), _dev(yh, net)
    n = cfg.n
    free = pyeqprop.settle(net, x, T_SETTLE)
    r = pyeqprop.ep_estimate(net, x, y, beta=beta, T1=T_SETTLE, T2=T_SETTLE, estimator="random-sign",
                             rng=np.random.default_rng(cfg.seed), free_state=free.state)
    again = pyeqprop.ep_estimate(net, x, y, beta=beta, T1=T_SETTLE, T2=T_SETTLE, estimator="random-sign",
                                 rng=np.random.default_rng(cfg.seed), free_state=free.state)
    (b,) = r.betas
    assert abs(b) == beta and again.betas == r.betas
    nudged = pyeqprop.settle(net, x, T_SETTLE, nudge=net.nudge(x, y, b), state=free.state)
    gb, g0 = net.dphi_dtheta(x, nudged.state, net.nudge(x, y, b)), net.dphi_dtheta(x, free.state)
    manual = {k: -(_h(gb[k]) - _h(g0[k])) / (b * n) for k in gb}
    tol = 2.0 * _ep_floor(net, xh, beta, "one-sided")
    diff = math.sqrt(sum(float(np.sum((_h(r.grads[k]) - manual[k]) ** 2)) for k in manual))
    assert diff <= tol, f"{cfg}: random-sign (b={b}) differs from the one-sided formula by {diff:.3e} > {tol:.3e}"
    if b > 0:
        one = pyeqprop.ep_gradients(net, x, y, beta=beta, T1=T_SETTLE, T2=T_SETTLE, estimator="one-sided")
        diff = math.sqrt(sum(float(np.sum((_h(r.grads[k]) - _h(one[k])) ** 2)) for k in one))
        assert diff <= tol


def test_random_sign_draws_both_signs():
    """Eq. 4.3 draws the sign: over 16 seeded generators both +β and −β occur, and each seed
    reproduces its sign (the probability that 16 fair draws agree is 2^-15)."""
    net = pyeqprop.CRNN("c2m", (1, 4, 4), num_classes=2, dtype="float64", xp="numpy", seed=0, weight_scale=0.3)
    x = _dev(np.random.default_rng(0).standard_normal((1, 1, 4, 4)), net)
    y = _dev(np.array([1]), net)
    signs = [pyeqprop.ep_estimate(net, x, y, beta=0.5, T1=3, T2=3, estimator="random-sign",
                                  rng=np.random.default_rng(seed)).betas[0] for seed in range(16)]
    assert set(signs) == {0.5, -0.5}
    assert signs == [pyeqprop.ep_estimate(net, x, y, beta=0.5, T1=3, T2=3, estimator="random-sign",
                                          rng=np.random.default_rng(seed)).betas[0] for seed in range(16)]


# =========================================================================== (4) GDU
def _gdu_deltas(net, x, y, free_state, b, K, names, piece0):
    """ΔEP_θ(b, t)/n and ΔEP_s(b, t)/n for t < K (Eq. 4.5), stepping the nudged dynamics one step
    at a time from s^0, and whether every step's drive stayed in the piece of s^0 and the
    argmaxes of ∂Φ/∂θ(s^b_K) are those of s^0."""
    n = x.shape[0]
    s = list(free_state)
    G = net.dphi_dtheta(x, s)
    d_theta, d_s, inside = [], [], True
    for _ in range(K):
        inside = inside and _same_piece(_piece(net, x, s, y, b), piece0)
        s_new = net.step(x, s, net.nudge(x, y, b))
        G_new = net.dphi_dtheta(x, s_new)
        d_theta.append({k: (_h(G_new[k]) - _h(G[k])) / (b * n) for k in names})
        d_s.append([(_h(a) - _h(c)) / (b * n) for a, c in zip(s_new, s)])
        s, G = s_new, G_new
    inside = inside and _same_piece(([], _piece(net, x, s)[1]), ([], piece0[1]))  # ρ′ at s_K is not used
    return d_theta, d_s, inside


def _stack_theta(steps, names):
    return np.concatenate([np.ravel(step[k]) for step in steps for k in names])


def _stack_states(steps):
    return np.concatenate([np.ravel(a) for step in steps for a in step])


@_examples(4)
@given(cfg=crnn_configs())
def test_gdu_per_step_ep_updates_tend_to_bptt(cfg):
    """GDU (Eq. 4.5): from a converged free state, ΔEP_θ(β, t) = (1/β)[∂Φ/∂θ(s^β_{t+1}) − ∂Φ/∂θ(s^β_t)]
    and ΔEP_s(β, t) = (s^β_{t+1} − s^β_t)/β tend to −∇BPTT_θ(t) and −∇BPTT_s(t) = −μ_{T−1−t}
    (Eq. 5.5, ``bptt(per_step=True)`` with T = T1) for every t < K = 6, as β → 0.

    EP deltas are divided by n because BPTT differentiates the batch mean (Eq. 5.1). The nudged
    phase is stepped with ``net.step`` one step at a time. Convergence, locality and rates as
    in :func:`test_ep_tends_to_bptt_as_beta_vanishes`: β runs down the decades from 1e-1
    (:func:`_beta_decades`, to where the θ floor reaches the error scale) until three
    consecutive β keep every nudged step's drive in the piece of s^0 (an example with none is
    rejected: s^0 lies within round-off reach of a kink); on those, the relative error of the
    symmetric ½[ΔEP(β) + ΔEP(−β)] (global L2 over t < K and all network parameters, resp. all
    neurons) must fall by 10^1.8 per decade, and the odd part ½[ΔEP(β) − ΔEP(−β)] = one-sided
    − symmetric (relative to the same norm) by 10^0.9, while above 10× the floor: per step, two
    ∂Φ/∂θ evaluations (resp. states) with round-off and a free residual r, divided by β n,
    over √K steps, plus the BPTT round-off. The one-sided error itself (odd + even part) need
    not show slope 0.9 from β = 0.1: on a drawn 3-conv softmax net (config seed 2733) the θ odd
    part was 1.628e-3, 1.626e-4, 1.626e-5 (slope 1.000) and the symmetric error 4.94e-4, 4.94e-6,
    4.94e-8 (slope 2.000) at β = 1e-1, 1e-2, 1e-3, but partly cancelling, the one-sided error
    1.244e-3, 1.585e-4, 1.622e-5 has slope 0.895 over the first decade.
    """
    net = _contracting_net(cfg, beta_max=BETA_MAX)
    xh, yh = cfg.data()
    x, y = _dev(xh, net), _dev(yh, net)
    n = cfg.n
    free = pyeqprop.settle(net, x, T_SETTLE)
    assert free.residual <= RESIDUAL_MAX, f"{cfg}: free phase residual {free.residual:.2e}"
    ref = pyeqprop.bptt(net, x, y, T=T_SETTLE, per_step=True)
    names = net.network_param_names()
    b_theta = -_stack_theta([{k: _h(ref.theta_steps[t][k]) for k in names} for t in range(K_GDU)], names)
    b_s = -_stack_states([[_h(m) for m in ref.state_steps[t]] for t in range(K_GDU)])
    nt, ns = float(np.linalg.norm(b_theta)), float(np.linalg.norm(b_s))
    assume(nt > 0.0)  # every output unit saturated: nothing to compare (see the EP test for that case)
    bfloor, eps_mu = _bptt_floor(net, xh, _mu_norms(ref), per_step_mu=True)
    piece0 = _piece(net, x, free.state)
    units = math.sqrt(n * sum(int(np.prod(sh)) for sh in net.arch.state_shapes))
    floors = {}

    def floor(beta):
        """(θ floor, state floor) at β, relative to the BPTT reference."""
        if beta not in floors:
            e_s = max(_state_error(net, xh, beta), _state_error(net, xh, -beta)) + free.residual * units
            f_theta = (math.sqrt(K_GDU) * 2.0 * _dphi_dtheta_error(net, xh, e_s) / (beta * n) + bfloor) / nt
            f_s = (math.sqrt(K_GDU) * 2.0 * e_s / (beta * n) + math.sqrt(sum(e * e for e in eps_mu[:K_GDU]))) / ns
            floors[beta] = (f_theta, f_s)
        return floors[beta]

    rows, run = [], 0
    for beta in _beta_decades(lambda b: floor(b)[0]):
        plus = _gdu_deltas(net, x, y, free.state, beta, K_GDU, names, piece0)
        minus = _gdu_deltas(net, x, y, free.state, -beta, K_GDU, names, piece0)
        f_theta, f_s = floor(beta)
        tp, tm = _stack_theta(plus[0], names), _stack_theta(minus[0], names)
        sp, sm = _stack_states(plus[1]), _stack_states(minus[1])
        rows.append((beta, plus[2] and minus[2],
                     {"one-sided": float(np.linalg.norm(tp - b_theta)) / nt,
                      "symmetric": float(np.linalg.norm(0.5 * (tp + tm) - b_theta)) / nt,
                      "odd": float(np.linalg.norm(0.5 * (tp - tm))) / nt},
                     {"one-sided": float(np.linalg.norm(sp - b_s)) / ns,
                      "symmetric": float(np.linalg.norm(0.5 * (sp + sm) - b_s)) / ns,
                      "odd": float(np.linalg.norm(0.5 * (sp - sm))) / ns}, f_theta, f_s))
        run = run + 1 if rows[-1][1] else 0
        if run == 3:
            break
    note = f"{cfg}: rows (beta, in piece, theta errors, state errors, floors) {rows}"
    assume(run == 3)  # s^0 within round-off reach of a kink (_beta_decades)
    window = rows[-3:]
    for est, slope in (("odd", 0.9), ("symmetric", 1.8)):  # one-sided = odd + even part (see the EP test)
        _assert_rate([r[2][est] for r in window], [r[4] for r in window], slope, f"theta, {est}. {note}")
        if ns > 0.0:
            _assert_rate([r[3][est] for r in window], [r[5] for r in window], slope, f"states, {est}. {note}")


# =========================================================================== (5) backend parity
@_examples(8)
@given(cfg=crnn_configs(max_convs=2), beta=st.sampled_from((0.0, 0.5)))
def test_backend_parity(xp, cfg, beta):
    """The bodies of (1)-(3) give the same numbers under every backend (SPEC.md §3-5).

    Φ^β (Eqs. 3.2, 3.6), ∂Φ^β/∂s (Eq. 3.7), ∂Φ^β/∂θ (Eq. 3.9), the symmetric EP estimate
    (Eq. 4.2, β = 1e-2) and BPTT (Eqs. 5.1-5.4) are computed on the same host-drawn inputs by a
    network on the backend under test and one on NumPy. Each pair may differ by twice the
    rounding bound of one computation (their reductions may run in different orders):
    2γ_d·Σ|terms| elementwise for Φ and ∂Φ/∂s, twice the norm bounds of ∂Φ/∂θ, of the EP
    floor and of the BPTT floor for the rest (global L2).
    """
    nets = [_contracting_net(cfg, beta_max=0.5, xp=name) for name in (xp, "numpy")]
    rng = cfg.rng()
    xh, yh = cfg.data(rng)
    s = [rng.random(shape) for shape in nets[0].state_shapes(cfg.n)]
    out = []
    for net in nets:
        x, y = _dev(xh, net), _dev(yh, net)
        yy = y if beta != 0.0 else None
        sd = _devs(s, net)
        nudge = net.nudge(x, yy, beta)
        ref = pyeqprop.bptt(net, x, y, T=T_SETTLE, per_step=True)
        out.append(dict(
            phi=_h(net.phi(x, sd, nudge)), ds=[_h(a) for a in net.dphi_ds(x, sd, nudge)],
            dt={k: _h(v) for k, v in net.dphi_dtheta(x, sd, nudge).items()},
            ep={k: _h(v) for k, v in pyeqprop.ep_gradients(net, x, y, beta=1e-2, T1=T_SETTLE, T2=T_SETTLE,
                                                           estimator="symmetric").items()},
            bptt={k: _h(v) for k, v in ref.grads.items()}, mu=_mu_norms(ref)))
    a, b = out
    net = nets[1]
    g = gamma(F64, _depth(net, cfg.n))
    P = _abs_params(net)
    A = _phi_abs(net, P, xh, s) + abs(beta) * _cost_abs(net, P, s, yh)
    assert np.all(np.abs(a["phi"] - b["phi"]) <= 2 * g * A), f"{xp.__name__} phi: {a['phi']} vs {b['phi']}"
    _, u_abs = _drive_abs(net, P, xh, s)
    if beta != 0.0:
        if net.readout == "mse":
            u_abs[-1] = u_abs[-1] + abs(beta) * (np.abs(s[-1]) + 1.0)
        else:
            W = P[f"{net.arch.readout.name}.weight"]
            u_abs[-1] = u_abs[-1] + abs(beta) * (np.ones((cfg.n, W.shape[0])) @ W).reshape(s[-1].shape)
    for l, (ga, gb, ua) in enumerate(zip(a["ds"], b["ds"], u_abs)):
        assert np.all(np.abs(ga - gb) <= 2 * g * ua), f"{xp.__name__} dphi_ds layer {l + 1}"

    def dist(p, q):
        return math.sqrt(sum(float(np.sum((p[k] - q[k]) ** 2)) for k in q))

    # cost-only parameters enter Σ_batch ∂Φ^β/∂θ as −β n·(1/n)∂C/∂θ
    bound_dt = 2 * (_dphi_dtheta_error(net, xh, 0.0) + abs(beta) * cfg.n * _cost_param_error(net, xh, 0.0))
    assert dist(a["dt"], b["dt"]) <= bound_dt, f"{xp.__name__} dphi_dtheta"
    assert dist(a["ep"], b["ep"]) <= 2 * _ep_floor(net, xh, 1e-2, "symmetric"), f"{xp.__name__} ep_gradients"
    assert dist(a["bptt"], b["bptt"]) <= 2 * _bptt_floor(net, xh, b["mu"]), f"{xp.__name__} bptt_gradients"
