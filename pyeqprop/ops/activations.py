"""Activations ρ used by the dynamics, with their derivatives (Eqs. 2.9-2.10 of SPEC.md).

Both are piecewise linear with kinks at the clip points. The derivative is taken as 1
strictly inside the linear region and 0 elsewhere, kinks included (a measure-zero choice
that EP and BPTT share, so their agreement does not depend on it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..backend import namespace_of

__all__ = ["hard_sigmoid", "hard_sigmoid_grad", "half_hard_sigmoid", "half_hard_sigmoid_grad", "clip_delta",
           "hard_sigmoid_delta", "half_hard_sigmoid_delta", "Activation", "get_activation", "ACTIVATIONS"]


def hard_sigmoid(u):
    """ρ(u) = clip(u, 0, 1), Eq. (2.9). Same shape, dtype and namespace as ``u``."""
    xp = namespace_of(u)
    return xp.clip(u, min=0.0, max=1.0)


def hard_sigmoid_grad(u):
    """ρ'(u) = 1 for 0 < u < 1, else 0 (kinks at u = 0 and u = 1), Eq. (2.9)."""
    xp = namespace_of(u)
    return xp.astype((u > 0.0) & (u < 1.0), u.dtype)


def half_hard_sigmoid(u):
    """ρ(u) = clip(u/2, 0, 1), Eq. (2.10) (Laborieux et al. 2021). Kinks at u = 0 and u = 2."""
    xp = namespace_of(u)
    return xp.clip(0.5 * u, min=0.0, max=1.0)


def half_hard_sigmoid_grad(u):
    """ρ'(u) = 1/2 for 0 < u < 2, else 0, Eq. (2.10)."""
    xp = namespace_of(u)
    return 0.5 * xp.astype((u > 0.0) & (u < 2.0), u.dtype)


def clip_delta(v, dv):
    """clip(v + dv, 0, 1) − clip(v, 0, 1) without forming v + dv, Eq. (2.12).

    Notation: v, dv arrays of one shape (a pre-activation in units of the kink spacing, and its
    change). With clip(v + dv, 0, 1) = v + clip(dv, −v, 1 − v):

        Δ = (v − clip(v, 0, 1)) + min(max(dv, −v), 1 − v).

    Inside the linear piece the first term is 0 and Δ = dv exactly however small dv is next to v;
    outside it the two terms are fl(v − k) and −fl(v − k) (k the nearer kink), so Δ = 0 exactly
    when v + dv stays outside. Same shape, dtype and namespace as v.
    """
    xp = namespace_of(v, dv)
    return (v - xp.clip(v, min=0.0, max=1.0)) + xp.minimum(xp.maximum(dv, -v), 1.0 - v)


def hard_sigmoid_delta(u, du):
    """ρ(u + du) − ρ(u) by Eq. 2.12 for ρ = clip(u, 0, 1) (Eq. 2.9), without forming u + du."""
    return clip_delta(u, du)


def half_hard_sigmoid_delta(u, du):
    """ρ(u + du) − ρ(u) by Eq. 2.12 for ρ = clip(u/2, 0, 1) (Eq. 2.10), without forming u + du."""
    return clip_delta(0.5 * u, 0.5 * du)


@dataclass(frozen=True)
class Activation:
    """An activation with its derivative, its finite difference ρ(u + du) − ρ(u) (Eq. 2.12) and the
    positions of its kinks (in u)."""

    name: str
    fn: Callable
    grad: Callable
    kinks: tuple[float, ...]
    delta: Callable

    @property
    def max_slope(self) -> float:
        """max ρ′: the derivative inside the linear piece between the kinks (1 or ½, Eqs. 2.9-2.10)."""
        lo, hi = self.kinks
        return float(self.grad(np.asarray([0.5 * (lo + hi)], dtype=np.float64))[0])

    @property
    def saturated_values(self) -> tuple[float, float]:
        """(ρ(κ_lo), ρ(κ_hi)): the values ρ takes exactly where ρ' = 0, below and above the linear piece
        (0 and 1 for Eqs. 2.9-2.10; the saturation fractions of Eq. 3.19 count them)."""
        lo, hi = (float(v) for v in self.fn(np.asarray(self.kinks, dtype=np.float64)))
        return lo, hi


ACTIVATIONS = {
    "hard_sigmoid": Activation("hard_sigmoid", hard_sigmoid, hard_sigmoid_grad, (0.0, 1.0), hard_sigmoid_delta),
    "half_hard_sigmoid": Activation("half_hard_sigmoid", half_hard_sigmoid, half_hard_sigmoid_grad, (0.0, 2.0),
                                    half_hard_sigmoid_delta),
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
