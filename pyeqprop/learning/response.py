"""Response symmetry of the two nudged phases of symmetric EP (SPEC.md (4.9)).

Notation
--------
s^0            the free fixed point; s^{±β} the fixed points of the two nudged phases of (4.2).
δ^±_l          s^{±β}_l − s^0_l, layer l's response to the nudge ±β (what a phase in difference
               variables (4.8) settles directly).
a_l            ‖δ^+_l + δ^−_l‖ / ‖δ^+_l − δ^−_l‖ over the whole batch, layer l's response asymmetry.

Where the nudged fixed points depend smoothly on β, δ^± = ±β v_l + β² w_l + O(β³), so

    a_l = β ‖w_l‖ / ‖v_l‖ + O(β²),                                              (4.9)

small and proportional to β. When one phase leaves for another fixed point (a pool's argmax that
flips, a unit that crosses a kink of ρ and carries its layer's neighbours along) its δ_l is no
longer O(β) and a_l is close to 1: that layer's part of the estimate (4.2) is then not (4.4)'s.
"""
from __future__ import annotations

import math

from ..backend import to_numpy

__all__ = ["has_response_pair", "response_sums", "asymmetry", "too_asymmetric"]


def has_response_pair(est) -> bool:
    """Whether ``est`` has the two nudged phases +β and −β that (4.9) compares (the symmetric estimator)."""
    return len(est.nudged) == 2 and est.betas[0] == -est.betas[1]


def _responses(est):
    """(δ^+, δ^−) per layer of a symmetric estimate: the phases' ``delta`` when they settled in
    difference variables, else s^{±β} − s^0."""
    if not has_response_pair(est):
        raise ValueError("the response asymmetry (Eq. 4.9) needs the two nudged phases +β and −β of the symmetric "
                         f"estimator; got phases at beta {est.betas}")
    plus, minus = est.nudged
    if plus.delta is not None and minus.delta is not None:
        return plus.delta, minus.delta
    free = est.free.state
    return [p - f for p, f in zip(plus.state, free)], [m - f for m, f in zip(minus.state, free)]


def response_sums(est):
    """Per neuron layer the sums Σ (δ^+_l + δ^−_l)² and Σ (δ^+_l − δ^−_l)² over the batch, on the device (Eq. 4.9).

    Parameters
    ----------
    est : :class:`~pyeqprop.learning.estimators.Estimate` of the symmetric estimator (4.2).

    Returns
    -------
    (L, 2) array of the states' dtype: sums of squares, which add over the shards of a batch (4.7)
    and over MPI ranks, where the norms of (4.9) would not.
    """
    dp, dm = _responses(est)
    xp = dp[0].__array_namespace__()
    return xp.stack([xp.stack([xp.sum((p + m) ** 2), xp.sum((p - m) ** 2)]) for p, m in zip(dp, dm)])


def asymmetry(sums) -> list[float]:
    """a_l = sqrt(Σ (δ^+ + δ^−)² / Σ (δ^+ − δ^−)²) per layer (Eq. 4.9), from :func:`response_sums` (on
    the device or on the host), as Python floats; 0 for a layer that did not respond at all."""
    rows = sums if isinstance(sums, list) else to_numpy(sums).tolist()
    return [math.sqrt(s / d) if d > 0 else (0.0 if s == 0 else math.inf) for s, d in rows]


def too_asymmetric(values, limit: float) -> bool:
    """Whether some layer's asymmetry (Eq. 4.9) exceeds ``limit`` (> 0); ``limit`` 0: the check is off."""
    if not (limit >= 0):
        raise ValueError(f"the asymmetry limit must be a number >= 0 (0: off), got {limit!r}")
    return limit > 0 and any(a > limit for a in values)
