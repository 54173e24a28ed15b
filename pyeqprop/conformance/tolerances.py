"""Tolerances of the conformance cases, from the rounding-error model.

Tolerance rule
--------------
For an output array E computed by a port as A, the case passes when

    max |A − E| ≤ atol,   atol = γ · S · (amplification),   rtol = 0,

with γ = 128·eps = 256u (u = eps/2 the unit roundoff of float64). S is the largest
Σ|terms| of any element: the same computation run on absolute values (|inputs|, |θ|, the
argmaxes and activation slopes frozen at those of the reference). Both pyeqprop and the
port compute the same exact sum; each differs from it by at most γ_d·S, with γ_d =
min(d·u/(1 − d·u), exp(λ√d·u + …) − 1) for rounding depth d (Higham 2002, Lemma 3.1;
Higham & Mary 2019, λ = 8, as in :mod:`pyeqprop.testing.rounding`): γ_d = d·u for d ≤ 64 and
≈ 8√d·u beyond, so γ_d ≤ 128u for every d ≤ 256 and 2γ_d ≤ γ. The generator estimates each
case's depth (longest reduction plus the elementwise operations on its path) and asserts it is
at most 256 (:func:`~pyeqprop.testing.rounding.check_depth`).
Outputs that are exact selections (max pooling, activations) have depth 0 and atol 0;
integer outputs (pooling indices) must match exactly.

:func:`tol_entry`, :func:`bound_entry` and :func:`exact_entry` make the manifest's tolerance entries (atol,
rtol, scale, depth, amplification). Computations that chain stages propagate the bound in the
max norm within one piece (:mod:`pyeqprop.testing.propagation`); :func:`ep_tolerance`,
:func:`bptt_tolerance` and :func:`teacher_tolerance` assemble it for EP, BPTT and the teacher.

The bound holds only within a piece, so every model case is checked at generation: each
max-pool window's best value exceeds the runner-up by more than TIE_SAFETY (2) times twice
its error bound (two computations within the bound of the exact values agree on the argmax
when the gap exceeds twice the bound); exact ties are allowed only where every tied
candidate reads an all-zero patch, so it equals the bias exactly in any direct summation,
and the first maximum wins. Where ρ' is used (BPTT, the teacher), every pre-activation is
more than TIE_SAFETY times its error bound away from a kink. The margins (gap over twice
the bound, kink distance over the bound) are stored under ``notes``.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..ops.softmax import log_softmax, onehot
from ..testing.propagation import CRNNBounds, amax, teacher_forward_bounds
from ..testing.rounding import GAMMA, check_depth

__all__ = ["tol_entry", "bound_entry", "exact_entry", "ep_tolerance", "bptt_tolerance", "teacher_tolerance"]


def tol_entry(scale, depth, amplification=1.0, extra=0.0) -> dict:
    """Tolerance entry: atol = γ·scale·amplification + extra (0 for depth 0: an exact result).

    Parameters
    ----------
    scale : float
        S, the largest Σ|terms| of an element.
    depth : int
        Rounding depth (asserted ≤ MAX_DEPTH).
    amplification : float, optional
        Factor on γ·S.
    extra : float, optional
        A propagated error (Lipschitz constant × error of a factor). The stored
        ``amplification`` is atol / (γ·scale), so it includes it.

    Returns
    -------
    dict
        ``atol``, ``rtol`` (0), ``scale``, ``depth``, ``amplification``.
    """
    check_depth(depth)
    scale = float(scale)
    atol = 0.0 if depth == 0 else GAMMA * scale * float(amplification) + float(extra)
    amp = atol / (GAMMA * scale) if depth and scale else 1.0  # the propagated part included
    return {"atol": atol, "rtol": 0.0, "scale": scale, "depth": int(depth), "amplification": amp}


def bound_entry(atol, scale, depth) -> dict:
    """Tolerance entry for a propagated bound ``atol`` (already a multiple of γ).

    Parameters
    ----------
    atol : float
        The bound.
    scale : float
        The scale it came from.
    depth : int
        Rounding depth (asserted ≤ MAX_DEPTH).

    Returns
    -------
    dict
        As :func:`tol_entry`.
    """
    check_depth(depth)
    return {"atol": float(atol), "rtol": 0.0, "scale": float(scale), "depth": int(depth),
            "amplification": float(atol) / (GAMMA * float(scale)) if scale else 1.0}


def exact_entry() -> dict:
    """Tolerance entry of an exact output (selections, activations, integers): atol 0, depth 0."""
    return {"atol": 0.0, "rtol": 0.0, "scale": 0.0, "depth": 0, "amplification": 1.0}


def ep_tolerance(net, x, y, ctx, est, res, *, beta, T1, T2):
    """Per-parameter atol of an EP estimate (Eqs. 4.1-4.3): γ·abs terms + Lipschitz × state error, / (|β| n).

    Parameters
    ----------
    net : pyeqprop.model.crnn.CRNN
    x, y : numpy.ndarray
        Inputs and labels.
    ctx
        ``net.prepare(x, y)``.
    est : str
        ``"one-sided"``, ``"symmetric"`` or ``"random-sign"``.
    res
        The estimate (``ep_estimate``): its free state and nudged β are used.
    beta : float
        |β| of the estimate.
    T1, T2 : int
        Free and nudged steps.

    Returns
    -------
    tol : dict
        ``grads/NAME`` → tolerance entry.
    cond : dict
        Piece margins and the state error bounds (manifest notes).
    """
    n = x.shape[0]
    bd = CRNNBounds(net, x, y)
    free, _, e_free, _ = bd.run(T1, 0.0, None)
    s0, e0 = free[-1], e_free[-1]
    for a, b in zip(s0, res.free.state):
        assert np.array_equal(a, b)
    betas = res.betas
    ends = []
    for b in betas:
        st, _, eb, _ = bd.run(T2, b, ctx, s0=s0, e0=e0)
        ends.append((b, st[-1], eb[-1]))
    if est == "symmetric":
        points = [(ends[0][1], ends[0][2]), (ends[1][1], ends[1][2])]
        denom = 2.0 * beta * n
        cost_points = [(ends[0][1], ends[0][2]), (ends[1][1], ends[1][2])]
        cost_denom = 2.0 * n
    else:
        points = [(ends[0][1], ends[0][2]), (s0, e0)]
        denom = beta * n
        cost_points = [(ends[0][1], ends[0][2])]
        cost_denom = float(n)
    tol = {}
    absum, errsum = {}, {}
    for s, e in points:
        idx = bd.indices(s)
        A = bd.dphi_abs(s, idx)
        Lp = bd.dphi_lip(s, idx)
        for k in A:
            absum[k] = absum.get(k, 0.0) + A[k]
            errsum[k] = errsum.get(k, 0.0) + Lp[k] * e
    for s, e in cost_points:
        A, E = bd.cost_param_bound(s, e)
        for k in A:
            absum[k] = absum.get(k, 0.0) + A[k] * (denom / cost_denom)
            errsum[k] = errsum.get(k, 0.0) + E[k] * (denom / cost_denom)
    for k in net.params:
        S = amax(absum[k]) / denom
        extra = amax(errsum[k]) / denom
        tol[f"grads/{k}"] = tol_entry(S, bd.grad_depth + 4, 1.0, extra)
    cond = bd.conditioning()
    cond.update({"free_state_error_bound": e0, "nudged_state_error_bound": max(t[2] for t in ends),
                 "betas": [float(b) for b in betas]})
    return tol, cond


def bptt_tolerance(net, x, y, br, *, T):
    """Per-parameter atol of BPTT (Eqs. 5.1-5.4): forward state errors, reverse adjoint errors, bilinear terms.

    Parameters
    ----------
    net : pyeqprop.model.crnn.CRNN
    x, y : numpy.ndarray
        Inputs and labels.
    br
        The BPTT result (``bptt(..., per_step=True)``): its final state and per-step μ are used.
    T : int
        Steps unrolled.

    Returns
    -------
    tol : dict
        ``grads/NAME`` → tolerance entry.
    cond : dict
        Piece margins and the state error bound (manifest notes).
    """
    n = x.shape[0]
    bd = CRNNBounds(net, x, y)
    states, drives, errs, uerrs = bd.run(T, 0.0, None, kinks=True)
    for a, b in zip(states[-1], br.final_state):
        assert np.array_equal(a, b)
    sT, eT = states[-1], errs[-1]
    # λ_T error
    if net.readout == "mse":
        eps_lam = (eT + GAMMA * amax(np.abs(sT[-1]) + bd.onehot)) / n
    else:
        ro = net.arch.readout
        W = bd.P[f"{ro.name}.weight"]
        z_abs = np.abs(sT[-1]).reshape(n, -1) @ W.T + bd.P[f"{ro.name}.bias"]
        dp = 2.0 * (float(W.sum(axis=1).max()) * eT + GAMMA * float(z_abs.max()))
        eps_lam = (float(W.max()) * dp + GAMMA * amax(bd.cost_state_abs(sT))) / n
    ones = [np.ones(sh) for sh in bd.shapes]
    absum = {k: 0.0 for k in net.params}
    errsum = {k: 0.0 for k in net.params}
    # μ_{T−1−k} = state_steps[k]
    for k, mu in enumerate(br.state_steps):
        t = T - 1 - k
        s_t, e_t = states[t], errs[t]
        _, idx = drives[t]
        eps_mu = bd.rho * eps_lam
        lowers = bd.lowers(s_t)
        mu_low = [None] + list(mu[:-1])
        A1 = bd.bilinear_abs(lowers, mu, idx)
        A2 = bd.bilinear_abs(mu_low, s_t, idx, bias=False)
        Ls1 = bd.bilinear_abs([None] + ones[:-1], mu, idx)
        Ls2 = bd.bilinear_abs(mu_low, ones, idx, bias=False)
        Lm1 = bd.bilinear_abs(lowers, ones, idx)
        Lm2 = bd.bilinear_abs([None] + ones[:-1], s_t, idx, bias=False)
        for name in absum:
            a = A1.get(name, 0.0) + A2.get(name, 0.0)
            absum[name] = absum[name] + 2.0 * a  # the step's own rounding and its share of the sum over t
            errsum[name] = errsum[name] + e_t * (Ls1.get(name, 0.0) + Ls2.get(name, 0.0)) \
                + eps_mu * (Lm1.get(name, 0.0) + Lm2.get(name, 0.0))
        # λ_t = H μ_t (Eq. 5.3)
        Hm = bd.hessian_abs(mu, idx)
        eps_lam = bd.row_sum(idx) * eps_mu + GAMMA * max(amax(h) for h in Hm)
    A, E = bd.cost_param_bound(sT, eT)
    for name in A:
        absum[name] = absum[name] + A[name] / n
        errsum[name] = errsum[name] + E[name] / n
    tol = {f"grads/{k}": tol_entry(amax(absum[k]), bd.grad_depth + T + 4, 1.0, amax(errsum[k])) for k in net.params}
    cond = bd.conditioning()
    cond["state_error_bound"] = eT
    return tol, cond


def teacher_tolerance(t, x, y):
    """Tolerances of the teacher's loss and gradients (Eqs. 7.1-7.3).

    Forward errors in the max norm per layer (:func:`~pyeqprop.testing.propagation.teacher_forward_bounds`),
    backward errors as elementwise arrays.

    Parameters
    ----------
    t : pyeqprop.model.teacher.Teacher
    x, y : numpy.ndarray
        Inputs and labels.

    Returns
    -------
    tol : dict
        ``loss`` and ``grads/NAME`` → tolerance entry.
    notes : dict
        Piece margins and forward bounds (manifest notes).
    """
    P = {k: np.abs(v) for k, v in t.params.items()}
    n, K = x.shape[0], t.num_classes
    logits, cache = t.forward(x)
    e_a, e_z, notes = teacher_forward_bounds(t, x)
    depth = notes.pop("depth")
    ro = t.readout
    Wo, bo = P[f"{ro.name}.weight"], P[f"{ro.name}.bias"]
    aL = cache.acts[-1].reshape(n, -1)
    z_abs = np.abs(aL) @ Wo.T + bo
    tol = {"loss": bound_entry(2.0 * e_z + GAMMA * (2.0 * amax(z_abs) + math.log(K) + 2.0), amax(z_abs), depth)}
    p = np.exp(log_softmax(logits))
    Y = onehot(y, K, np.float64)
    delta = (p - Y) / n
    r = 3.0 * e_z + GAMMA * (math.log(K) + 3.0)  # |Δp_k| ≤ p_k r
    d_err = p * r / n  # (n, K)
    absd = np.abs(delta)
    grads_err = {
        f"{ro.name}.weight": (d_err.T @ np.abs(aL) + e_a[-1] * absd.sum(axis=0)[:, None]
                              + 2.0 * GAMMA * (absd.T @ np.abs(aL))),
        f"{ro.name}.bias": d_err.sum(axis=0) + GAMMA * absd.sum(axis=0),
    }
    g_err = (d_err @ Wo + GAMMA * (absd @ Wo)).reshape(cache.acts[-1].shape)
    g_abs = (absd @ Wo).reshape(cache.acts[-1].shape)
    for l in range(len(t.arch.layers) - 1, -1, -1):
        ly = t.arch.layers[l]
        a = x if l == 0 else cache.acts[l - 1]
        W = P[f"{ly.name}.weight"]
        rp = t.act.grad(cache.pre[l])
        mu_err, mu_abs = rp * g_err, rp * g_abs
        if ly.kind == "conv":
            unpool = t.layers[l].unpool
            zeta_err, zeta_abs = unpool(mu_err, cache.indices[l]), unpool(mu_abs, cache.indices[l])
            wg = lambda lo, up: ops.conv2d_weight_grad(lo, up, kernel_size=ly.kernel, padding=ly.padding)  # noqa: E731
            grads_err[f"{ly.name}.weight"] = (wg(np.abs(a), zeta_err) + 2.0 * GAMMA * wg(np.abs(a), zeta_abs)
                                              + (wg(np.ones_like(a), zeta_abs) * e_a[l] if l > 0 else 0.0))
            grads_err[f"{ly.name}.bias"] = zeta_err.sum(axis=(0, 2, 3)) + GAMMA * zeta_abs.sum(axis=(0, 2, 3))
            if l > 0:
                ct = lambda g: ops.conv2d_transpose(g, W, padding=ly.padding, output_size=a.shape[2:])  # noqa: E731
                g_err, g_abs = ct(zeta_err) + GAMMA * ct(zeta_abs), ct(zeta_abs)
        else:
            flat = np.abs(a).reshape(n, -1)
            grads_err[f"{ly.name}.weight"] = (mu_err.T @ flat + 2.0 * GAMMA * (mu_abs.T @ flat)
                                              + (e_a[l] * mu_abs.sum(axis=0)[:, None] if l > 0 else 0.0))
            grads_err[f"{ly.name}.bias"] = mu_err.sum(axis=0) + GAMMA * mu_abs.sum(axis=0)
            if l > 0:
                g_err = ((mu_err @ W) + GAMMA * (mu_abs @ W)).reshape(a.shape)
                g_abs = (mu_abs @ W).reshape(a.shape)
    for k in t.params:
        err = np.broadcast_to(grads_err[k], t.params[k].shape)
        tol[f"grads/{k}"] = bound_entry(amax(err), amax(err) / GAMMA, depth)
    return tol, notes
