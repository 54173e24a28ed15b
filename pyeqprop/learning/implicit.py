"""The exact equilibrium gradient by implicit differentiation (recurrent backprop, Almeida–Pineda; Eq. 5.7).

Notation: s* a fixed point of the free dynamics, s* = ρ(u(s*)) with u = ∂Φ/∂s (Eq. 3.7);
D = diag ρ'(u*) (entries 0 or the slope 1/a of ρ); H = ∂²Φ/∂s² at the argmaxes of s* (symmetric,
Eq. 5.3); g = (1/n) Σ_k w_k ∂C_k/∂s(s*); L = (1/n) Σ_n C(s*).

Differentiating s* = ρ(u(s*, θ)) gives ds*/dθ = (I − DH)⁻¹ D ∂u/∂θ, hence

    ∂L/∂θ = (∂u/∂θ)ᵀ μ + (1/n) Σ_k w_k ∂C_k/∂θ,     (I − DH) μ = D g        (Eq. 5.7)

μ lives on the units where ρ' > 0. With μ = D^{1/2} ν the system is symmetric,

    A ν = D^{1/2} g,   A = I − D^{1/2} H D^{1/2},

With a feedback gain ω < 1 (Eq. 3.18) ∂u/∂s = M⁻¹H_Φ is not symmetric (M = diag c_l); with
S = M^{−1/2} H_Φ M^{−1/2} the system reads (I − D M^{1/2} S M^{−1/2}) μ = D g, and μ = M^{1/2} D^{1/2} ν
gives A ν = D^{1/2} M^{−1/2} g with A = I − D^{1/2} S D^{1/2}; for ω = 1, S = H and M = I.

and A is positive definite exactly when every eigenvalue of the linearised step J = DH is below
1 (J and D^{1/2} H D^{1/2} are similar); at a stable fixed point of a network whose J has
spectral radius < 1 (a contracting or settled net) it is, and conjugate gradients solve it with
Hessian-vector products only (``net.hessian_vector``): Array API, no SciPy, so CuPy runs it.
The solve stops on the residual of the system in μ, D g − (I − D M^{1/2} S M^{−1/2}) μ = M^{1/2} D^{1/2}(b − Aν), not
on b − Aν: ν_l = μ_l / (c_l D_l)^{1/2} shrinks like ω^{(L−l)/2} down the layers, so a stop in ν
ignores the bottom layers, and conjugate gradients (one layer further per iteration) could stop
before reaching them.
(∂u/∂θ)ᵀ μ is ``net.dphi_dtheta_tangent`` (Eq. 5.4). This is what BPTT (§5) gives after
infinitely many steps from a start in the basin of s*, and what EP estimates as β → 0 (Eq. 4.4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..backend import to_numpy
from .costs import mean_cost_gradients
from .settle import FIXED, Settled, Settling, settle

__all__ = ["ImplicitResult", "equilibrium_gradient", "conjugate_gradient"]


@dataclass
class ImplicitResult:
    """The equilibrium gradient and how it was obtained.

    grads : ∂L/∂θ keyed like ``net.params``; loss : L at s*; free : the settled free phase;
    iterations, rel_residual : of the conjugate-gradient solve, the residual of the system in μ,
    ‖D g − (I − D M^{1/2} S M^{−1/2}) μ‖ / ‖D g‖ = ‖M^{1/2} D^{1/2}(b − Aν)‖ / ‖M^{1/2} D^{1/2} b‖;
    solved : whether the solve reached ``rtol``. The result is the gradient at a fixed point only
    when the free phase converged too (``free.converged``; None for a fixed count: look at
    ``free.residual``).
    """

    grads: dict
    loss: float
    free: Settled
    iterations: int = 0
    rel_residual: float = float("nan")
    solved: bool = False
    mu: list = field(default_factory=list)


def _sums(xp, *terms) -> list[float]:
    """The sum over every block and axis of each list of arrays in ``terms``, as host floats, in one transfer."""
    return [float(v) for v in to_numpy(xp.stack([xp.sum(xp.stack([xp.sum(t) for t in blocks]))
                                                 for blocks in terms])).tolist()]


def conjugate_gradient(apply, b, *, rtol: float, max_iter: int, xp, weights=None):
    """Solve A ν = b for a symmetric positive definite A given as ``apply(v) = A v``, on lists of arrays.

    Stops when ‖w ⊙ r‖ ≤ rtol·‖w ⊙ b‖ or after ``max_iter`` iterations, r = b − Aν; returns
    (ν, iterations, ‖w ⊙ r‖/‖w ⊙ b‖). ``weights`` w (one array or number per block, broadcast
    against it; default all 1) choose the norm the stop is measured in: for a system symmetrised
    by a diagonal change of variables, w = the change's factors gives the residual of the system
    as first written (Eq. 5.7). A non-positive curvature pᵀAp ≤ 0 (A not positive definite) stops
    the iteration at once. Each iteration makes one product A p and two host transfers.
    """
    if weights is not None and len(weights) != len(b):
        raise ValueError(f"conjugate_gradient: {len(weights)} weights for {len(b)} blocks of b")
    w2 = None if weights is None else [c * c for c in weights]

    def norms(r):  # (‖r‖², ‖w ⊙ r‖²), one transfer
        if w2 is None:
            (rr,) = _sums(xp, [u * u for u in r])
            return rr, rr
        rr, ww = _sums(xp, [u * u for u in r], [c * u * u for u, c in zip(r, w2)])
        return rr, ww

    nu = [xp.zeros_like(v) for v in b]
    r = list(b)
    p = list(r)
    rr, ww = norms(r)
    bnorm = math.sqrt(ww)
    if bnorm == 0.0:
        return nu, 0, 0.0
    it = 0
    while it < max_iter and math.sqrt(ww) > rtol * bnorm:
        Ap = apply(p)
        (pAp,) = _sums(xp, [u * v for u, v in zip(p, Ap)])
        if not pAp > 0.0:
            break
        alpha = rr / pAp
        nu = [v + alpha * q for v, q in zip(nu, p)]
        r = [v - alpha * q for v, q in zip(r, Ap)]
        rr_new, ww = norms(r)
        p = [v + (rr_new / rr) * q for v, q in zip(r, p)]
        rr = rr_new
        it += 1
    return nu, it, math.sqrt(ww) / bnorm


def equilibrium_gradient(net, x, y, *, T1, settling: Settling = FIXED, free_state=None, rtol=None,
                         max_iter=1000) -> ImplicitResult:
    """∂/∂θ of the batch-mean cost at the free fixed point s*, by Eq. 5.7.

    Parameters
    ----------
    net : CRNN; x : (n, c, h, w); y : (n,) labels.
    T1 : the most free steps (settling to ``settling.tol``), or the count when tol = 0.
    settling : how the free phase settles; the result is the gradient at a fixed point only when
        it converged (``free.converged``, or a small ``free.residual`` for a fixed count).
    free_state : an already settled free state to use instead.
    rtol : relative residual of the solve, measured in μ (``rel_residual``); default 1000·eps of the
        network's dtype.
    max_iter : most conjugate-gradient iterations.

    Returns
    -------
    :class:`ImplicitResult`.
    """
    if y is None:
        raise ValueError("the equilibrium gradient needs targets y")
    xp = net.xp
    n = x.shape[0]
    nudge = net.nudge(x, y)
    if free_state is None:
        free = settle(net, x, T1, nudge=nudge, settling=settling)
    else:
        net.check_state(free_state, n)
        free = Settled(list(free_state), float("nan"), [], 0)  # settled elsewhere
    s = free.state
    rtol = 1000.0 * float(np.finfo(np.dtype(net.dtype_name)).eps) if rtol is None else float(rtol)
    d = net.drive(x, s, nudge)  # β = 0: u* and the argmaxes of s*
    half = [xp.sqrt(net.act.grad(u)) for u in d.u]  # D^{1/2}
    g, grads = mean_cost_gradients(net, s, nudge, n)  # g = ∂L/∂s at s*, and the cost-only parameters' terms
    loss = float(to_numpy(xp.sum(net.cost(x, s, nudge)))) / n
    root_c = [c ** 0.5 for c in net.layer_weights]  # M^{1/2} (all 1 when ω = 1)

    def apply(v):  # A v = v − D^{1/2} S D^{1/2} v
        hv = net.symmetric_hessian_vector([h * a for h, a in zip(half, v)], d.indices)
        return [a - h * b for a, h, b in zip(v, half, hv)]

    b = [(h * a) / rc for h, a, rc in zip(half, g, root_c)]  # D^{1/2} M^{−1/2} g
    to_mu = [rc * h for h, rc in zip(half, root_c)]  # M^{1/2} D^{1/2}: the stop measures the system in μ
    nu, it, rel = conjugate_gradient(apply, b, rtol=rtol, max_iter=max_iter, xp=xp, weights=to_mu)
    mu = [m * a for m, a in zip(to_mu, nu)]  # μ = M^{1/2} D^{1/2} ν
    for k, v in net.dphi_dtheta_tangent(x, s, mu, d.indices).items():
        grads[k] = grads[k] + v
    return ImplicitResult(grads, loss, free, it, rel, rel <= rtol, mu)
