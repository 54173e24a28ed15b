"""Settling: T synchronous steps of the dynamics (Eq. 3.8) and the residual that shows convergence.

The residual after step t is r_t = max_l max |s_l,t − s_l,t−1| (Eq. 3.11), the largest change
of any neuron. By default only the last step's residual is computed (one host transfer per
phase); ``record=True`` keeps every step's residual (one transfer per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..backend import to_numpy

__all__ = ["Settled", "settle", "settle_ctx", "residual"]


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


def settle_ctx(net, x, T, ctx, *, beta=0.0, state=None, record=False, x_drive=None) -> Settled:
    """Run T steps of Eq. 3.8 from ``state`` (zeros when None) with a prepared cost context.

    ``x_drive``: ``net.input_drive(x)``, when the caller already has it (it is constant in x).
    """
    if int(T) != T or T < 0:
        raise ValueError(f"T must be a non-negative integer, got {T!r}")
    s = net.init_state(x.shape[0]) if state is None else list(state)
    res, hist = float("nan"), []
    if x_drive is None and T > 0:
        x_drive = net.input_drive(x)  # B_1(x) does not change during the phase
    for t in range(int(T)):
        new = net.step_ctx(x, s, ctx, beta, x_drive)
        if record:
            hist.append(residual(new, s))
        elif t == T - 1:
            res = residual(new, s)
        s = new
    if record and hist:
        res = hist[-1]
    return Settled(s, res, hist, int(T))


def settle(net, x, T, *, y=None, beta=0.0, state=None, record=False) -> Settled:
    """Settle ``net`` on input ``x`` for T steps of s ← ρ(∂Φ^β/∂s) (Eq. 3.8).

    Parameters
    ----------
    net : CRNN
    x : (n, c, h, w) input, in the network's namespace and dtype.
    T : number of steps.
    y : (n,) labels, needed when beta != 0.
    beta : nudging strength β of Φ^β = Φ − βC (Eq. 3.6).
    state : starting state (list of arrays); zeros when None (the free phase).
    record : keep the residual of every step.

    Returns
    -------
    Settled with ``state`` (list of (n, …) arrays), ``residual`` r_T (Eq. 3.11) and ``residuals``.
    """
    net._check_x(x)
    if state is not None:
        net._check_state(state, x.shape[0])
    if beta != 0.0 and y is None:
        raise ValueError(f"beta={beta} needs targets y")
    ctx = net.prepare(x, y) if y is not None else None
    return settle_ctx(net, x, T, ctx, beta=beta, state=state, record=record)
