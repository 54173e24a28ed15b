"""Assertions with tolerances from the rounding-error model of :mod:`pyeqprop.testing.rounding`.

Each assertion compares two computations of the same exact quantity (an array against an
oracle, the two sides of an adjoint identity), so it allows the sum of their two bounds.
``unit_roundoff``, ``gamma``, ``error_bound``, ``adjoint_tolerance`` and ``LAMBDA`` live in
:mod:`~pyeqprop.testing.rounding`; they are importable from here too, as before.
"""
from __future__ import annotations

import numpy as np

from .rounding import LAMBDA, adjoint_tolerance, error_bound, gamma, unit_roundoff  # noqa: F401  (also public here)

__all__ = [
    "assert_within_bound",
    "assert_allclose_dtype",
    "assert_adjoint",
]


def _host(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a
    from ..backend import to_numpy

    return to_numpy(a)


def assert_within_bound(actual, expected, bound, *, err_msg: str = "") -> None:
    """Assert |actual − expected| ≤ bound elementwise (bound broadcasts), reporting the worst element."""
    a = np.asarray(_host(actual), dtype=np.float64)
    e = np.asarray(_host(expected), dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"shape mismatch: actual {a.shape}, expected {e.shape}. {err_msg}")
    bound = np.broadcast_to(np.asarray(bound, dtype=np.float64), a.shape)
    diff = np.abs(a - e)
    bad = ~(diff <= bound)  # also catches NaN
    if np.any(bad):
        flat = int(np.argmax(np.where(bad, np.nan_to_num(diff / np.maximum(bound, 1e-300), nan=np.inf), -1.0)))
        at = np.unravel_index(flat, a.shape) if a.shape else ()
        raise AssertionError(
            f"{int(bad.sum())} of {a.size} elements exceed the derived bound; worst at {tuple(int(i) for i in at)}: "
            f"actual {a[at]!r}, expected {e[at]!r}, |diff| {diff[at]:.3e} > bound {bound[at]:.3e}. {err_msg}"
        )


def assert_allclose_dtype(actual, expected, *, dtype, n_terms: int, abs_scale, err_msg: str = "") -> None:
    """Assert ``actual`` has dtype ``dtype`` and is within 2·error_bound(dtype, n_terms, abs_scale)
    of ``expected`` elementwise.

    ``expected`` is an independent computation of the same sums (an oracle, in float64 or in
    ``dtype``); ``abs_scale`` is Σ|t_k| per element (the oracle run on absolute values);
    ``n_terms`` the rounding depth, including one rounding for a final cast to ``dtype``.
    """
    a = _host(actual)
    if np.dtype(a.dtype) != np.dtype(dtype):
        raise AssertionError(f"dtype: expected {np.dtype(dtype)}, got {a.dtype}. {err_msg}")
    assert_within_bound(a, expected, 2.0 * error_bound(dtype, n_terms, abs_scale), err_msg=err_msg)


def assert_adjoint(lhs: float, rhs: float, *, dtype, n_terms: int, abs_sum: float, err_msg: str = "") -> None:
    """Assert |lhs − rhs| ≤ adjoint_tolerance(dtype, n_terms, abs_sum)."""
    tol = adjoint_tolerance(dtype, n_terms, abs_sum)
    diff = abs(float(lhs) - float(rhs))
    if not diff <= tol:
        raise AssertionError(
            f"adjoint identity violated: <Ax,y> = {float(lhs)!r}, <x,A^T y> = {float(rhs)!r}, "
            f"|diff| {diff:.3e} > tolerance {tol:.3e} (dtype {np.dtype(dtype)}, n_terms {n_terms}, "
            f"sum|terms| {float(abs_sum):.3e}). {err_msg}"
        )
