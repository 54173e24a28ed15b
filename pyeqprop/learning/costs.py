"""The batch-mean cost's gradients at a state: where every exact gradient (BPTT, Eq. 5.4; the equilibrium
gradient, Eq. 5.7) starts.

Notation: n the batch, s a state, C = Σ_k w_k C_k the total cost (Eq. 3.5) of the network's cost
terms (readout and intermediate signals), L = (1/n) Σ_n C(s).

    λ = ∂L/∂s = (1/n) Σ_k w_k ∂C_k/∂s,     ∂L/∂θ|direct = (1/n) Σ_k w_k Σ_batch ∂C_k/∂θ

The direct part concerns the parameters that live in the cost (readout, heads, maps).
"""
from __future__ import annotations

__all__ = ["mean_cost_gradients"]


def mean_cost_gradients(net, state, nudge, n):
    """(λ, grads): ∂L/∂s per layer and the direct ∂L/∂θ keyed like ``net.params`` (zeros elsewhere), Eq. (3.5).

    ``nudge`` must hold targets (its cost context); ``n`` is the batch size the mean divides by.
    """
    xp = net.xp
    lam = [xp.zeros(tuple(a.shape), dtype=net.dtype, device=net.device) for a in state]
    grads = {k: xp.zeros_like(v) for k, v in net.params.items()}
    for (w_k, term), c in zip(net.cost_terms, nudge.ctx):
        if w_k == 0.0:
            continue
        for l, g in term.state_grads(net.params, state, c).items():
            lam[l] = lam[l] + (w_k / n) * g
        for name, g in term.param_grads(net.params, state, c).items():
            grads[name] = grads[name] + (w_k / n) * g
    return lam, grads
