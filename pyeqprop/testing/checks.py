"""Tolerances derived from a rounding-error model, and the assertions that use them.

Derivation
----------
Model (IEEE arithmetic, no overflow): every operation returns fl(a ∘ b) = (a ∘ b)(1 + δ) with
|δ| ≤ u = eps/2, the unit roundoff of the working dtype; an operation done in a wider dtype
has a smaller |δ|, so the bound below holds for it too.

Let a sum S = Σ_k t_k of products be computed in any order, and let every term pass
through at most d roundings (its multiplications plus the additions on its path through
the summation tree; d ≤ the number of factors plus the number of terms). Then each term
comes out as t_k (1 + θ_k) and

    |fl(S) − S| ≤ max_k |θ_k| · Σ_k |t_k|.

Two bounds on |θ_k| are available:

* deterministic (Higham 2002, Lemma 3.1):  |θ| ≤ γ_d = d·u / (1 − d·u), always valid;
* probabilistic (Higham & Mary 2019, SIAM J. Sci. Comput. 41(5), Thm. 2.4): if the δ are
  independent with mean zero, |θ| ≤ γ̃_d(λ) = exp(λ·√d·u + d·u²/(1 − u)) − 1 ≈ λ·√d·u with
  probability ≥ 1 − 2·exp(−λ²(1 − u)²/2) for each term.

:func:`gamma` returns min(γ_d, γ̃_d(λ)) with λ = 8, so one term escapes the bound with
probability at most 2·e^{−32} ≈ 2.5e−14: for d < λ² = 64 the deterministic bound is the
smaller one, beyond it the √d growth of independent roundings. The scale is Σ|t_k| (the
same computation run on absolute values), never the array size. Gradual underflow adds at
most one smallest subnormal per operation, which :func:`error_bound` includes.

When two computations of the same exact quantity are compared (a primitive against an
oracle, or the two sides of an adjoint identity), each carries its own error, so the
allowed difference is the sum of the two bounds: 2·γ·Σ|t_k| with d the larger depth.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "LAMBDA",
    "unit_roundoff",
    "gamma",
    "error_bound",
    "adjoint_tolerance",
    "assert_within_bound",
    "assert_allclose_dtype",
    "assert_adjoint",
]

LAMBDA = 8.0
"""Confidence parameter of the probabilistic bound: per-term failure probability 2·exp(−λ²/2)."""


def unit_roundoff(dtype) -> float:
    """u = eps/2 of a floating dtype (float32: 5.96e−8, float64: 1.11e−16)."""
    return float(np.finfo(np.dtype(dtype)).eps) / 2.0


def gamma(dtype, n_terms: int, *, lam: float = LAMBDA) -> float:
    """Relative error factor min(γ_d, γ̃_d(λ)) for rounding depth d = ``n_terms`` (see module)."""
    d = int(n_terms)
    if d < 0:
        raise ValueError(f"n_terms must be >= 0, got {n_terms}")
    u = unit_roundoff(dtype)
    prob = math.expm1(lam * math.sqrt(d) * u + d * u * u / (1.0 - u))
    det = d * u / (1.0 - d * u) if d * u < 1.0 else math.inf
    return min(det, prob)


def error_bound(dtype, n_terms: int, abs_sum):
    """Bound on |fl(S) − S| for one computation: γ·Σ|t_k| + d·(smallest subnormal)."""
    tiny = float(np.finfo(np.dtype(dtype)).smallest_subnormal)
    return gamma(dtype, n_terms) * np.asarray(abs_sum, dtype=np.float64) + n_terms * tiny


def adjoint_tolerance(dtype, n_terms: int, abs_sum: float) -> float:
    """Allowed |⟨Ax, y⟩ − ⟨x, Aᵀy⟩|: both sides are computations of the same triple sum
    Σ_{i,j} y_i A_ij x_j, so the tolerance is the sum of two :func:`error_bound`.

    n_terms: the rounding depth on either side, at most (length of the inner reduction) +
    (length of the outer inner product) + (number of multiplications per term).
    abs_sum: Σ_{i,j} |y_i| |A_ij| |x_j| = ⟨|A||x|, |y|⟩.
    """
    return float(2.0 * error_bound(dtype, n_terms, abs_sum))


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
