"""The spectral radius of the linearised settling step (SPEC.md Eq. 3.17) against a dense oracle.

The oracle is independent of pyeqprop's hand-written Hessian-vector product (Eq. 5.3): Φ (Eq. 3.2)
is rebuilt in torch from the network's parameters, u(s) = ∂Φ/∂s by autograd, and H = ∂u/∂s is
assembled column by column by autograd; J = diag ρ'(u) · H per sample, and its eigenvalues come
from ``numpy.linalg.eigvals``.

Tolerance of the power iteration, derived: A = D^{1/2} H D^{1/2} is symmetric with eigenvalues
λ_i (|λ_1| = ρ(J) = λ*), and K iterations from v_0 = Σ c_i e_i return r = ‖A v_{K−1}‖ with
v_{K−1} ∝ A^{K−1} v_0, so r² = Σ c_i² λ_i^{2K} / Σ c_i² λ_i^{2K−2}. Then
λ*² − r² = Σ c_i² λ_i^{2K−2}(λ*² − λ_i²) / Σ c_i² λ_i^{2K−2}
         ≤ λ*² tan²θ_0 (λ_2/λ*)^{2K−2},
with tan²θ_0 = Σ_{|λ_i|<λ*} c_i² / Σ_{|λ_i|=λ*} c_i² and λ_2 the largest |λ_i| below λ*; and
0 ≤ λ* − r ≤ (λ*² − r²)/λ*. The test computes that bound from the dense eigen-decomposition and
the very start vector, asserts it is small (so the comparison is sharp), and allows it plus
1e-10 of float64 rounding.
"""
from __future__ import annotations

import numpy as np
import pytest

from pyeqprop.learning.settle import settle
from pyeqprop.model.crnn import CRNN
from pyeqprop.model.spectrum import linearisation, step_jacobian_vector, step_radius

torch = pytest.importorskip("torch")
F = torch.nn.functional


def _torch_u(net, x, s_flat, n):
    """u(s) = M⁻¹ ∂Φ_ω/∂s (Eqs. 3.7, 3.18, β = 0) in torch, from the flat per-batch state ``s_flat``:
    Φ_ω = Σ_l ω^{l−L} ⟨B_l(s_{l−1}), s_l⟩ and u_l = ω^{L−l} ∂Φ_ω/∂s_l, written here from the SPEC."""
    P = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in net.params.items()}
    shapes = net.state_shapes(n)
    sizes = [int(np.prod(sh)) for sh in shapes]
    parts = torch.split(s_flat, sizes)
    s = [p.reshape(sh) for p, sh in zip(parts, shapes)]
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64))
    phi = 0.0
    L = len(net.arch.layers)
    weights = [net.feedback ** (l - (L - 1)) for l in range(L)]  # c_l, 0-based l
    for l, desc in enumerate(net.arch.layers):
        below = xt if l == 0 else s[l - 1]
        W, b = P[f"{desc.name}.weight"], P[f"{desc.name}.bias"]
        if desc.kind == "conv":
            z = F.conv2d(below, W, b, padding=desc.padding)
            z = F.max_pool2d(z, 2, 2) if desc.pool == "max" else (F.avg_pool2d(z, 2, 2) if desc.pool == "avg" else z)
        else:
            z = F.linear(below.flatten(1), W, b)
        phi = phi + weights[l] * (z * s[l]).sum()
    (g,) = torch.autograd.grad(phi, s_flat, create_graph=True)
    scale = torch.cat([torch.full((size,), 1.0 / c, dtype=torch.float64) for size, c in zip(sizes, weights)])
    return g * scale


def _dense_jacobians(net, x, state):
    """Per sample: the dense J = diag ρ'(u) H (autograd), and ρ'(u), flattened (sample-major per layer)."""
    n = x.shape[0]
    s0 = torch.from_numpy(np.concatenate([np.asarray(a, np.float64).reshape(-1) for a in state]))
    s0.requires_grad_(True)
    u = _torch_u(net, x, s0, n)
    H = np.stack([torch.autograd.grad(u[i], s0, retain_graph=True)[0].numpy() for i in range(u.numel())])
    lo, hi = net.act.kinks
    un = u.detach().numpy()
    slope = net.act.max_slope * ((un > lo) & (un < hi))
    J = slope[:, None] * H
    # the rows/columns of sample k: within every layer block, its contiguous slice
    shapes = net.state_shapes(n)
    offsets = np.cumsum([0] + [int(np.prod(sh)) for sh in shapes])
    per = []
    for k in range(n):
        idx = np.concatenate([np.arange(offsets[l], offsets[l + 1]).reshape(n, -1)[k] for l in range(len(shapes))])
        per.append((J[np.ix_(idx, idx)], idx))
    return J, per, un


@pytest.fixture(scope="module", params=[1.0, 0.3], ids=["feedback1", "feedback0.3"])
def case(request):
    """A tiny CRNN with a max pool above its first layer (frozen argmaxes matter), an fc layer and a
    dynamical mse output layer, settled from zero on random inputs; weights large enough that J is far from zero;
    at feedback gain 1 and 0.3 (Eq. 3.18)."""
    net = CRNN("c2-c3m-f5", (1, 4, 4), num_classes=3, readout="mse", activation="half_hard_sigmoid",
               dtype="float64", xp="numpy", seed=3, weight_scale=2.5 if request.param == 1.0 else 4.0,
               feedback=request.param)
    x = np.random.default_rng(7).standard_normal((3, 1, 4, 4))
    st = settle(net, x, 400).state
    return net, x, st


def test_jacobian_vector_product_is_the_dense_jacobian_of_the_step(case):
    """Eq. 3.17: J μ = ρ'(u) ⊙ (H μ) equals the autograd Jacobian of s ↦ ρ(u(s)) applied to μ."""
    net, x, st = case
    J, _, un = _dense_jacobians(net, x, st)
    lo, hi = net.act.kinks
    assert np.min(np.minimum(np.abs(un - lo), np.abs(un - hi))) > 1e-6  # no pre-activation at a kink
    slopes, idx = linearisation(net, x, st)
    assert 0.2 < float(np.mean(np.concatenate([s.reshape(-1) > 0 for s in slopes]))) < 1.0  # D has zeros and ones
    rng = np.random.default_rng(0)
    mu = [rng.standard_normal(a.shape) for a in st]
    got = np.concatenate([a.reshape(-1) for a in step_jacobian_vector(net, slopes, idx, mu)])
    want = J @ np.concatenate([a.reshape(-1) for a in mu])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_power_iteration_agrees_with_dense_eigenvalues_within_the_derived_bound(case):
    """Eq. 3.17: per sample, ρ(J) by power iteration on D^{1/2} H D^{1/2} is max |eigvals(J)| within the
    bound derived in the module docstring, from below; and J's eigenvalues are real."""
    net, x, st = case
    _, per, _ = _dense_jacobians(net, x, st)
    slopes, idx = linearisation(net, x, st)
    rng = np.random.default_rng(11)
    start = [rng.standard_normal(a.shape) for a in st]
    v0 = np.concatenate([a.reshape(-1) for a in start])
    K = 400
    est = step_radius(net, slopes, idx, iterations=K, tol=0.0, start=start)
    assert est.iterations == K
    for k, (Jk, rows) in enumerate(per):
        eig = np.linalg.eigvals(Jk)
        assert np.max(np.abs(eig.imag)) < 1e-9  # D H is similar to a symmetric matrix
        lam_star = np.max(np.abs(eig))
        assert lam_star > 0.3  # a non-trivial radius
        # the symmetric A of the same sample and the start vector's components in its eigenbasis
        d = np.sqrt(np.concatenate([a.reshape(-1) for a in slopes])[rows])
        A = d[:, None] * (Jk / np.where(d > 0, d * d, 1.0)[:, None]) * d[None, :]
        lam, vec = np.linalg.eigh(0.5 * (A + A.T))
        c = vec.T @ v0[rows]
        top = np.abs(lam) > lam_star * (1 - 1e-9)
        below = np.abs(lam[~top])
        lam2 = np.max(below) if below.size else 0.0
        tan2 = np.sum(c[~top] ** 2) / np.sum(c[top] ** 2)
        bound = lam_star * tan2 * (lam2 / lam_star) ** (2 * K - 2) + 1e-10
        assert bound < 1e-3, "the bound must be sharp for the comparison to mean something"
        r = est.per_sample[k]
        assert lam_star - bound <= r <= lam_star + 1e-10
    assert est.radius == pytest.approx(max(np.max(np.abs(np.linalg.eigvals(Jk))) for Jk, _ in per), abs=1e-3)


def test_power_iteration_stops_at_its_tolerance_and_rejects_bad_arguments(case):
    net, x, st = case
    slopes, idx = linearisation(net, x, st)
    est = step_radius(net, slopes, idx, iterations=500, tol=1e-6)
    assert est.converged and est.iterations < 500 and np.all(np.abs(est.change) <= 1e-6)
    with pytest.raises(ValueError, match="iterations must be a positive integer, got 0"):
        step_radius(net, slopes, idx, iterations=0)
    with pytest.raises(ValueError, match="tol must be >= 0, got -1"):
        step_radius(net, slopes, idx, tol=-1)


def test_diagnose_spectrum_cli_at_init_and_for_a_run(tmp_path, capsys):
    """``pyeqprop diagnose --spectrum`` prints ρ(J) of Eq. 3.17 for the network of its flags, and for a run
    (its initialisation, best.npz and latest.npz) with the plot; a bad combination is one error line, exit 2."""
    from pyeqprop.cli import main
    from pyeqprop.train.config import TrainConfig
    from pyeqprop.train.loop import train

    assert main(["diagnose", "--spectrum", "--arch", "c2m-c3", "--dataset", "synthetic", "--input-shape", "1,8,8",
                 "--num-classes", "3", "--batch", "4", "--T1", "40", "--init", "orthogonal", "--radius",
                 "0.7"]) == 0
    out = capsys.readouterr().out
    assert "init orthogonal (radius 0.7)" in out
    line = next(ln for ln in out.splitlines() if ln.startswith("initialisation"))
    radius = float(line.split()[2])
    assert 0.3 < radius < 0.8  # near the calibrated 0.7 (some units saturate, argmaxes differ)
    run = tmp_path / "run"
    train(TrainConfig(dataset="synthetic", arch="c3m", T1=8, T2=2, epochs=1, teacher_epochs=0, batch_size=64,
                      local_layers="none", kd_layers="none", progress="none", init="delta-orthogonal",
                      out=str(run)), log=lambda m: None)
    plot = tmp_path / "s.png"
    assert main(["diagnose", "--spectrum", "--run", str(run), "--batch", "4", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "init delta-orthogonal" in out
    assert [ln.split()[0] for ln in out.splitlines() if ln.split() and ln.split()[0] in
            ("initialisation", "best.npz", "latest.npz")] == ["initialisation", "best.npz", "latest.npz"]
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert main(["diagnose", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --run") and "needs --spectrum" in err and len(err.splitlines()) == 1
    assert main(["diagnose", "--spectrum", "--run", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
