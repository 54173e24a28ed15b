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

__all__ = ["hard_sigmoid", "hard_sigmoid_grad", "half_hard_sigmoid", "half_hard_sigmoid_grad",
           "Activation", "get_activation", "ACTIVATIONS"]


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


@dataclass(frozen=True)
class Activation:
    """An activation with its derivative and the positions of its kinks (in u)."""

    name: str
    fn: Callable
    grad: Callable
    kinks: tuple[float, ...]

    @property
    def max_slope(self) -> float:
        """max ρ′: the derivative inside the linear piece between the kinks (1 or ½, Eqs. 2.9-2.10)."""
        lo, hi = self.kinks
        return float(self.grad(np.asarray([0.5 * (lo + hi)], dtype=np.float64))[0])


ACTIVATIONS = {
    "hard_sigmoid": Activation("hard_sigmoid", hard_sigmoid, hard_sigmoid_grad, (0.0, 1.0)),
    "half_hard_sigmoid": Activation("half_hard_sigmoid", half_hard_sigmoid, half_hard_sigmoid_grad, (0.0, 2.0)),
}


def get_activation(name: str) -> Activation:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
