"""Saturated neurons at a state: the units where ρ' = 0 and no learning signal passes (SPEC.md Eq. 3.19).

Notation: s_l (n, c_l, h_l, w_l) or (n, d_l) the state of neuron layer l after at least one step,
so s_l = ρ(u_l) entrywise; ρ = clip(u/a, 0, 1) (Eqs. 2.9-2.10) with values ρ_lo = 0 below its
linear piece and ρ_hi = 1 above it, where ρ'(u) = 0 (kinks included).
"""
from __future__ import annotations

__all__ = ["saturated_counts"]


def saturated_counts(net, state) -> list:
    """Per neuron layer, the number of entries of s_l at ρ_lo and at ρ_hi, on the device (Eq. 3.19).

    σ_l^− = #{i : s_{l,i} = ρ_lo} / |s_l|,   σ_l^+ = #{i : s_{l,i} = ρ_hi} / |s_l|.

    Since s_l = ρ(u_l), s_{l,i} = ρ_lo exactly when u_{l,i} is at or below the lower kink and
    ρ_hi exactly when it is at or above the upper one: the units with ρ'(u) = 0, whose rows of the
    step's Jacobian J = diag ρ'(u) H (Eq. 3.17) vanish, so neither a nudge (§4) nor a BPTT
    adjoint (5.2) reaches their inputs through them while they stay there. clip returns its bounds
    exactly, so the comparison needs no tolerance.

    Parameters
    ----------
    net : CRNN (its activation's ``saturated_values``).
    state : list of L arrays, s_l as above, on ``net``'s backend.

    Returns
    -------
    list of L pairs (n_lo, n_hi), 0-d int64 arrays on ``net``'s backend (no host transfer; exact
    counts at any size); |s_l| is the product of ``state[l].shape``.
    """
    xp = net.xp
    lo, hi = net.act.saturated_values
    return [(xp.sum(xp.astype(s == lo, xp.int64)), xp.sum(xp.astype(s == hi, xp.int64))) for s in state]
