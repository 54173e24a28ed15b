"""The GDU check (SPEC.md Eq. 4.5): per-step EP updates against per-step BPTT gradients.

Notation: s^0 the free state after T1 steps from zero (Eq. 3.8, β = 0); s^β_0 = s^0 and
s^β_{t+1} = ρ(∂Φ^β/∂s(s^β_t)) the nudged phase; G(s) = Σ_batch ∂Φ/∂θ(s) (Eq. 3.9); n the batch.
Per-step EP deltas, normalised to the batch-mean loss that BPTT differentiates (Eq. 5.1):

    ΔEP_θ(β, t) = (1/(β n)) [G(s^β_{t+1}) − G(s^β_t)]
    ΔEP_s(β, t) = (1/(β n)) (s^β_{t+1} − s^β_t)
    symmetric:    ½ [ΔEP(β, t) + ΔEP(−β, t)]

The GDU statement (Eq. 4.5): if the free phase has converged, ΔEP_θ(β, t) → −∇BPTT_θ(t) and
ΔEP_s(β, t) → −∇BPTT_s(t) as β → 0 for every t < K, where ∇BPTT_θ(t) and ∇BPTT_s(t) = μ_{T−1−t}
are the per-step BPTT quantities of Eq. 5.5 with T = T1 (``bptt(per_step=True)``). Summed over
t < K the EP deltas give the usual EP estimate after K nudged steps, and the BPTT terms give
BPTT truncated to its last K steps.

Measures per tensor (E = EP deltas, B = −∇BPTT, both of shape (K, …)):

* ``sum_rel_error``  ‖Σ_t E − Σ_t B‖ / ‖Σ_t B‖ (L2 over the tensor);
* ``rel_rmse``       Laborieux et al. (2021): per element √mean_t (E − B)² / max(√mean_t E², √mean_t B²),
                     averaged over the elements where the denominator is not zero;
* ``sign_agreement`` 1 − (fraction of (t, element) pairs with E·B < 0), the complement of their
                     sign error (pairs where either side is exactly zero do not count as errors).
                     Late steps whose updates have decayed to round-off (about u·|∂Φ/∂θ|/β) count
                     too, so with a fast-contracting network and a large K it stays slightly below 1.

Contraction bounds (used to choose a weight scale under which the free phase converges):
for fixed argmaxes the dynamics s ↦ ρ(u(s)) has Jacobian diag(ρ′)·H, H = ∂²Φ/∂s², a symmetric
block-tridiagonal matrix whose off-diagonal blocks are the bias-free bottom-up maps A_l
(pooling included). With a_l ≥ ‖A_l‖₂, ‖H‖₂ ≤ ‖M‖₂ for the L×L tridiagonal matrix M of the
a_l (the norm of a block matrix is at most the norm of its matrix of block norms), so
Lip ≤ max ρ′ · ‖M‖₂. For a conv, ‖A_l‖ ≤ π_l Σ_{a,b} ‖W_l[:, :, a, b]‖₂ (each kernel tap is a
zero-padded shift, a partial isometry, times a channel mixing), π_l = 1 for max selection
or none, ½ for 2×2 average pooling; for fc, ‖W_l‖₂. Across an argmax flip the top-down
signal jumps, so this bounds the contraction within each piece; convergence is verified by
the residual (Eq. 3.11), which every caller reports.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import numpy as np

from ._figure import colour_cycle, new_figure

from ..backend import asarray, to_numpy
from ..model.readout import READOUTS
from ..ops.activations import ACTIVATIONS

__all__ = ["GDURow", "GDUCurve", "GDUReport", "gdu_check", "format_table", "plot_gdu", "add_gdu_arguments",
           "run_gdu_cli", "block_norm_bounds", "tridiagonal_norm", "lipschitz_bound", "activation_slope",
           "contracting_weight_scale"]

_ESTIMATORS = ("one-sided", "symmetric")


# --------------------------------------------------------------------------- contraction bounds
def activation_slope(net) -> float:
    """max ρ′ of the network's activation (1 for hard_sigmoid, ½ for half_hard_sigmoid)."""
    return net.act.max_slope


def block_norm_bounds(net, params=None) -> list[float]:
    """a_l ≥ ‖A_l‖₂ for every neuron layer's bias-free bottom-up map (module docstring).

    ``params``: a mapping like ``net.params`` to use instead (e.g. |θ| or a direction).
    """
    params = net.params if params is None else params
    out = []
    for layer in net.layers:
        W = np.asarray(to_numpy(params[f"{layer.name}.weight"]), dtype=np.float64)
        if W.ndim == 4:  # (o, c, k, k): one channel-mixing matrix per kernel tap
            taps = sum(np.linalg.norm(W[:, :, a, b], 2) for a in range(W.shape[2]) for b in range(W.shape[3]))
            out.append(float(taps) * (0.5 if layer.pool == "avg" else 1.0))
        else:  # (out, in)
            out.append(float(np.linalg.norm(W, 2)))
    return out


def tridiagonal_norm(a: list[float]) -> float:
    """‖M‖₂ for M symmetric tridiagonal with M[l−1, l] = a_l (l ≥ 1); a_0 couples to the input."""
    L = len(a)
    M = np.zeros((L, L))
    for l in range(1, L):
        M[l - 1, l] = M[l, l - 1] = a[l]
    return float(np.linalg.norm(M, 2)) if L > 1 else 0.0


def lipschitz_bound(net, *, beta: float = 0.0) -> float:
    """Bound on the Lipschitz constant of s ↦ ρ(∂Φ^β/∂s) within a piece of fixed argmaxes.

    max ρ′ · (‖M‖₂ + |β| κ), where κ bounds the cost Hessian in s: 1 for the mse readout
    (C = ½‖s_L − y‖²), ‖W_out‖₂² for softmax (∂²C/∂s_L² = W_outᵀ (diag p − p pᵀ) W_out and
    ‖diag p − p pᵀ‖₂ ≤ 1). Intermediate cost terms are not included.
    """
    kappa = 1.0
    if net.readout == "softmax":
        W = np.asarray(to_numpy(net.params[f"{net.arch.readout.name}.weight"]), dtype=np.float64)
        kappa = float(np.linalg.norm(W, 2)) ** 2
    return activation_slope(net) * (tridiagonal_norm(block_norm_bounds(net)) + abs(beta) * kappa)


def contracting_weight_scale(net, *, target: float = 0.4) -> float:
    """The weight_scale that makes the β = 0 bound of :func:`lipschitz_bound` equal ``target``
    for a net created like ``net`` (weights scale linearly with weight_scale; biases do not)."""
    free = lipschitz_bound(net) / net.weight_scale
    if free == 0.0:
        return 1.0
    return target / free


# --------------------------------------------------------------------------- the check
@dataclass
class GDURow:
    """One tensor (a parameter, or a neuron layer 's<l>') under one estimator."""

    estimator: str
    tensor: str
    shape: tuple
    sum_rel_error: float
    rel_rmse: float
    sign_agreement: float


@dataclass
class GDUCurve:
    """Cumulative sums over t of one element's updates: BPTT (−Σ∇BPTT_θ) and EP at +β, −β and symmetric."""

    tensor: str
    index: tuple
    bptt: np.ndarray  # (K,)
    ep: dict  # {"+β": (K,), "−β": (K,), "symmetric": (K,)}


@dataclass
class GDUReport:
    rows: list
    curves: list
    beta: float
    T1: int
    K: int
    free_residual: float
    deltas: dict = field(default_factory=dict)  # {"+β"|"−β"|"symmetric"|"bptt": {tensor: (K, …) host array}}
    exact_rel_error: dict = field(default_factory=dict)  # {"bptt"|estimator: ‖Σ_K − g*‖/‖g*‖}, g* of Eq. 5.7


def _host64(a) -> np.ndarray:
    return np.asarray(to_numpy(a), dtype=np.float64)


def _nudged_deltas(net, x, y, free_state, b, K, names):
    """ΔEP_θ(b, t) and ΔEP_s(b, t) for t < K (module docstring), as host arrays of shape (K, …)."""
    n = x.shape[0]
    s = list(free_state)
    G = net.dphi_dtheta(x, s)
    theta = {k: [] for k in names}
    states = {f"s{l + 1}": [] for l in range(len(s))}
    for _ in range(K):
        s_new = net.step(x, s, net.nudge(x, y, b))
        G_new = net.dphi_dtheta(x, s_new)
        for k in names:
            theta[k].append((_host64(G_new[k]) - _host64(G[k])) / (b * n))
        for l in range(len(s)):
            states[f"s{l + 1}"].append((_host64(s_new[l]) - _host64(s[l])) / (b * n))
        s, G = s_new, G_new
    out = {k: np.stack(v) for k, v in theta.items()}
    out.update({k: np.stack(v) for k, v in states.items()})
    return out


def _measures(E: np.ndarray, B: np.ndarray) -> tuple[float, float, float]:
    """(sum_rel_error, rel_rmse, sign_agreement) of EP deltas E against −BPTT B, both (K, …)."""
    sE, sB = E.sum(axis=0), B.sum(axis=0)
    nB = float(np.linalg.norm(sB))
    nD = float(np.linalg.norm(sE - sB))
    sum_rel = nD / nB if nB > 0 else (0.0 if nD == 0 else math.inf)
    rms_d = np.sqrt(np.mean((E - B) ** 2, axis=0))
    den = np.maximum(np.sqrt(np.mean(E ** 2, axis=0)), np.sqrt(np.mean(B ** 2, axis=0)))
    ok = den > 0
    rel_rmse = float(np.mean(rms_d[ok] / den[ok])) if np.any(ok) else 0.0
    sign = 1.0 - float(np.mean(E * B < 0))
    return sum_rel, rel_rmse, sign


def gdu_check(net, x, y, *, beta, T1, K, estimators=_ESTIMATORS, plot_elements: int = 3) -> GDUReport:
    """Compare per-step EP updates with per-step BPTT gradients (Eq. 4.5; module docstring).

    Parameters
    ----------
    net : CRNN; x : (n, c, h, w) and y : (n,) in the network's namespace and dtype.
    beta : float > 0, the nudge; T1 : free steps (and the BPTT horizon); K : nudged steps, 1 ≤ K ≤ T1.
    estimators : any of "one-sided" (+β) and "symmetric" (±β).
    plot_elements : elements per weight tensor kept as curves for :func:`plot_gdu`.

    Returns
    -------
    GDUReport: one row per (estimator, tensor) for every network parameter and neuron layer,
    curves of cumulative updates, and the free phase's last residual (Eq. 3.11).
    """
    from ..learning.bptt import bptt
    from ..learning.implicit import equilibrium_gradient
    from ..learning.settle import settle

    for e in estimators:
        if e not in _ESTIMATORS:
            raise ValueError(f"estimator must be one of {_ESTIMATORS}, got {e!r}")
    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive finite number, got {beta!r}")
    if int(T1) != T1 or T1 < 1:
        raise ValueError(f"T1 must be a positive integer, got {T1!r}")
    if int(K) != K or not 1 <= K <= T1:
        raise ValueError(f"K must be an integer with 1 <= K <= T1 = {T1}, got {K!r}")
    T1, K = int(T1), int(K)
    free = settle(net, x, T1)
    ref = bptt(net, x, y, T=T1, per_step=True)
    names = net.network_param_names()
    B = {k: -np.stack([_host64(ref.theta_steps[t][k]) for t in range(K)]) for k in names}
    for l in range(len(net.layers)):
        B[f"s{l + 1}"] = -np.stack([_host64(ref.state_steps[t][l]) for t in range(K)])
    plus = _nudged_deltas(net, x, y, free.state, float(beta), K, names)
    minus = _nudged_deltas(net, x, y, free.state, -float(beta), K, names)
    sym = {k: 0.5 * (plus[k] + minus[k]) for k in plus}
    by_est = {"one-sided": plus, "symmetric": sym}
    rows = []
    for est in estimators:
        for k in B:
            rows.append(GDURow(est, k, tuple(B[k].shape[1:]), *_measures(by_est[est][k], B[k])))
    curves = []
    for k in names:
        if not k.endswith(".weight"):
            continue
        total = np.abs(B[k].sum(axis=0)).ravel()
        for flat in np.argsort(-total, kind="stable")[:plot_elements]:
            idx = np.unravel_index(int(flat), B[k].shape[1:])
            sel = (slice(None),) + tuple(int(i) for i in idx)
            curves.append(GDUCurve(k, tuple(int(i) for i in idx), np.cumsum(B[k][sel]),
                                   {"+β": np.cumsum(plus[k][sel]), "−β": np.cumsum(minus[k][sel]),
                                    "symmetric": np.cumsum(sym[k][sel])}))
    deltas = {"+β": plus, "−β": minus, "symmetric": sym, "bptt": B}
    exact = equilibrium_gradient(net, x, y, T1=T1, free_state=free.state).grads
    ex = np.concatenate([_host64(exact[k]).ravel() for k in names])
    norm = float(np.linalg.norm(ex)) or 1.0

    def rel(total):  # total: the summed per-step quantity, negated to the gradient's sign
        return float(np.linalg.norm(np.concatenate([np.ravel(total[k]) for k in names]) - ex)) / norm

    to_exact = {"bptt": rel({k: -B[k].sum(axis=0) for k in names}),
                **{e: rel({k: -by_est[e][k].sum(axis=0) for k in names}) for e in estimators}}
    return GDUReport(rows, curves, float(beta), T1, K, float(free.residual), deltas, to_exact)


def format_table(rows) -> str:
    """A plain-text table of GDU rows (accepts a GDUReport or a list of GDURow)."""
    rows = rows.rows if isinstance(rows, GDUReport) else rows
    head = ("estimator", "tensor", "shape", "sum rel err", "rel RMSE", "sign agree")
    body = [(r.estimator, r.tensor, "×".join(map(str, r.shape)), f"{r.sum_rel_error:.3e}", f"{r.rel_rmse:.3e}",
             f"{r.sign_agreement:.4f}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) for h, w in zip(head, widths))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))) for b in body]
    return "\n".join(out)


def plot_gdu(curves, path) -> str:
    """Draw cumulative EP updates (+β, −β, symmetric) against cumulative −∇BPTT_θ over the K
    steps, one panel per weight tensor, a few elements each; write a PNG to ``path``.

    ``curves``: a GDUReport or a list of GDUCurve. Returns ``str(path)``.
    """
    curves = curves.curves if isinstance(curves, GDUReport) else list(curves)
    tensors = list(dict.fromkeys(c.tensor for c in curves))
    fig, axes = new_figure('the GDU check', 1, max(1, len(tensors)), figsize=(4.0 * max(1, len(tensors)), 3.4),
                           squeeze=False)
    colours = colour_cycle()
    for ax, name in zip(axes[0], tensors):
        mine = [c for c in curves if c.tensor == name]
        for j, c in enumerate(mine):
            col = colours[j % len(colours)]
            t = np.arange(len(c.bptt) + 1)  # cumulative sums start at 0 before the first nudged step
            z = lambda v: np.concatenate([[0.0], v])  # noqa: E731
            ax.plot(t, z(c.bptt), color="black", lw=2.5, alpha=0.35, label="−Σ∇BPTT" if j == 0 else None)
            ax.plot(t, z(c.ep["+β"]), color=col, ls="--", label="EP +β" if j == 0 else None)
            ax.plot(t, z(c.ep["−β"]), color=col, ls=":", label="EP −β" if j == 0 else None)
            ax.plot(t, z(c.ep["symmetric"]), color=col, ls="-", lw=1, label="EP symmetric" if j == 0 else None)
        ax.set_title(name)
        ax.set_xlabel("t (nudged steps)")
        ax.axhline(0.0, color="grey", lw=0.5)
    axes[0][0].set_ylabel("cumulative update")
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    return str(path)


# --------------------------------------------------------------------------- command line
def add_gdu_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``gdu-check`` options to ``parser`` and return it."""
    parser.add_argument("--arch", default="c8m-c16m", help="spec string or preset (default: c8m-c16m)")
    parser.add_argument("--input-shape", default="1,8,8", help="c,h,w of the synthetic input (default 1,8,8)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--readout", choices=tuple(READOUTS), default="mse")
    parser.add_argument("--activation", choices=tuple(ACTIVATIONS), default="hard_sigmoid")
    parser.add_argument("--beta", type=float, default=1e-3, help="nudge β > 0 (default 1e-3)")
    parser.add_argument("--T1", type=int, default=60, help="free steps and BPTT horizon (default 60)")
    parser.add_argument("--K", type=int, default=20, help="nudged steps compared (default 20)")
    parser.add_argument("--batch", type=int, default=20, help="synthetic samples (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the synthetic data")
    parser.add_argument("--weight-scale", default="auto",
                        help="weight_scale, or 'auto' for the scale whose contraction bound is 0.4")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write the cumulative-update plot (PNG)")
    return parser


CONVERGED = 1e-10
"""Free-phase residual (Eq. 3.11) above which the CLI reports that the GDU premise fails."""


def run_gdu_cli(args) -> int:
    """Run the GDU check on synthetic float64 data (uniform [0, 1) inputs, random labels) and
    print the table. Returns 0, or 1 when the free phase has not converged (residual > 1e-10)."""
    from ..model.crnn import CRNN

    try:
        shape = tuple(int(v) for v in str(args.input_shape).split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"--input-shape must be three integers c,h,w, got {args.input_shape!r}")

    def make(scale):
        return CRNN(args.arch, shape, num_classes=args.num_classes, readout=args.readout,
                    activation=args.activation, dtype="float64", xp="numpy", seed=args.seed, weight_scale=scale)

    if str(args.weight_scale) == "auto":
        scale = contracting_weight_scale(make(1.0), target=0.4)
    else:
        scale = float(args.weight_scale)
    net = make(scale)
    rng = np.random.default_rng(args.seed)
    x = asarray(rng.random((args.batch, *shape)), xp="numpy", dtype="float64")
    y = asarray(rng.integers(0, args.num_classes, size=args.batch), xp="numpy")
    rep = gdu_check(net, x, y, beta=args.beta, T1=args.T1, K=args.K)
    print(f"GDU check (Eq. 4.5): arch {args.arch!r}, input {shape}, readout {args.readout}, {args.activation}, "
          f"batch {args.batch}, weight_scale {scale:.4g} (contraction bound {lipschitz_bound(net):.3f})")
    print(f"beta {args.beta:g}, T1 {args.T1}, K {args.K}; free-phase residual {rep.free_residual:.2e}")
    print(format_table(rep))
    print("against the equilibrium gradient (Eq. 5.7) at the free state, relative error of the network's "
          f"summed updates: BPTT over the last K steps {rep.exact_rel_error['bptt']:.2e}, "
          + ", ".join(f"{e} EP over K {v:.2e}" for e, v in rep.exact_rel_error.items() if e != "bptt"))
    if args.plot:
        print(f"plot written to {plot_gdu(rep, args.plot)}")
    if not rep.free_residual <= CONVERGED:
        print(f"warning: the free phase has not converged (residual {rep.free_residual:.2e} > {CONVERGED:g}); "
              "the GDU property assumes it has: raise --T1 or lower --weight-scale")
        return 1
    return 0
