"""Equilibrium Propagation gradient estimators (SPEC.md §4).

Each estimator returns an estimate of ∇_θ of the batch-mean cost (1/n) Σ_n C; the optimizer
subtracts it. s^0 is the free fixed point after T1 steps from zero (Eq. 3.8, β = 0); nudged
phases start from s^0 and run T2 steps with Φ^{±β}.

    one-sided    g = −1/(β n) [∂Φ^β/∂θ(s^β) − ∂Φ/∂θ(s^0)]                       (Eq. 4.1)
    symmetric    g = −1/(2β n) [∂Φ^β/∂θ(s^β) − ∂Φ^{−β}/∂θ(s^{−β})]              (Eq. 4.2)
    random-sign  one-sided with β replaced by ±β, the sign drawn once per batch    (Eq. 4.3)

As β → 0 with converged phases, (4.1) and (4.3) approach the BPTT gradient of §5 with error
O(β) and (4.2) with error O(β²) (the EP limit, Eq. 4.4).

Parameters that appear only in the cost (softmax readout, local heads, distillation maps)
enter Φ^β as −β ∂C/∂θ, so the same formulas give them ∂C/∂θ at the nudged state(s)
(one-sided) or its average over s^{±β} (symmetric).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .settle import Settled, settle_ctx

__all__ = ["ESTIMATORS", "TRAIN_ESTIMATORS", "EPResult", "ep_estimate", "ep_gradients"]

ESTIMATORS = ("symmetric", "one-sided", "random-sign")
TRAIN_ESTIMATORS = ESTIMATORS + ("bptt",)  # what `pyeqprop train --estimator` accepts: EP (Eqs. 4.1-4.3) or BPTT (§5)


@dataclass
class EPResult:
    """An EP estimate with the phases that produced it."""

    grads: dict
    free: Settled
    nudged: list = field(default_factory=list)  # Settled per nudged phase, in the order (+β[, −β])
    betas: list = field(default_factory=list)  # the signed β of each nudged phase


def _check(beta, T1, T2, estimator):
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not (isinstance(beta, (int, float)) and beta > 0 and np.isfinite(beta)):
        raise ValueError(f"beta must be a positive finite number (its sign is set by the estimator), got {beta!r}")
    for name, T in (("T1", T1), ("T2", T2)):
        if int(T) != T or T < 1:
            raise ValueError(f"{name} must be a positive integer, got {T!r}")


def ep_estimate(net, x, y, *, beta, T1, T2, estimator="symmetric", rng=None, free_state=None,
                record=False) -> EPResult:
    """Run the free and nudged phases and form the EP estimate (Eqs. 4.1-4.3).

    Parameters
    ----------
    net : CRNN; x : (n, c, h, w); y : (n,) integer labels.
    beta : float > 0, the nudge magnitude; T1, T2 : free and nudged steps.
    estimator : "symmetric" | "one-sided" | "random-sign".
    rng : numpy Generator for the random sign (default: a fresh default_rng()).
    free_state : a settled free state to reuse instead of running T1 steps.
    record : record per-step residuals.

    Returns
    -------
    EPResult with ``grads`` keyed like ``net.params`` (estimate of ∇_θ (1/n) Σ C).
    """
    _check(beta, T1, T2, estimator)
    net._check_x(x)
    if y is None:
        raise ValueError("ep_gradients needs targets y")
    ctx = net.prepare(x, y)
    n = x.shape[0]
    xd = net.input_drive(x)  # B_1(x), shared by every phase and gradient of this batch
    if free_state is None:
        free = settle_ctx(net, x, T1, ctx, beta=0.0, record=record, x_drive=xd)
    else:
        net._check_state(free_state, n)
        free = Settled(list(free_state), 0.0, [], 0)
    if estimator == "symmetric":
        plus = settle_ctx(net, x, T2, ctx, beta=beta, state=free.state, record=record, x_drive=xd)
        minus = settle_ctx(net, x, T2, ctx, beta=-beta, state=free.state, record=record, x_drive=xd)
        gp = net.dphi_dtheta_ctx(x, plus.state, ctx, beta, x_drive=xd)
        gm = net.dphi_dtheta_ctx(x, minus.state, ctx, -beta, x_drive=xd)
        scale = -1.0 / (2.0 * beta * n)
        grads = {k: scale * (gp[k] - gm[k]) for k in gp}
        return EPResult(grads, free, [plus, minus], [beta, -beta])
    b = beta
    if estimator == "random-sign":
        rng = np.random.default_rng() if rng is None else rng
        b = beta if rng.random() < 0.5 else -beta
    nudged = settle_ctx(net, x, T2, ctx, beta=b, state=free.state, record=record, x_drive=xd)
    gb = net.dphi_dtheta_ctx(x, nudged.state, ctx, b, x_drive=xd)
    g0 = net.dphi_dtheta_ctx(x, free.state, ctx, 0.0, x_drive=xd)
    scale = -1.0 / (b * n)
    grads = {k: scale * (gb[k] - g0[k]) for k in gb}
    return EPResult(grads, free, [nudged], [b])


def ep_gradients(net, x, y, *, beta, T1, T2, estimator="symmetric", rng=None):
    """EP estimate of ∇_θ of the batch-mean cost, keyed like ``net.params`` (Eqs. 4.1-4.3)."""
    return ep_estimate(net, x, y, beta=beta, T1=T1, T2=T2, estimator=estimator, rng=rng).grads
