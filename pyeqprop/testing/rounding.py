"""The rounding-error model: bounds on one computed sum, and the margins under which they hold.

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

Two computations
----------------
When two computations of the same exact quantity are compared (a primitive against an
oracle, the two sides of an adjoint identity, a port against the reference), each carries
its own error, so the allowed difference is the sum of the two bounds: 2·γ·Σ|t_k| with d the
larger depth. In float64, :data:`GAMMA` = 128·eps = 256u bounds 2γ_d for every depth
d ≤ :data:`MAX_DEPTH` = 256 (γ_d = d·u for d ≤ 64 and ≈ 8√d·u beyond, so γ_d ≤ 128u), which
:func:`check_depth` asserts.

Pieces
------
Through max pooling and the kinks of ρ the bounds hold only within one *piece*: fixed argmaxes
and fixed sides of the activation kinks. Two computations, each within its bound of the exact
values, pick the same argmax when the best value beats the runner-up by more than twice the
bound (:func:`window_gaps`), and put a pre-activation on the same side of a kink when it lies
farther than its bound from the kink (:func:`kink_margin`). Both demand the margin by a factor
:data:`TIE_SAFETY` = 2.
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
    "EPS",
    "GAMMA",
    "MAX_DEPTH",
    "check_depth",
    "TIE_SAFETY",
    "window_gaps",
    "kink_margin",
]

LAMBDA = 8.0
"""Confidence parameter of the probabilistic bound: per-term failure probability 2·exp(−λ²/2)."""

EPS = float(np.finfo(np.float64).eps)
"""Machine epsilon of float64 (2u)."""
GAMMA = 128.0 * EPS
"""γ = 128·eps = 256u ≥ 2γ_d for every rounding depth d ≤ MAX_DEPTH: two computations of one sum."""
MAX_DEPTH = 256
"""The largest rounding depth :data:`GAMMA` bounds."""
TIE_SAFETY = 2.0
"""An argmax gap (over twice the bound) or a kink distance (over the bound) must exceed this."""


def unit_roundoff(dtype) -> float:
    """Unit roundoff u = eps/2 of a floating dtype.

    Parameters
    ----------
    dtype : dtype-like
        A NumPy floating dtype (float32: u = 5.96e−8, float64: u = 1.11e−16).

    Returns
    -------
    float
    """
    return float(np.finfo(np.dtype(dtype)).eps) / 2.0


def gamma(dtype, n_terms: int, *, lam: float = LAMBDA) -> float:
    """Relative error factor min(γ_d, γ̃_d(λ)) for rounding depth d (see the module docstring).

    Parameters
    ----------
    dtype : dtype-like
        The working floating dtype.
    n_terms : int
        The rounding depth d ≥ 0.
    lam : float, optional
        Confidence parameter λ of the probabilistic bound.

    Returns
    -------
    float
    """
    d = int(n_terms)
    if d < 0:
        raise ValueError(f"n_terms must be >= 0, got {n_terms}")
    u = unit_roundoff(dtype)
    prob = math.expm1(lam * math.sqrt(d) * u + d * u * u / (1.0 - u))
    det = d * u / (1.0 - d * u) if d * u < 1.0 else math.inf
    return min(det, prob)


def error_bound(dtype, n_terms: int, abs_sum):
    """Bound on |fl(S) − S| for one computation: γ·Σ|t_k| + d·(smallest subnormal).

    Parameters
    ----------
    dtype : dtype-like
        The working floating dtype.
    n_terms : int
        The rounding depth d.
    abs_sum : array_like
        Σ|t_k| per element (the same computation run on absolute values).

    Returns
    -------
    numpy.ndarray
        The bound per element, in float64.
    """
    tiny = float(np.finfo(np.dtype(dtype)).smallest_subnormal)
    return gamma(dtype, n_terms) * np.asarray(abs_sum, dtype=np.float64) + n_terms * tiny


def adjoint_tolerance(dtype, n_terms: int, abs_sum: float) -> float:
    """Allowed |⟨Ax, y⟩ − ⟨x, Aᵀy⟩|: the sum of two :func:`error_bound`.

    Both sides are computations of the same triple sum Σ_{i,j} y_i A_ij x_j.

    Parameters
    ----------
    dtype : dtype-like
        The working floating dtype.
    n_terms : int
        The rounding depth on either side, at most (length of the inner reduction) +
        (length of the outer inner product) + (number of multiplications per term).
    abs_sum : float
        Σ_{i,j} |y_i| |A_ij| |x_j| = ⟨|A||x|, |y|⟩.

    Returns
    -------
    float
    """
    return float(2.0 * error_bound(dtype, n_terms, abs_sum))


def check_depth(depth: int) -> None:
    """Assert that :data:`GAMMA` bounds two float64 computations of rounding depth ``depth``.

    Parameters
    ----------
    depth : int
        The rounding depth d of an output.

    Raises
    ------
    AssertionError
        When d > :data:`MAX_DEPTH`.
    """
    if depth > MAX_DEPTH:
        raise AssertionError(f"rounding depth {depth} exceeds {MAX_DEPTH}: γ = 128·eps would not bound it")
    assert 2.0 * gamma(np.float64, depth) <= GAMMA * (1 + 1e-12)


def window_gaps(z, err, patch):
    """Argmax margins of a 2×2, stride-2 max pool over ``z``.

    The gap of a window is its best value minus the runner-up; two computations, each within
    ``err`` of the exact values, pick the same argmax when gap > 2·err. Exact ties are allowed
    only where every tied candidate reads an all-zero ``patch`` (it then equals the bias
    exactly in any direct summation, and the first maximum wins).

    Parameters
    ----------
    z : numpy.ndarray
        Pre-pooling values (n, c, h, w), h and w even.
    err : numpy.ndarray
        Their error bounds, same shape.
    patch : numpy.ndarray
        The bias-free Σ|terms| of ``z`` (zero where a candidate reads an all-zero patch).

    Returns
    -------
    ratio : float
        The smallest gap / (2·bound) over the windows without ties (inf when there are none).
    ties : int
        The number of windows with an exact zero-patch tie.

    Raises
    ------
    AssertionError
        When the ratio is ≤ :data:`TIE_SAFETY`, or on an exact tie between candidates that do
        not all read an all-zero patch.
    """
    n, c, h, w = z.shape

    def win(a):
        return a.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)

    zw, ew, pw = win(z), win(err), win(patch)
    top = zw.max(axis=-1, keepdims=True)
    tied = zw == top
    ties = tied.sum(axis=-1) > 1
    if np.any(ties[..., None] & tied & (pw != 0.0)):
        raise AssertionError("an exact argmax tie between non-zero patches")
    rest = np.where(tied, -np.inf, zw).max(axis=-1)
    gap = top[..., 0] - rest
    ok = ~ties & np.isfinite(gap)
    ratio = float(np.min(gap[ok] / (2.0 * np.maximum(ew.max(axis=-1)[ok], 1e-300)))) if np.any(ok) else math.inf
    if ratio <= TIE_SAFETY:
        raise AssertionError(f"an argmax gap within {TIE_SAFETY}× its rounding bound")
    return ratio, int(ties.sum())


def kink_margin(u, err, kinks, what: str = "") -> float:
    """Smallest distance of a pre-activation from a kink of ρ, over its error bound.

    Parameters
    ----------
    u : array_like
        Pre-activations.
    err : array_like
        Their error bounds (broadcast against ``u``).
    kinks : sequence of float
        The kinks of the activation.
    what : str, optional
        Where ``u`` comes from, for the error message.

    Returns
    -------
    float
        min |u − kink| / err.

    Raises
    ------
    AssertionError
        When the ratio is ≤ :data:`TIE_SAFETY`: a computation within the bound could land on
        the other side of the kink.
    """
    d = np.min(np.abs(np.asarray(u)[..., None] - np.asarray(kinks)), axis=-1)
    ratio = float(np.min(d / np.maximum(err, 1e-300)))
    if ratio <= TIE_SAFETY:
        raise AssertionError(f"{what + ': ' if what else ''}a pre-activation lies within {TIE_SAFETY}× "
                             "its rounding bound of a kink")
    return ratio
