"""Backpropagation through time through the free dynamics, derived by hand (SPEC.md §5).

Forward: s_0 = 0, s_{t+1} = ρ(u_t), u_t = ∂Φ/∂s(s_t) (Eq. 3.8, β = 0), t = 0 … T−1;
loss L = (1/n) Σ_n C(s_T) (Eq. 5.1).

Reverse (argmaxes frozen at the values each forward step used; the activation derivative
ρ' is taken at the stored pre-activations):

    λ_T   = ∂L/∂s_T = (1/n) ∂C/∂s(s_T)
    μ_t   = ρ'(u_t) ⊙ λ_{t+1}                      = ∂L/∂u_t                   (Eq. 5.2)
    λ_t   = (∂u_t/∂s_t)ᵀ μ_t = H_t μ_t                                         (Eq. 5.3)
    ∂L/∂θ += (∂u_t/∂θ)ᵀ μ_t = D_s(∂Φ/∂θ)(s_t)·μ_t                              (Eq. 5.4)

H_t = ∂²Φ/∂s² at frozen argmax is symmetric because Φ is bilinear in neighbouring layers,
so H_t μ is the bias-free, input-free drive of Eq. 3.7 applied to μ:
(H μ)_l = P_l(conv(μ_{l−1}; W_l)) + T_l(μ_{l+1}) with μ_0 = 0, P_l selecting at the argmax.
D_s(∂Φ/∂θ)·μ follows from Eq. 3.9 by the product rule:
∂/∂W_l ← conv2d_weight_grad(μ_{l−1}, P*_l(s_l)) + conv2d_weight_grad(s_{l−1}, P*_l(μ_l)),
∂/∂b_l ← Σ P*_l(μ_l). Parameters that live only in the cost get (1/n) ∂C/∂θ(s_T).

Per-step quantities for the GDU check (Eq. 5.5): for k = 0 … T−1,
∇BPTT_θ(k) is the Eq. 5.4 term of step t = T−1−k and ∇BPTT_s(k) = μ_{T−1−k}.

Gauss–Seidel (Eq. 5.6): a sweep is two block updates, each s'_B = ρ(u_B(s)) on its block B
and s'_j = s_j elsewhere. Backwards through one block update, with λ' = ∂L/∂s':

    μ_B   = ρ'(u_B) ⊙ λ'_B,  μ = 0 off B
    λ_j   = λ'_j + (H μ)_j  for j ∉ B,   λ_B = 0      (H has no block on the diagonal)
    ∂L/∂θ += D_s(∂Φ/∂θ)(s)·μ

and a sweep's per-step quantities are the sums of its two blocks' terms (μ of both blocks).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..backend import Array
from .costs import mean_cost_gradients
from .settle import SCHEDULES, residual, sweep

if TYPE_CHECKING:
    from ..model.crnn import CRNN

__all__ = ["BPTTResult", "bptt", "bptt_gradients"]


@dataclass
class BPTTResult:
    grads: dict  # ∂L/∂θ keyed like net.params
    loss: float
    theta_steps: list = field(default_factory=list)  # ∇BPTT_θ(k), dicts of network params, k = 0 … T−1
    state_steps: list = field(default_factory=list)  # ∇BPTT_s(k) = μ_{T−1−k}, lists per layer
    final_state: list = field(default_factory=list)
    residual: float = float("nan")


def bptt(net: CRNN, x: Array, y: Array, *, T: int, per_step: bool = False,
         schedule: str = "synchronous") -> BPTTResult:
    """Exact gradient of the batch-mean cost after T free steps from zero (Eqs. 5.1-5.4, 5.6).

    Parameters
    ----------
    net : CRNN; x : (n, c, h, w); y : (n,) labels; T : number of free steps (≥ 1).
    per_step : also return the per-step gradients of the GDU check (Eq. 5.5).
    schedule : "synchronous" (Eq. 3.8) or "gauss-seidel" (Eq. 3.13): T steps are T sweeps.

    Returns
    -------
    BPTTResult; ``grads`` is keyed like ``net.params``.
    """
    if int(T) != T or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
    if y is None:
        raise ValueError("bptt needs targets y")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "gauss-seidel":
        return _bptt_gauss_seidel(net, x, y, int(T), per_step)
    xp = net.xp
    n = x.shape[0]
    nudge = net.nudge(x, y)  # β = 0: the cost context for the loss, and B_1(x) for every step
    # forward, storing s_t, u_t and the argmaxes of every step
    s = net.init_state(n)
    tape = []
    last_res = float("nan")
    for t in range(int(T)):
        d = net.drive(x, s, nudge)
        new = [net.act.fn(u) for u in d.u]
        if t == T - 1:
            last_res = residual(new, s)
        tape.append((s, d.u, d.indices))
        s = new
    sT = s
    loss = float(xp.sum(net.cost(x, sT, nudge))) / n
    shapes = [tuple(a.shape) for a in sT]
    lam, grads = mean_cost_gradients(net, sT, nudge, n)  # λ_T and the direct cost-parameter terms
    theta_steps, state_steps = [], []
    for t in range(int(T) - 1, -1, -1):
        s_t, u_t, idx_t = tape[t]
        mu = [lam[l] * net.act.grad(u_t[l]) for l in range(len(shapes))]  # Eq. 5.2
        step = net.dphi_dtheta_tangent(x, s_t, mu, idx_t)  # D_s(∂Φ/∂θ)(s_t)·μ_t
        for k, g in step.items():
            grads[k] = grads[k] + g  # Eq. 5.4
        if per_step:
            theta_steps.append(step)
            state_steps.append(mu)
        lam = net.hessian_vector(mu, idx_t)  # Eq. 5.3
    return BPTTResult(grads, loss, theta_steps, state_steps, sT, last_res)


def _bptt_gauss_seidel(net, x, y, T, per_step) -> BPTTResult:
    """Eqs. 5.1-5.4 through T Gauss–Seidel sweeps (Eq. 5.6): back through each block update in turn."""
    xp = net.xp
    n = x.shape[0]
    nudge = net.nudge(x, y)
    s = net.init_state(n)
    tape = []  # per sweep: [(block, state in, drive)] in forward order
    last_res = float("nan")
    for t in range(T):
        new, blocks = sweep(net, x, s, nudge, "gauss-seidel")
        tape.append(blocks)
        if t == T - 1:
            last_res = residual(new, s)
        s = new
    sT = s
    loss = float(xp.sum(net.cost(x, sT, nudge))) / n
    lam, grads = mean_cost_gradients(net, sT, nudge, n)
    theta_steps, state_steps = [], []
    for t in range(T - 1, -1, -1):
        step: dict = {}
        mu_sweep = [None] * len(lam)
        for block, s_in, d in reversed(tape[t]):
            mu = [lam[l] * net.act.grad(d.u[l]) if l in block else None for l in range(len(lam))]  # Eq. 5.2
            for k, g in net.dphi_dtheta_tangent(x, s_in, mu, d.indices).items():
                step[k] = g if k not in step else step[k] + g
            h = net.hessian_vector(mu, d.indices)  # Eq. 5.3 on the block's μ
            lam = [xp.zeros_like(lam[l]) if l in block else (lam[l] if h[l] is None else lam[l] + h[l])
                   for l in range(len(lam))]
            for l in block:
                mu_sweep[l] = mu[l]
        for k, g in step.items():
            grads[k] = grads[k] + g  # Eq. 5.4
        if per_step:
            theta_steps.append(step)
            state_steps.append(mu_sweep)
    return BPTTResult(grads, loss, theta_steps, state_steps, sT, last_res)


def bptt_gradients(net: CRNN, x: Array, y: Array, *, T: int) -> dict[str, Array]:
    """∂/∂θ of (1/n) Σ_n C(s_T) after T free steps from zero, keyed like ``net.params`` (Eq. 5.1-5.4)."""
    return bptt(net, x, y, T=T).grads
