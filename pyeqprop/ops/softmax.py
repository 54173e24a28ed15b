"""One-hot targets and the row-wise log-softmax (SPEC.md §3.3, Eq. 3.4).

Notation: n batch, K classes, z (n, K) logits, y (n,) integer labels in [0, K).

    onehot(y)[i, k] = 1 if y_i = k else 0
    log_softmax(z)[i, k] = z_ik − m_i − log Σ_j exp(z_ij − m_i),   m_i = max_j z_ij

Adjoint
-------
∂/∂z of −⟨log_softmax(z), Y⟩ per row is softmax(z) − Y when each row of Y sums to one
(Eq. 3.4): the readouts and the teacher form that difference themselves.
"""
from __future__ import annotations

from ..backend import device_of, namespace_of

__all__ = ["onehot", "log_softmax"]


def onehot(y, num_classes: int, dtype):
    """One-hot rows: y (n,) integer labels -> (n, K) of ``dtype``, Eq. (3.4)."""
    xp = namespace_of(y)
    classes = xp.arange(num_classes, dtype=y.dtype, device=device_of(y))
    return xp.astype(xp.reshape(y, (-1, 1)) == xp.reshape(classes, (1, -1)), dtype)  # (n, 1) == (1, K) -> (n, K)


def log_softmax(z):
    """Row-wise log-softmax of z (n, K), stabilised by the row maximum, Eq. (3.4)."""
    xp = namespace_of(z)
    zmax = xp.max(z, axis=1, keepdims=True)
    zs = z - zmax
    return zs - xp.log(xp.sum(xp.exp(zs), axis=1, keepdims=True))
