"""Settling: T synchronous steps of the dynamics (Eq. 3.8) and the residual that shows convergence.

The residual after step t is r_t = max_l max |s_l,t − s_l,t−1| (Eq. 3.11), the largest change
of any neuron. By default only the last step's residual is computed (one host transfer per
phase); ``record=True`` keeps every step's residual (one transfer per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..backend import to_numpy

__all__ = ["Settled", "settle", "residual", "predict"]


@dataclass
class Settled:
    """A settled state s_T with its last residual r_T and, when recorded, r_1 … r_T."""

    state: list
    residual: float
    residuals: list = field(default_factory=list)
    steps: int = 0


def residual(new, old) -> float:
    """r = max_l max |new_l − old_l| (Eq. 3.11), as a Python float."""
    worst = 0.0
    for a, b in zip(new, old):
        xp = a.__array_namespace__()
        worst = max(worst, float(to_numpy(xp.max(xp.abs(a - b)))))
    return worst


def settle(net, x, T, *, nudge=None, state=None, record=False) -> Settled:
    """Settle ``net`` on input ``x`` for T steps of s ← ρ(∂Φ^β/∂s) (Eq. 3.8).

    Parameters
    ----------
    net : CRNN (anything with the energy protocol of SPEC.md Eq. 3.12).
    x : (n, c, h, w) input, in the network's namespace and dtype.
    T : int ≥ 0, the number of steps.
    nudge : :class:`~pyeqprop.model.crnn.Nudge` of this batch (β, cost context, B_1(x));
        None: the free dynamics, ``net.nudge(x)``.
    state : starting state (list of arrays); zeros when None (the free phase).
    record : keep the residual of every step.

    Returns
    -------
    Settled with ``state`` (list of (n, …) arrays), ``residual`` r_T (Eq. 3.11; NaN when T = 0),
    ``residuals`` and ``steps`` = T.
    """
    if int(T) != T or T < 0:
        raise ValueError(f"T must be a non-negative integer, got {T!r}")
    if nudge is None:
        nudge = net.nudge(x)
    if state is not None:
        net.check_state(state, x.shape[0])
    s = net.init_state(x.shape[0]) if state is None else list(state)
    res, hist = float("nan"), []
    for t in range(int(T)):
        new = net.step(x, s, nudge)
        if record:
            hist.append(residual(new, s))
        elif t == T - 1:
            res = residual(new, s)
        s = new
    if record and hist:
        res = hist[-1]
    return Settled(s, res, hist, int(T))


def predict(net, x, T):
    """Class predictions after T free steps from zero (Eq. 3.8 with β = 0), shape (n,)."""
    st = settle(net, x, T)
    return net.xp.argmax(net.logits(st.state), axis=1)
