"""The Lyapunov function of the free dynamics, F(s) = Σ_l c c_l ‖s_l‖² − Φ(s) (Eqs. 3.15, 3.18).

Notation: ρ(u) = clip(u/a, 0, 1), so max ρ' = 1/a and c = a/2; s in the box [0, 1]; Φ the
primitive function (Eq. 3.2), per sample. The fixed points of s ← ρ(∂Φ/∂s) are the blockwise
constrained stationary points of F, and a Gauss–Seidel sweep (Eq. 3.13) never increases it
(an exact block minimisation, or a majorise–minimise step where max pooling sits above);
SPEC.md Eq. 3.15 has the derivation.
"""
from __future__ import annotations

__all__ = ["lyapunov", "quadratic_weight"]


def quadratic_weight(net) -> float:
    """c = 1/(2 max ρ'): ½ for the hard sigmoid (Eq. 2.9), 1 for the half hard sigmoid (Eq. 2.10)."""
    return 0.5 / net.act.max_slope


def lyapunov(net, x, state, nudge=None):
    """F(s) = c Σ_l c_l ‖s_l‖² − Φ(s) per sample, shape (n,) (Eq. 3.15; c_l the energy weights of Eq. 3.18,
    all 1 when the feedback gain is 1); ``nudge`` as for ``net.phi`` (β = 0)."""
    xp = net.xp
    n = x.shape[0]
    c = quadratic_weight(net)
    sq = None
    for s_l, c_l in zip(state, net.layer_weights):
        v = c_l * xp.sum(xp.reshape(s_l * s_l, (n, -1)), axis=1)  # (n, …) -> (n,)
        sq = v if sq is None else sq + v
    return c * sq - net.phi(x, state, nudge)
