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

A nudged phase can run in the state s itself (``nudged="state"``, Eqs. 3.8, 3.13) or in its
difference from the free state, δ = s − s⁰ (``nudged="difference"``, Eq. 4.8:
:func:`settle_difference`): the same steps, with δ's rounding relative to δ and not to s. Its
residual is in gradient units, r_t = max_l (c_l/|β|) max |δ_l,t − δ_l,t−1| (Eq. 4.8).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..backend import Array, to_numpy

if TYPE_CHECKING:
    from ..model.crnn import CRNN, Nudge

__all__ = ["SCHEDULES", "NUDGED_FORMS", "CHECK_EVERY", "Settling", "Settled", "settle", "sweep", "residual",
           "predict", "gauss_seidel_blocks", "settle_difference", "sweep_difference", "difference_residual"]

SCHEDULES = ("synchronous", "gauss-seidel")
"""The update schedules: all layers at once (Eq. 3.8) or odd layers, then even layers (Eq. 3.13)."""

NUDGED_FORMS = ("state", "difference")
"""How a nudged phase is settled: in the state s (Eqs. 3.8, 3.13) or in δ = s − s⁰ (Eq. 4.8)."""

CHECK_EVERY = 5
"""Steps between two residual checks when settling to a tolerance (Eq. 3.14)."""


@dataclass(frozen=True)
class Settling:
    """How a phase settles (Eqs. 3.8, 3.13, 3.14).

    schedule : "synchronous" | "gauss-seidel".
    tol : float ≥ 0. 0: run exactly T steps; > 0: stop at the first checked step with r_t ≤ tol
        (T is then the most steps a phase may take).
    check_every : int ≥ 1, the steps between residual checks when tol > 0.
    nudged : "state" | "difference", the variables a nudged phase settles in (Eq. 4.8); the free
        phase always settles in s. With "difference" tol bounds the nudged residual in gradient units.
    """

    schedule: str = "synchronous"
    tol: float = 0.0
    check_every: int = CHECK_EVERY
    nudged: str = "state"

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (isinstance(self.tol, (int, float)) and self.tol >= 0.0):
            raise ValueError(f"tol must be a number >= 0 (0: a fixed number of steps), got {self.tol!r}")
        if int(self.check_every) != self.check_every or self.check_every < 1:
            raise ValueError(f"check_every must be an integer >= 1, got {self.check_every!r}")
        if self.nudged not in NUDGED_FORMS:
            raise ValueError(f"nudged must be one of {', '.join(NUDGED_FORMS)} (the variables a nudged phase "
                             f"settles in, Eq. 4.8), got {self.nudged!r}")


FIXED = Settling()
"""T synchronous steps: the dynamics of Laborieux et al. (2021)."""


@dataclass
class Settled:
    """A settled phase: its state, last residual and steps taken.

    state : s after the last step; residual : r of the last step (NaN when no step ran);
    residuals : every r_t when recorded; steps : steps (sweeps) taken;
    converged : whether r ≤ tol was reached (None when settling a fixed number of steps);
    delta : δ = s − s⁰ as settled, for a difference-variable phase (Eq. 4.8; its residuals are in
        gradient units); None otherwise.
    """

    state: list
    residual: float
    residuals: list = field(default_factory=list)
    steps: int = 0
    converged: bool | None = None
    delta: list | None = None


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
    s, res, hist, steps, converged = _iterate(lambda v: sweep(net, x, v, nudge, settling.schedule)[0], residual,
                                              s, T, settling, record)
    return Settled(s, res, hist, steps, converged)


def _iterate(step, change, v, T: int, settling: Settling, record: bool):
    """v ← step(v) up to T times, stopping once change(new, old) ≤ settling.tol, checked every
    ``check_every`` steps, at the last step and, with ``record``, at every step (Eq. 3.14).

    Returns (v, the last residual measured (NaN when none was), the recorded residuals, the steps
    taken, converged: None for a fixed count (tol = 0), False when T = 0 with tol > 0).
    """
    tol, k = settling.tol, settling.check_every
    res, hist, steps, converged = float("nan"), [], 0, None
    for t in range(int(T)):
        new = step(v)
        steps = t + 1
        last = t == T - 1
        check = tol > 0.0 and (record or last or steps % k == 0)
        if record or last or check:
            res = change(new, v)
            if record:
                hist.append(res)
        v = new
        if check:
            converged = res <= tol
            if converged:
                break
    if tol > 0.0 and converged is None:
        converged = False  # T = 0: nothing ran
    return v, res, hist, steps, converged


def difference_residual(new, old, weights, beta) -> float:
    """r = max_l (c_l/|β|) max |new_l − old_l| (Eq. 4.8): a step's change of δ in the units of the
    estimate it feeds (layer l's estimate is c_l/β times a difference of states), as a Python float."""
    xp = new[0].__array_namespace__()
    worst = xp.stack([(c / abs(beta)) * xp.max(xp.abs(a - b)) for a, b, c in zip(new, old, weights)])
    return float(to_numpy(xp.max(worst)))


def sweep_difference(net, x, base, delta, nudge, schedule: str):
    """One step of ``schedule`` in difference variables from δ (Eq. 4.8): the new δ. A Gauss–Seidel
    sweep's second half reuses the first half's ΔB_l and argmax, as :func:`sweep` does."""
    if schedule == "synchronous":
        return net.delta_update(x, base, delta, nudge)[0]
    first, second = gauss_seidel_blocks(len(net.layers))
    d1, drv = net.delta_update(x, base, delta, nudge, layers=first)
    if not second:
        return d1
    known = {l: (drv.bottom_up[l], drv.indices[l]) for l in first if l > 0}
    return net.delta_update(x, base, d1, nudge, layers=second, known=known)[0]


def settle_difference(net: CRNN, x: Array, T: int, *, nudge: Nudge, base, record: bool = False,
                      settling: Settling = FIXED) -> Settled:
    """Settle a nudged phase in δ = s − s⁰ from δ = 0 (Eq. 4.8): δ ← ρ(u⁰ + Δu(δ)) − ρ(u⁰) by ``settling``.

    Parameters
    ----------
    net : CRNN; x : (n, c, h, w) input; T : int ≥ 0, steps (tol = 0) or the most steps (tol > 0).
    nudge : the batch's :class:`~pyeqprop.model.crnn.Nudge` at this phase's β (≠ 0).
    base : :class:`~pyeqprop.model.crnn.FreeBase` of the free state s⁰ (``net.free_base``).
    record, settling : as in :func:`settle`; tol bounds the residual of :func:`difference_residual`.

    Returns
    -------
    Settled with ``delta`` (list of (n, …) arrays), ``state`` = s⁰ + δ (for readers of the state; the
    estimate uses ``delta``), and the residual, steps and convergence of the δ steps.
    """
    if int(T) != T or T < 0:
        raise ValueError(f"T must be a non-negative integer, got {T!r}")
    if nudge.beta == 0.0:
        raise ValueError("a difference-variable phase needs a nudge with beta != 0 (at beta = 0, delta = 0)")
    xp = net.xp
    d = [xp.zeros_like(s) for s in base.state]
    weights = net.layer_weights
    d, res, hist, steps, converged = _iterate(
        lambda v: sweep_difference(net, x, base, v, nudge, settling.schedule),
        lambda new, old: difference_residual(new, old, weights, nudge.beta), d, T, settling, record)
    return Settled([s + dl for s, dl in zip(base.state, d)], res, hist, steps, converged, d)


def predict(net, x, T, *, settling: Settling = FIXED):
    """Class predictions after settling the free dynamics from zero (Eq. 3.8 with β = 0), shape (n,)."""
    st = settle(net, x, T, settling=settling)
    return net.xp.argmax(net.logits(st.state), axis=1)
