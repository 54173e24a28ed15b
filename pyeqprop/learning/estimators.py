"""Gradient estimators: EP (SPEC.md §4) and BPTT (§5), one registry, one result type.

Each estimator returns an :class:`Estimate` of ∇_θ of the batch-mean cost (1/n) Σ_n C; the
optimizer subtracts it. :data:`ESTIMATORS` maps a name to its function, all with the
signature ``fn(net, x, y, *, beta, T1, T2, sign=None, free_state=None, record=False,
settling=FIXED)``; adding an estimator is one function and one line in the registry.
``settling`` (:class:`~pyeqprop.learning.settle.Settling`) says how every phase settles: its
schedule (Eqs. 3.8, 3.13) and whether T1/T2 are step counts or caps on settling to a tolerance
(Eq. 3.14). s^0 is the free state after T1 steps from zero (Eq. 3.8, β = 0), a fixed point
only if the phase converged (``Settled.converged``, or its residual); nudged phases start from
s^0 and run T2 steps with Φ^{±β}, in s or, with ``settling.nudged = "difference"``, in δ = s − s^0
(Eq. 4.8), whose estimate is formed from δ without any state difference.

    one-sided    g = −1/(β n) [∂Φ^β/∂θ(s^β) − ∂Φ/∂θ(s^0)]                       (Eq. 4.1)
    symmetric    g = −1/(2β n) [∂Φ^β/∂θ(s^β) − ∂Φ^{−β}/∂θ(s^{−β})]              (Eq. 4.2)
    random-sign  one-sided with β replaced by ±β, the sign drawn once per batch    (Eq. 4.3)
    bptt         the exact gradient through T1 free steps (Eqs. 5.4, 5.6), for reference runs
    implicit     the exact gradient at the free fixed point (Eq. 5.7), for reference runs

The random sign is an argument (``sign`` = +1 or −1); :func:`draw_sign` draws it from a
generator, as the training loop does once per batch.

Only when the phases have converged is s^0 a fixed point and the estimate one of ∇θ of the
cost at it: then, as β → 0, (4.1) and (4.3) approach the equilibrium gradient (Eq. 5.7) with
error O(β) and (4.2) with error O(β²) (the EP limit, Eq. 4.4). With fixed step counts far from
convergence they estimate something else (README, "Settling").

Parameters that appear only in the cost (softmax readout, local heads, distillation maps)
enter Φ^β as −β ∂C/∂θ, so the same formulas give them ∂C/∂θ at the nudged state(s)
(one-sided) or its average over s^{±β} (symmetric).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..backend import Array
from .bptt import bptt
from .implicit import equilibrium_gradient
from .settle import FIXED, Settled, Settling, settle, settle_difference
from .shards import sharded

if TYPE_CHECKING:
    from ..model.crnn import CRNN

__all__ = ["ESTIMATORS", "EP_ESTIMATORS", "Estimate", "estimate", "ep_estimate", "ep_gradients", "draw_sign",
           "symmetric", "one_sided", "random_sign", "bptt_estimate", "implicit_estimate"]


@dataclass
class Estimate:
    """A gradient estimate with the phases that produced it, for EP and BPTT alike.

    grads : dict keyed like ``net.params``, the estimate of ∇_θ (1/n) Σ C.
    free : the free phase (for BPTT: its T1-step forward pass, which the gradient is exact for).
    nudged : the nudged phases, in the order (+β[, −β]); empty for BPTT.
    betas : the signed β of each nudged phase.
    info : what else the estimator reports (the implicit solve's iterations and residual).
    """

    grads: dict
    free: Settled
    nudged: list = field(default_factory=list)
    betas: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def phases(self) -> list:
        """Every settled phase: the free one, then the nudged ones."""
        return [self.free, *self.nudged]


def _check(beta, T1, T2) -> float:
    """β as a Python float (a NumPy scalar such as ``np.float64(0.5)`` would promote a float32 network's
    gradients to float64), after checking it and the step counts."""
    if not (isinstance(beta, numbers.Real) and not isinstance(beta, (bool, np.bool_)) and beta > 0
            and np.isfinite(beta)):
        raise ValueError(f"beta must be a positive finite number (its sign is set by the estimator), got {beta!r}")
    for name, T in (("T1", T1), ("T2", T2)):
        if int(T) != T or T < 1:
            raise ValueError(f"{name} must be a positive integer, got {T!r}")
    return float(beta)


def _free_phase(net, x, y, T1, free_state, record, settling):
    """The batch's nudge (β = 0, with targets) and its free phase: settled from zero, or ``free_state``."""
    if y is None:
        raise ValueError("ep_gradients needs targets y")
    nudge = net.nudge(x, y)  # the cost context and B_1(x), shared by every phase and gradient of this batch
    if free_state is None:
        return nudge, settle(net, x, T1, nudge=nudge, record=record, settling=settling)
    net.check_state(free_state, x.shape[0])
    return nudge, Settled(list(free_state), float("nan"), [], 0)  # settled elsewhere: its residual is not known here


def _nudged_phase(net, x, T2, nudge, free, base, record, settling) -> Settled:
    """One nudged phase from the free one: in s (Eqs. 3.8, 3.13) or in δ = s − s⁰ (Eq. 4.8), by
    ``settling.nudged``; ``base`` is the free phase's :class:`~pyeqprop.model.crnn.FreeBase` for the latter."""
    if settling.nudged == "difference":
        return settle_difference(net, x, T2, nudge=nudge, base=base, record=record, settling=settling)
    return settle(net, x, T2, nudge=nudge, state=free.state, record=record, settling=settling)


def _base(net, x, free, nudge, settling):
    return net.free_base(x, free.state, nudge) if settling.nudged == "difference" else None


def symmetric(net, x, y, *, beta, T1, T2, sign=None, free_state=None, record=False, settling=FIXED) -> Estimate:
    """g = −1/(2βn) [∂Φ^β/∂θ(s^β) − ∂Φ^{−β}/∂θ(s^{−β})] (Eq. 4.2), the difference formed before the
    reductions (Eq. 4.6); error O(β²) (Eq. 4.4)."""
    beta = _check(beta, T1, T2)
    nudge, free = _free_phase(net, x, y, T1, free_state, record, settling)
    n = x.shape[0]
    base = _base(net, x, free, nudge, settling)
    plus = _nudged_phase(net, x, T2, nudge.at(beta), free, base, record, settling)
    minus = _nudged_phase(net, x, T2, nudge.at(-beta), free, base, record, settling)
    if base is None:
        diff = net.dphi_dtheta_diff(x, plus.state, nudge.at(beta), minus.state, nudge.at(-beta))  # Eq. 4.6
    else:
        diff = net.dphi_dtheta_delta_diff(x, base, plus.delta, nudge.at(beta), minus.delta, nudge.at(-beta))  # 4.8
    scale = -1.0 / (2.0 * beta * n)
    return Estimate({k: scale * v for k, v in diff.items()}, free, [plus, minus], [beta, -beta])


def _one_sided_at(net, x, y, b, T1, T2, free_state, record, settling) -> Estimate:
    nudge, free = _free_phase(net, x, y, T1, free_state, record, settling)
    n = x.shape[0]
    base = _base(net, x, free, nudge, settling)
    nudged = _nudged_phase(net, x, T2, nudge.at(b), free, base, record, settling)
    if base is None:
        diff = net.dphi_dtheta_diff(x, nudged.state, nudge.at(b), free.state, nudge)  # Eq. 4.6
    else:
        diff = net.dphi_dtheta_delta_diff(x, base, nudged.delta, nudge.at(b), None, nudge)  # Eq. 4.8
    scale = -1.0 / (b * n)
    return Estimate({k: scale * v for k, v in diff.items()}, free, [nudged], [b])


def one_sided(net, x, y, *, beta, T1, T2, sign=None, free_state=None, record=False, settling=FIXED) -> Estimate:
    """g = −1/(βn) [∂Φ^β/∂θ(s^β) − ∂Φ/∂θ(s^0)] (Eq. 4.1), the difference formed before the reductions
    (Eq. 4.6); error O(β) (Eq. 4.4)."""
    beta = _check(beta, T1, T2)
    return _one_sided_at(net, x, y, beta, T1, T2, free_state, record, settling)


def random_sign(net, x, y, *, beta, T1, T2, sign=None, free_state=None, record=False, settling=FIXED) -> Estimate:
    """Eq. 4.1 at β' = sign·β (Eq. 4.3); ``sign`` (+1 or −1) is drawn by the caller (:func:`draw_sign`)."""
    beta = _check(beta, T1, T2)
    if sign not in (1, -1):
        raise ValueError(f"the random-sign estimator needs sign +1 or -1 (draw it with draw_sign), got {sign!r}")
    return _one_sided_at(net, x, y, beta if sign == 1 else -beta, T1, T2, free_state, record, settling)


def bptt_estimate(net, x, y, *, beta=None, T1, T2=None, sign=None, free_state=None, record=False,
                  settling=FIXED) -> Estimate:
    """The exact gradient after T1 free steps of ``settling.schedule`` from zero (Eqs. 5.1-5.4, 5.6).

    BPTT differentiates a fixed number of steps: ``settling.tol`` must be 0; ``beta``, ``T2``
    are not used.
    """
    if free_state is not None:
        raise ValueError("the bptt estimator runs its own T1-step forward pass; it takes no free_state")
    if settling.tol != 0.0:
        raise ValueError(f"the bptt estimator differentiates exactly T1 steps; settling to tol={settling.tol} "
                         "is not a fixed computation (use the implicit estimator for the gradient at the fixed point)")
    r = bptt(net, x, y, T=T1, schedule=settling.schedule)
    return Estimate(r.grads, Settled(r.final_state, r.residual, [], int(T1)), [], [])


def implicit_estimate(net, x, y, *, beta=None, T1, T2=None, sign=None, free_state=None, record=False,
                      settling=FIXED) -> Estimate:
    """The exact gradient at the free fixed point (Eq. 5.7), the free phase settled by ``settling`` (T1 the
    most steps); ``beta``, ``T2`` are not used. ``info`` holds the solve's iterations and residual."""
    r = equilibrium_gradient(net, x, y, T1=T1, settling=settling, free_state=free_state)
    return Estimate(r.grads, r.free, [], [], {"cg_iterations": r.iterations, "cg_rel_residual": r.rel_residual,
                                             "solved": r.solved})


ESTIMATORS = {
    "symmetric": symmetric,
    "one-sided": one_sided,
    "random-sign": random_sign,
    "bptt": bptt_estimate,
    "implicit": implicit_estimate,
}
"""Every gradient estimator by name (Eqs. 4.1-4.3, 5.4, 5.7)."""

EP_ESTIMATORS = ("symmetric", "one-sided", "random-sign")
"""The EP estimators of :data:`ESTIMATORS`: those that form a difference of nudged phases."""


def draw_sign(rng: np.random.Generator) -> int:
    """The random sign of Eq. 4.3 from one draw of ``rng``: +1 when ``rng.random() < 0.5``, else −1."""
    return 1 if rng.random() < 0.5 else -1


def estimate(name: str, net: CRNN, x: Array, y: Array, *, beta: float | None, T1: int, T2: int | None,
             sign: int | None = None, free_state: list[Array] | None = None, record: bool = False,
             settling: Settling = FIXED, shards: int = 1) -> Estimate:
    """Run the estimator ``name`` of :data:`ESTIMATORS` on one batch; with ``shards`` > 1 on that many
    contiguous sub-batches in parallel threads, combined by Eq. 4.7 (:func:`~pyeqprop.learning.shards.sharded`)."""
    try:
        fn = ESTIMATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {name!r}") from None
    return sharded(fn, net, x, y, shards=shards, beta=beta, T1=T1, T2=T2, sign=sign, free_state=free_state,
                   record=record, settling=settling)


def ep_estimate(net: CRNN, x: Array, y: Array, *, beta: float, T1: int, T2: int, estimator: str = "symmetric",
                sign: int | None = None, rng: np.random.Generator | None = None,
                free_state: list[Array] | None = None, record: bool = False,
                settling: Settling = FIXED, shards: int = 1) -> Estimate:
    """Run the free and nudged phases and form the EP estimate (Eqs. 4.1-4.3).

    Parameters
    ----------
    net : CRNN; x : (n, c, h, w); y : (n,) integer labels.
    beta : float > 0, the nudge magnitude; T1, T2 : free and nudged steps.
    estimator : one of :data:`EP_ESTIMATORS`.
    sign : +1 or −1, the random sign (random-sign only); drawn from ``rng`` when None.
    rng : numpy Generator for that draw (default: a fresh ``default_rng()``).
    free_state : a settled free state to reuse instead of running T1 steps.
    record : record per-step residuals.
    settling : :class:`~pyeqprop.learning.settle.Settling`, how every phase settles (default: T1
        and T2 synchronous steps).
    shards : int ≥ 1, contiguous sub-batches settled in parallel threads (host backends), combined
        by Eq. 4.7; 1: the whole batch in this thread.

    Returns
    -------
    :class:`Estimate` with ``grads`` keyed like ``net.params`` (estimate of ∇_θ (1/n) Σ C).
    """
    if estimator not in EP_ESTIMATORS:
        raise ValueError(f"estimator must be one of {EP_ESTIMATORS}, got {estimator!r}")
    if estimator == "random-sign" and sign is None:
        sign = draw_sign(np.random.default_rng() if rng is None else rng)
    return estimate(estimator, net, x, y, beta=beta, T1=T1, T2=T2, sign=sign, free_state=free_state, record=record,
                    settling=settling, shards=shards)


def ep_gradients(net: CRNN, x: Array, y: Array, *, beta: float, T1: int, T2: int, estimator: str = "symmetric",
                 sign: int | None = None, rng: np.random.Generator | None = None,
                 settling: Settling = FIXED, shards: int = 1) -> dict[str, Array]:
    """EP estimate of ∇_θ of the batch-mean cost, keyed like ``net.params`` (Eqs. 4.1-4.3)."""
    return ep_estimate(net, x, y, beta=beta, T1=T1, T2=T2, estimator=estimator, sign=sign, rng=rng,
                       settling=settling, shards=shards).grads
