"""Fully connected layer and its adjoints (Eq. 2.11 of SPEC.md).

Notation: n batch, i input features, o output features.
"""
from __future__ import annotations

from ..backend import namespace_of

__all__ = ["linear", "linear_transpose", "linear_weight_grad"]


def linear(x, w, b=None):
    """y = x wᵀ + b, Eq. (2.11).

    Parameters: x (n, i); w (o, i); b (o,) or None, all one dtype.
    Returns: y (n, o), same dtype and namespace as x.

    Adjoint
    -------
    ⟨linear(x, w), g⟩ = ⟨x, linear_transpose(g, w)⟩ = ⟨w, linear_weight_grad(x, g)⟩ (b = None).
    """
    xp = namespace_of(x, w, b)
    if x.ndim != 2:
        raise ValueError(f"x must have rank 2 (n, i), got shape {tuple(x.shape)}")
    if w.ndim != 2 or w.shape[1] != x.shape[1]:
        raise ValueError(f"w must have shape (o, {x.shape[1]}), got {tuple(w.shape)}")
    if w.dtype != x.dtype:
        raise ValueError(f"w has dtype {w.dtype} but x has dtype {x.dtype}; expected matching floats")
    y = x @ xp.matrix_transpose(w)  # (n, i) @ (i, o) -> (n, o)
    if b is not None:
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"b must have shape ({w.shape[0]},), got {tuple(b.shape)}")
        if b.dtype != x.dtype:
            raise ValueError(f"b has dtype {b.dtype} but x has dtype {x.dtype}; expected matching floats")
        y = y + b
    return y


def linear_transpose(g, w):
    """Adjoint of :func:`linear` in x: z = g w. g (n, o); w (o, i) -> z (n, i)."""
    namespace_of(g, w)  # raises TypeError when backends are mixed
    if g.ndim != 2 or w.ndim != 2 or g.shape[1] != w.shape[0]:
        raise ValueError(f"g must have shape (n, {w.shape[0]}) for w {tuple(w.shape)}, got {tuple(g.shape)}")
    if w.dtype != g.dtype:
        raise ValueError(f"w has dtype {w.dtype} but g has dtype {g.dtype}; expected matching floats")
    return g @ w


def linear_weight_grad(x, g):
    """Adjoint of :func:`linear` in w: Δw = gᵀ x. x (n, i); g (n, o) -> Δw (o, i)."""
    xp = namespace_of(x, g)
    if x.ndim != 2 or g.ndim != 2 or x.shape[0] != g.shape[0]:
        raise ValueError(f"x (n, i) and g (n, o) must share n; got {tuple(x.shape)} and {tuple(g.shape)}")
    if g.dtype != x.dtype:
        raise ValueError(f"g has dtype {g.dtype} but x has dtype {x.dtype}; expected matching floats")
    return xp.matrix_transpose(g) @ x
