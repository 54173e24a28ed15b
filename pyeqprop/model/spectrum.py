"""The linearised settling step and its spectral radius, by power iteration on Hessian-vector products (Eq. 3.17).

At a state s with pre-activations u = ∂Φ/∂s(s) and max-pool argmaxes frozen, the synchronous
step s ↦ ρ(u(s)) (Eq. 3.8) has the Jacobian

    J = D H,    D = diag ρ'(u) ≥ 0,    H = ∂²Φ/∂s² (symmetric, Eq. 5.3),

so J μ = ρ'(u) ⊙ (H μ). J is not symmetric, but D H and A = D^{1/2} H D^{1/2} have the same
non-zero eigenvalues (XY and YX with X = D^{1/2}, Y = D^{1/2} H), and A is symmetric: the
eigenvalues of J are real and its spectral radius is ‖A‖₂. Power iteration on A (each
iteration one H-vector product) gives ‖A v_k‖ with v_k = A^k v_0/‖A^k v_0‖, which rises
monotonically to ‖A‖₂ (the ratios of the moments Σ c_i² λ_i^{2k} of a symmetric matrix do).
The samples of a batch do not interact, so J is block diagonal over the batch: every sample
gets its own power iteration, all in the same Hessian-vector products, normalised per sample.

H has no block on its diagonal and couples only neighbouring layers, so its graph is bipartite
(odd against even layers) and the spectrum of A is symmetric about 0: ±λ_max are both
eigenvalues, and the iteration converges in the norm, not in the sign.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import to_numpy

__all__ = ["StepRadius", "linearisation", "step_jacobian_vector", "symmetrised_step", "step_radius"]


@dataclass
class StepRadius:
    """The spectral radius of the linearised step J at a state, per sample (Eq. 3.17).

    per_sample : (n,) float64, the estimate ‖A v_k‖ of each sample (a lower bound that rises to ρ(J)).
    change : (n,) float64, the last iteration's rise of each estimate, relative to it.
    iterations : the power iterations run.
    converged : every relative rise ≤ ``tol`` at the end.
    """

    per_sample: np.ndarray
    change: np.ndarray
    iterations: int
    converged: bool

    @property
    def radius(self) -> float:
        """ρ(J) of the batch: the largest per-sample radius (J is block diagonal over the batch)."""
        return float(np.max(self.per_sample)) if self.per_sample.size else float("nan")

    @property
    def median(self) -> float:
        """The median per-sample radius."""
        return float(np.median(self.per_sample)) if self.per_sample.size else float("nan")


def linearisation(net, x, state, nudge=None) -> tuple[list, list]:
    """(ρ'(u), argmaxes) at ``state``: what J = D H of Eq. (3.17) is built from (β from ``nudge``, 0 when None)."""
    d = net.drive(x, state, nudge)
    return [net.act.grad(u) for u in d.u], list(d.indices)


def step_jacobian_vector(net, slopes, indices, mu) -> list:
    """J μ = ρ'(u) ⊙ ((∂u/∂s) μ): the linearised synchronous step (Eq. 3.17) applied to μ; ∂u/∂s = H
    (Eq. 5.3) when the feedback gain ω is 1, M⁻¹H_Φ otherwise (Eq. 3.18)."""
    return [g * h for g, h in zip(slopes, net.jacobian_vector(list(mu), indices))]


def symmetrised_step(net, root, indices, v) -> list:
    """A v = D^{1/2} S D^{1/2} v with ``root`` = ρ'(u)^{1/2} per layer and S = M^{−1/2} H_Φ M^{−1/2} (= H when
    ω = 1; Eq. 3.18): the symmetric operator similar to J
    (Eq. 3.17)."""
    return [r * h for r, h in zip(root, net.symmetric_hessian_vector([r * vi for r, vi in zip(root, v)], indices))]


def _per_sample_norm(xp, v):
    """‖v‖ of each sample over all layers, shape (n,)."""
    total = None
    for a in v:
        sq = xp.sum(xp.reshape(a * a, (a.shape[0], -1)), axis=1)
        total = sq if total is None else total + sq
    return xp.sqrt(total)


def _scale(xp, v, norm):
    """v with each sample divided by its norm (a zero sample stays zero)."""
    inv = xp.where(norm > 0, 1.0 / xp.where(norm > 0, norm, 1.0), 0.0)
    return [a * xp.reshape(xp.astype(inv, a.dtype), (a.shape[0],) + (1,) * (a.ndim - 1)) for a in v]


def step_radius(net, slopes, indices, *, iterations: int = 300, tol: float = 1e-4, start=None,
                rng: np.random.Generator | None = None) -> StepRadius:
    """ρ(J) per sample of J = D H at ``slopes`` = ρ'(u) and frozen ``indices`` by power iteration on A (Eq. 3.17).

    Parameters
    ----------
    net : the network whose ``hessian_vector`` gives H (Eq. 5.3).
    slopes, indices : from :func:`linearisation` (or any D ≥ 0 and argmaxes of the network's state shapes).
    iterations : the most power iterations; tol : stop once every sample's estimate rose by at most
        ``tol`` (relative) in the last iteration (0: run all ``iterations``).
    start : v_0 per layer (default: standard normal from ``rng``, default ``default_rng(0)``).

    Returns
    -------
    :class:`StepRadius`.
    """
    if int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be a positive integer, got {iterations!r}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol!r}")
    xp = net.xp
    root = [xp.sqrt(g) for g in slopes]
    if start is None:
        rng = np.random.default_rng(0) if rng is None else rng
        start = [xp.asarray(rng.standard_normal(tuple(g.shape)).astype(net.dtype_name), device=net.device)
                 for g in slopes]
    v = _scale(xp, list(start), _per_sample_norm(xp, start))
    prev = None
    est = change = np.zeros(0)
    for k in range(1, int(iterations) + 1):
        w = symmetrised_step(net, root, indices, v)
        norm = _per_sample_norm(xp, w)
        est = np.asarray(to_numpy(norm), dtype=np.float64)
        if prev is not None:
            change = np.where(est > 0, (est - prev) / np.where(est > 0, est, 1.0), 0.0)
            if tol > 0 and np.all(np.abs(change) <= tol):
                return StepRadius(est, change, k, True)
        prev = est
        v = _scale(xp, w, norm)
    if prev is None or change.size == 0:
        change = np.zeros_like(est)
    return StepRadius(est, change, int(iterations), bool(tol > 0 and np.all(np.abs(change) <= tol)))
