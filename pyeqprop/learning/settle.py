"""Settling: the dynamics (Eqs. 3.8, 3.13) run for a fixed number of steps or to a tolerance (Eq. 3.14).

The residual after step t is r_t = max_l max |s_l,t − s_l,t−1| (Eq. 3.11), the largest change
of any neuron. A step is one synchronous update of every layer (Eq. 3.8) or one Gauss–Seidel
sweep, odd layers then even layers (Eq. 3.13). :class:`Settling` says which, and when to stop:

- ``tol = 0``: exactly T steps (Laborieux et al.'s T1/T2); only the last residual is computed
  (one host transfer per phase).
- ``tol > 0``: until r_t ≤ tol or T steps, whichever comes first. The residual is checked every
  ``check_every`` steps (:data:`CHECK_EVERY` = 5 by default: one host transfer per 5 steps, none
  in between), and at the last step; a phase may therefore run up to ``check_every − 1`` steps
  past its first r_t ≤ tol. ``Settled.converged`` says whether it reached tol.

``record=True`` keeps every step's residual (one transfer per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..backend import Array, to_numpy

if TYPE_CHECKING:
    from ..model.crnn import CRNN, Nudge

__all__ = ["SCHEDULES", "CHECK_EVERY", "Settling", "Settled", "settle", "sweep", "residual", "predict",
           "gauss_seidel_blocks"]

SCHEDULES = ("synchronous", "gauss-seidel")
"""The update schedules: all layers at once (Eq. 3.8) or odd layers, then even layers (Eq. 3.13)."""

CHECK_EVERY = 5
"""Steps between two residual checks when settling to a tolerance (Eq. 3.14)."""


@dataclass(frozen=True)
class Settling:
    """How a phase settles (Eqs. 3.8, 3.13, 3.14).

    schedule : "synchronous" | "gauss-seidel".
    tol : float ≥ 0. 0: run exactly T steps; > 0: stop at the first checked step with r_t ≤ tol
        (T is then the most steps a phase may take).
    check_every : int ≥ 1, the steps between residual checks when tol > 0.
    """

    schedule: str = "synchronous"
    tol: float = 0.0
    check_every: int = CHECK_EVERY

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0.0):
            raise ValueError(f"tol must be a number >= 0 (0: a fixed number of steps), got {self.tol!r}")
        if int(self.check_every) != self.check_every or self.check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1, got {self.check_every!r}")


FIXED = Settling()
"""T synchronous steps: the dynamics of Laborieux et al. (2021)."""


@dataclass
class Settled:
    """A settled phase: its state, last residual and steps taken.

    state : s after the last step; residual : r of the last step (NaN when no step ran);
    residuals : every r_t when recorded; steps : steps (sweeps) taken;
    converged : whether r ≤ tol was reached (None when settling a fixed number of steps).
    """

    state: list
    residual: float
    residuals: list = field(default_factory=list)
    steps: int = 0
    converged: bool | None = None


def residual(new, old) -> float:
    """r = max_l max |new_l − old_l| (Eq. 3.11), as a Python float (one host transfer)."""
    xp = new[0].__array_namespace__()
    worst = xp.stack([xp.max(xp.abs(a - b)) for a, b in zip(new, old)])
    return float(to_numpy(xp.max(worst)))


def gauss_seidel_blocks(L: int) -> tuple[list[int], list[int]]:
    """The two blocks of a Gauss–Seidel sweep, as 0-based indices: layers 1, 3, 5 … then 2, 4 … (Eq. 3.13)."""
    return list(range(0, L, 2)), list(range(1, L, 2))


def sweep(net, x, s, nudge, schedule: str):
    """One step of ``schedule`` from s (Eqs. 3.8, 3.13): the new state, and [(block, state in, drive)] per
    block update (block None: every layer at once), which BPTT differentiates through (Eq. 5.6).

    The second half of a Gauss–Seidel sweep reuses the first half's B_l and argmax for the layers
    l of the first block: their input s_{l−1} belongs to the second block and has not changed yet.
    """
    if schedule == "synchronous":
        d = net.drive(x, s, nudge)
        return [net.act.fn(u) for u in d.u], [(None, s, d)]
    first, second = gauss_seidel_blocks(len(net.layers))
    s1, d1 = net.update(x, s, nudge, layers=first)
    if not second:
        return s1, [(first, s, d1)]
    known = {l: (d1.bottom_up[l], d1.indices[l]) for l in first if d1.bottom_up[l] is not None}
    s2, d2 = net.update(x, s1, nudge, layers=second, known=known)
    return s2, [(first, s, d1), (second, s1, d2)]


def settle(net: CRNN, x: Array, T: int, *, nudge: Nudge | None = None, state: list[Array] | None = None,
           record: bool = False, settling: Settling = FIXED) -> Settled:
    """Settle ``net`` on input ``x``: steps of s ← ρ(∂Φ^β/∂s) by ``settling`` (Eqs. 3.8, 3.13, 3.14).

    Parameters
    ----------
    net : CRNN (anything with the energy protocol of SPEC.md Eq. 3.12).
    x : (n, c, h, w) input, in the network's namespace and dtype.
    T : int ≥ 0, the number of steps (``settling.tol = 0``) or the most steps (tol > 0).
    nudge : :class:`~pyeqprop.model.crnn.Nudge` of this batch (β, cost context, B_1(x));
        None: the free dynamics, ``net.nudge(x)``.
    state : starting state (list of arrays); zeros when None (the free phase).
    record : keep the residual of every step.
    settling : :class:`Settling` (schedule, tol, check_every); default T synchronous steps.

    Returns
    -------
    Settled with ``state`` (list of (n, …) arrays), ``residual`` (Eq. 3.11; NaN when no step
    ran), ``residuals``, ``steps`` and ``converged`` (None for a fixed number of steps).
    """
    if int(T) != T or T < 0:
        raise ValueError(f"T must be a non-negative integer, got {T!r}")
    if nudge is None:
        nudge = net.nudge(x)
    if state is not None:
        net.check_state(state, x.shape[0])
    s = net.init_state(x.shape[0]) if state is None else list(state)
    tol, k = settling.tol, settling.check_every
    res, hist, steps, converged = float("nan"), [], 0, None
    for t in range(int(T)):
        new, _ = sweep(net, x, s, nudge, settling.schedule)
        steps = t + 1
        last = t == T - 1
        if record:
            res = residual(new, s)
            hist.append(res)
        elif last or (tol > 0.0 and steps % k == 0):
            res = residual(new, s)
        s = new
        if tol > 0.0 and (record or last or steps % k == 0):
            converged = res <= tol
            if converged:
                break
    if tol > 0.0 and converged is None:
        converged = False  # T = 0: nothing ran
    return Settled(s, res, hist, steps, converged)


def predict(net, x, T, *, settling: Settling = FIXED):
    """Class predictions after settling the free dynamics from zero (Eq. 3.8 with β = 0), shape (n,)."""
    st = settle(net, x, T, settling=settling)
    return net.xp.argmax(net.logits(st.state), axis=1)
