"""Rounding-error propagation through the CRNN and the teacher, from absolute-value computations.

The model of one sum is :mod:`pyeqprop.testing.rounding`: a computed sum differs from the exact
one by at most γ_d·S, S its Σ|terms|, i.e. the same computation run on absolute values (|inputs|,
|θ|, the argmaxes and activation slopes frozen at those of the reference). Its rounding depth d
is the longest reduction plus the elementwise operations on its path; the reductions of a layer
are :func:`fan_in` (bottom-up), :func:`fan_out` (top-down) and :func:`conv_positions` (per sample,
of a weight gradient).

Computations that chain stages (settling, EP, BPTT, the teacher's passes) propagate the bound in
the max norm within one *piece* (fixed argmaxes, fixed sides of the activation kinks) to first
order: a state error e_t grows by at most q_t = ρ'_max·(‖H_t‖_∞ + |β|κ_∞) per step (‖H_t‖_∞ the
largest row sum of |∂²Φ/∂s²| at the step's argmaxes, κ_∞ that of the cost Hessian) plus
ρ'_max·γ·S_u(t), and bilinear quantities (∂Φ/∂θ, BPTT's step terms) add their abs-term scale
times γ plus their Lipschitz constant (again an abs computation, with ones in place of the
perturbed factor) times the factor's error. :class:`CRNNBounds` does this for a CRNN and
:func:`teacher_forward_bounds` for the teacher's forward pass (Eq. 7.1); both check the piece
margins (:func:`~pyeqprop.testing.rounding.window_gaps`,
:func:`~pyeqprop.testing.rounding.kink_margin`) of every max pool and kink they pass.

Everything here works on float64 NumPy arrays. The reference tests bound in the 2-norm instead
(``reference_tests/test_crnn_properties.py``); they share :func:`fan_in`, :func:`fan_out` and
:func:`conv_positions`.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..model.crnn import Nudge
from ..ops.softmax import log_softmax, onehot
from .rounding import GAMMA, kink_margin, window_gaps

__all__ = ["fan_in", "fan_out", "conv_positions", "amax", "softmax_rel_error", "CRNNBounds",
           "teacher_forward_bounds"]


def fan_in(layer) -> int:
    """Terms of one output of the layer's bottom-up map: c·k² (conv), in_features (fc)."""
    return layer.in_channels * layer.kernel ** 2 if layer.kind == "conv" else layer.in_features


def fan_out(layer) -> int:
    """Terms of one output of the layer's top-down (transposed) map: o·k² (conv), out_features (fc)."""
    return layer.out_channels * layer.kernel ** 2 if layer.kind == "conv" else layer.out_features


def conv_positions(layer) -> int:
    """Positions of the convolution output per sample (h_conv·w_conv; 1 for fc): the terms, per
    sample, of a weight gradient summed over positions."""
    return layer.conv_hw[0] * layer.conv_hw[1] if layer.kind == "conv" else 1


def amax(a) -> float:
    """max |a| (0 for an empty array)."""
    a = np.asarray(a)
    return float(np.max(np.abs(a))) if a.size else 0.0


def softmax_rel_error(h_abs_max, K):
    """Bound r on |Δp_k| / p_k for p = softmax(h) with |Δh| ≤ γ·h_abs.

    log p_k = h_k − lse(h) moves by at most 2 max|Δh| plus the roundings of exp, the K-term
    sum and log.

    Parameters
    ----------
    h_abs_max : float
        max_k of the Σ|terms| of the logits h.
    K : int
        Number of classes.

    Returns
    -------
    float
    """
    return GAMMA * (2.0 * h_abs_max + math.log(K) + 3.0)


class CRNNBounds:
    """Max-norm rounding-error propagation through one CRNN at frozen argmaxes (module docstring).

    Parameters
    ----------
    net : pyeqprop.model.crnn.CRNN
        A float64 NumPy network.
    x : numpy.ndarray
        Inputs (n, …).
    y : numpy.ndarray or None
        int64 labels (needed for the cost terms).

    Attributes
    ----------
    P : dict
        |θ| per parameter name.
    rho : float
        max ρ′ of the activation.
    drive_depth, grad_depth, phi_depth : int
        Rounding depths of one drive evaluation, of a batch-summed weight gradient and of Φ
        per sample.
    min_gap, zero_ties, min_kink
        Piece margins seen so far (:meth:`conditioning`).
    """

    def __init__(self, net, x, y):
        self.net = net
        self.x = x
        self.y = y
        self.n = x.shape[0]
        self.P = {k: np.abs(v) for k, v in net.params.items()}
        self.rho = net.act.max_slope
        self.kinks = net.act.kinks
        self.onehot = None if y is None else onehot(y, net.num_classes, np.float64)
        self.shapes = net.state_shapes(self.n)
        self.min_gap = math.inf  # smallest argmax gap relative to its error bound
        self.zero_ties = 0
        self.min_kink = math.inf  # smallest kink distance relative to its error bound
        L = len(net.arch.layers)
        self.L = L
        # depth of one drive evaluation: bottom-up + top-down reductions and a few elementwise ops
        red = []
        for l, ly in enumerate(net.arch.layers):
            r = fan_in(ly)
            if l + 1 < L:
                r += fan_out(net.arch.layers[l + 1])
            red.append(r)
        self.drive_depth = max(red) + 8
        # Σ_batch of a weight gradient: n·h_conv·w_conv terms (conv), n (fc)
        self.grad_depth = max(self.n * conv_positions(ly) for ly in net.arch.layers) + 4
        # Φ per sample: one drive term per unit, summed over all units
        self.phi_depth = self.drive_depth + sum(int(np.prod(sh[1:])) for sh in self.shapes) + L

    # ---------------------------------------------------------------- abs layer maps (frozen argmax)
    def _select(self, ly, z, idx):
        if ly.pool == "max":
            return ops.max_pool2d_select(z, idx)
        if ly.pool == "avg":
            return ops.avg_pool2d(z)
        return z

    def _unpool(self, ly, g, idx):
        if ly.pool == "max":
            return ops.max_unpool2d(g, idx, output_size=ly.conv_hw)
        if ly.pool == "avg":
            return ops.avg_unpool2d(g, output_size=ly.conv_hw)
        return g

    def bottom_up_abs(self, l, a, idx, bias=True):
        ly = self.net.arch.layers[l]
        W = self.P[f"{ly.name}.weight"]
        b = self.P[f"{ly.name}.bias"] if bias else None
        a = np.abs(a)
        if ly.kind == "conv":
            return self._select(ly, ops.conv2d(a, W, b, padding=ly.padding), idx)
        return ops.linear(a.reshape(a.shape[0], -1), W, b)

    def top_down_abs(self, l, s_above, idx, below_shape):
        """|T_{l−1}|-scale: feedback of layer l (≥ 1) into layer l − 1."""
        ly = self.net.arch.layers[l]
        W = self.P[f"{ly.name}.weight"]
        s_above = np.abs(s_above)
        if ly.kind == "conv":
            return ops.conv2d_transpose(self._unpool(ly, s_above, idx), W, padding=ly.padding,
                                        output_size=below_shape[2:])
        return (s_above @ W).reshape(below_shape)

    def cost_state_abs(self, s):
        """Σ|terms| of ∂C/∂s_L (other layers: none): |s_L| + onehot (mse), (p + onehot)|W_out| (softmax)."""
        net = self.net
        if net.readout == "mse":
            return np.abs(s[-1]) + self.onehot
        ro = net.arch.readout
        p = np.exp(log_softmax(net.logits(s)))
        return ((p + self.onehot) @ self.P[f"{ro.name}.weight"]).reshape(s[-1].shape)

    def kappa(self):
        """κ_∞ ≥ ‖∂²C/∂s_L²‖_∞: 1 (mse); ½ ‖W_outᵀ‖_∞ ‖W_out‖_∞ (softmax, as ‖diag p − p pᵀ‖_∞ ≤ ½)."""
        if self.net.readout == "mse":
            return 1.0
        W = self.P[f"{self.net.arch.readout.name}.weight"]
        return 0.5 * float(W.sum(axis=0).max()) * float(W.sum(axis=1).max())

    def drive_abs(self, s, idx, beta):
        """Σ|terms| of u_l = ∂Φ^β/∂s_l (Eq. 3.7) for every layer."""
        out = []
        for l in range(self.L):
            below = self.x if l == 0 else s[l - 1]
            t = self.bottom_up_abs(l, below, idx[l])
            if l + 1 < self.L:
                t = t + self.top_down_abs(l + 1, s[l + 1], idx[l + 1], self.shapes[l])
            out.append(t)
        if beta != 0.0:
            out[-1] = out[-1] + abs(beta) * self.cost_state_abs(s)
        return out

    def hessian_abs(self, m, idx):
        """|H| m (Eq. 5.3) at frozen argmaxes: bias-free, input-free drive of |m|."""
        out = []
        for l in range(self.L):
            t = np.zeros(self.shapes[l])
            if l > 0:
                t = t + self.bottom_up_abs(l, m[l - 1], idx[l], bias=False)
            if l + 1 < self.L:
                t = t + self.top_down_abs(l + 1, m[l + 1], idx[l + 1], self.shapes[l])
            out.append(t)
        return out

    def row_sum(self, idx):
        """‖H‖_∞ at these argmaxes: the largest entry of |H|·1."""
        return max(amax(t) for t in self.hessian_abs([np.ones(s) for s in self.shapes], idx))

    def bilinear_abs(self, lowers, uppers, idx, bias=True):
        """Σ_batch |∂⟨B_l(lower_l), upper_l⟩/∂θ_l| term sums (Eq. 3.9) per parameter.

        A layer whose lower or upper factor is None is skipped."""
        out = {}
        for l, ly in enumerate(self.net.arch.layers):
            lo, up = lowers[l], uppers[l]
            if lo is None or up is None:
                continue
            lo, up = np.abs(lo), np.abs(up)
            kw, kb = f"{ly.name}.weight", f"{ly.name}.bias"
            if ly.kind == "conv":
                g = self._unpool(ly, up, idx[l])
                dW = ops.conv2d_weight_grad(lo, g, kernel_size=ly.kernel, padding=ly.padding)
                db = g.sum(axis=(0, 2, 3))
            else:
                dW = up.T @ lo.reshape(lo.shape[0], -1)
                db = up.sum(axis=0)
            out[kw] = out.get(kw, 0.0) + dW
            if bias:
                out[kb] = out.get(kb, 0.0) + db
        return out

    # ---------------------------------------------------------------- pieces
    def check_argmax(self, l, below, e_below):
        """Argmax margin of layer l's max pool for the conv output computed from ``below`` (error e_below)."""
        ly = self.net.arch.layers[l]
        if not (ly.kind == "conv" and ly.pool == "max"):
            return
        W, b = self.net.params[f"{ly.name}.weight"], self.net.params[f"{ly.name}.bias"]
        z = ops.conv2d(below, W, b, padding=ly.padding)
        patch = ops.conv2d(np.abs(below), self.P[f"{ly.name}.weight"], None, padding=ly.padding)
        row = float(self.P[f"{ly.name}.weight"].sum(axis=(1, 2, 3)).max())
        err = GAMMA * (patch + self.P[f"{ly.name}.bias"][None, :, None, None]) + row * e_below
        ratio, ties = window_gaps(z, err, patch)
        self.min_gap = min(self.min_gap, ratio)
        self.zero_ties += ties

    def check_kinks(self, u, err):
        """Every pre-activation is farther from a kink than its error bound (needed where ρ' is used)."""
        for a, e in zip(u, err):
            self.min_kink = min(self.min_kink, kink_margin(a, e, self.kinks))

    def conditioning(self) -> dict:
        return {"min_argmax_gap_over_bound": None if math.isinf(self.min_gap) else self.min_gap,
                "exact_zero_patch_ties": self.zero_ties,
                "min_kink_distance_over_bound": None if math.isinf(self.min_kink) else self.min_kink}

    # ---------------------------------------------------------------- trajectories
    def run(self, T, beta, ctx, s0=None, e0=0.0, kinks=False):
        """T steps of Eq. 3.8 from s0 (zeros), with the max-norm error bound e_t of the state.

        Returns (states s_0 … s_T, drives [(u_t, idx_t)], errors e_0 … e_T, u-errors ε_u,t)."""
        net = self.net
        s = net.init_state(self.n) if s0 is None else list(s0)
        kap = self.kappa() if beta != 0.0 else 0.0
        states, drives, errs, uerrs = [s], [], [e0], []
        e = e0
        self.drive_scale = 0.0
        nudge = Nudge(float(beta), ctx, net.input_drive(self.x))
        for _ in range(int(T)):
            d = net.drive(self.x, s, nudge)
            for l in range(self.L):
                self.check_argmax(l, self.x if l == 0 else s[l - 1], 0.0 if l == 0 else e)
            uabs = self.drive_abs(s, d.indices, beta)
            self.drive_scale = max(self.drive_scale, max(amax(a) for a in uabs))
            lip = self.row_sum(d.indices) + abs(beta) * kap
            ue = [GAMMA * a + lip * e for a in uabs]
            if kinks:
                self.check_kinks(d.u, ue)
            s = [net.act.fn(u) for u in d.u]
            e = self.rho * max(amax(a) for a in ue)
            states.append(s)
            drives.append((d.u, d.indices))
            errs.append(e)
            uerrs.append(ue)
        return states, drives, errs, uerrs

    def indices(self, s):
        return [self.net.layers[l].argmax(self.net.params, self.x if l == 0 else s[l - 1]) for l in range(self.L)]

    def lowers(self, s):
        return [self.x] + list(s[:-1])

    def dphi_abs(self, s, idx):
        """Σ|terms| of Σ_batch ∂Φ/∂θ at s (network parameters)."""
        return self.bilinear_abs(self.lowers(s), s, idx)

    def dphi_lip(self, s, idx):
        """Lipschitz constant (per parameter entry, max-norm state perturbation) of Σ_batch ∂Φ/∂θ at s."""
        ones = [np.ones(sh) for sh in self.shapes]
        a = self.bilinear_abs([None] + ones[:-1], s, idx)  # perturbation of the lower state (never of x)
        b = self.bilinear_abs(self.lowers(s), ones, idx)  # perturbation of the upper state
        return {k: a.get(k, 0.0) + b[k] for k in b}

    def cost_param_bound(self, s, e):
        """(Σ|terms|, error bound) of Σ_batch ∂C/∂θ for the softmax readout at s with state error e.

        G = Σ_n (p_n − y_n) vec(s_n)ᵀ: |δG_kj| ≤ Σ_n (‖δp_n‖₁ |s_nj| + |p − y|_nk e), with
        ‖δp_n‖₁ ≤ 2‖δz_n‖_∞ ≤ 2(R e + γ S_z,n), R = ‖W_out‖_∞ (the softmax Jacobian has ∞→1 norm ≤ 2)."""
        net = self.net
        if net.readout != "softmax":
            return {}, {}
        ro = net.arch.readout
        W = self.P[f"{ro.name}.weight"]
        flat = np.abs(s[-1]).reshape(self.n, -1)  # (n, D)
        z_abs = flat @ W.T + self.P[f"{ro.name}.bias"]  # (n, K)
        p = np.exp(log_softmax(net.logits(s)))
        d = np.abs(p - self.onehot)  # (n, K)
        dp = 2.0 * (float(W.sum(axis=1).max()) * e + GAMMA * z_abs.max(axis=1))  # (n,)
        absW = (p + self.onehot).T @ flat  # (K, D)
        absb = (p + self.onehot).sum(axis=0)
        errW = (dp @ flat)[None, :] + e * d.sum(axis=0)[:, None]  # (K, D)
        errb = np.full(absb.shape, float(dp.sum()))
        return ({f"{ro.name}.weight": absW, f"{ro.name}.bias": absb},
                {f"{ro.name}.weight": errW, f"{ro.name}.bias": errb})

    def check_state(self, s, e=0.0):
        """Argmax margins of the drive at a given state (error e)."""
        for l in range(self.L):
            self.check_argmax(l, self.x if l == 0 else s[l - 1], 0.0 if l == 0 else e)


def teacher_forward_bounds(t, x):
    """Max-norm error bounds of the teacher's forward pass (Eq. 7.1) and its piece margins.

    Parameters
    ----------
    t : pyeqprop.model.teacher.Teacher
        A float64 NumPy teacher.
    x : numpy.ndarray
        Inputs (n, …).

    Returns
    -------
    e_a : list of float
        Bounds of a_0 = x (0), a_1, …, a_L.
    e_z : float
        Bound of the logits.
    notes : dict
        The margins (``min_argmax_gap_over_bound``, ``exact_zero_patch_ties``,
        ``min_kink_distance_over_bound``), the bounds and the rounding ``depth``.
    """
    P = {k: np.abs(v) for k, v in t.params.items()}
    rho = t.act.max_slope
    kinks = t.act.kinks
    n = x.shape[0]
    logits, cache = t.forward(x)
    min_gap, min_kink, zero_ties = math.inf, math.inf, 0
    e_a = [0.0]  # error of a_0 = x, a_1, …
    depth = 0
    for l, ly in enumerate(t.arch.layers):
        a = x if l == 0 else cache.acts[l - 1]
        W, b = P[f"{ly.name}.weight"], P[f"{ly.name}.bias"]
        if ly.kind == "conv":
            z_abs = ops.conv2d(np.abs(a), W, b, padding=ly.padding)
            row = float(W.sum(axis=(1, 2, 3)).max())
            if ly.pool == "max":
                z = ops.conv2d(a, t.params[f"{ly.name}.weight"], t.params[f"{ly.name}.bias"], padding=ly.padding)
                err = GAMMA * z_abs + row * e_a[-1]
                patch = ops.conv2d(np.abs(a), W, None, padding=ly.padding)
                g, ties = window_gaps(z, err, patch)
                min_gap, zero_ties = min(min_gap, g), zero_ties + ties
                p_abs = ops.max_pool2d_select(z_abs, cache.indices[l])
            elif ly.pool == "avg":
                p_abs = ops.avg_pool2d(z_abs)
            else:
                p_abs = z_abs
            depth = max(depth, fan_in(ly) + 8, n * conv_positions(ly) + 8)
        else:
            p_abs = np.abs(a).reshape(n, -1) @ W.T + b
            row = float(W.sum(axis=1).max())
            depth = max(depth, fan_in(ly) + 8)
        e_p = GAMMA * p_abs + row * e_a[-1]
        min_kink = min(min_kink, kink_margin(cache.pre[l], e_p, kinks, f"teacher layer {ly.name}"))
        e_a.append(rho * amax(e_p))
    ro = t.readout
    Wo, bo = P[f"{ro.name}.weight"], P[f"{ro.name}.bias"]
    z_abs = np.abs(cache.acts[-1].reshape(n, -1)) @ Wo.T + bo
    e_z = GAMMA * amax(z_abs) + float(Wo.sum(axis=1).max()) * e_a[-1]
    notes = {"min_argmax_gap_over_bound": None if math.isinf(min_gap) else min_gap,
             "exact_zero_patch_ties": zero_ties, "min_kink_distance_over_bound": min_kink,
             "forward_error_bounds": e_a[1:], "logit_error_bound": e_z, "depth": depth}
    return e_a, e_z, notes
