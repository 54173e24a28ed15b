"""Unit tests of the GDU diagnostic (``pyeqprop.diagnostics.gdu``, SPEC.md Eq. 4.5).

The β → 0 rates themselves are reference properties (reference_tests/test_crnn_properties.py);
here the diagnostic must report what they imply at β = 1e-3 (symmetric error ≤ 1e-4, the bound
asserted there), its deltas must telescope to the EP and BPTT gradients exactly (up to round-off),
a broken premise (unconverged free phase) must show, and the table, plot and CLI must work.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest

import pyeqprop
from pyeqprop import backend
from pyeqprop.diagnostics import (
    add_gdu_arguments,
    contracting_weight_scale,
    format_table,
    gdu_check,
    lipschitz_bound,
    plot_gdu,
    run_gdu_cli,
)

U = float(np.finfo(np.float64).eps) / 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _setup(readout="mse", activation="hard_sigmoid", n=4):
    def make(scale):
        return pyeqprop.CRNN("c4m-c6m", (1, 8, 8), num_classes=3, readout=readout, activation=activation,
                             dtype="float64", xp="numpy", seed=5, weight_scale=scale)

    net = make(contracting_weight_scale(make(1.0), target=0.4))
    rng = np.random.default_rng(11)
    x = backend.asarray(rng.random((n, 1, 8, 8)), xp="numpy", dtype="float64")
    y = backend.asarray(rng.integers(0, 3, size=n), xp="numpy")
    return net, x, y


@pytest.fixture(scope="module", params=[("mse", "hard_sigmoid"), ("softmax", "half_hard_sigmoid")], ids=str)
def report(request):
    net, x, y = _setup(*request.param)
    return net, x, y, gdu_check(net, x, y, beta=1e-3, T1=50, K=6)


def test_contraction_bound_holds(report):
    net, *_ = report
    assert lipschitz_bound(net) == pytest.approx(0.4, rel=1e-12)


def test_rows_cover_every_tensor_and_estimator(report):
    net, x, y, rep = report
    tensors = net.network_param_names() + [f"s{l + 1}" for l in range(len(net.layers))]
    assert [(r.estimator, r.tensor) for r in rep.rows] == [(e, t) for e in ("one-sided", "symmetric") for t in tensors]
    shapes = {k: tuple(v.shape) for k, v in net.params.items()}
    shapes.update({f"s{l + 1}": (x.shape[0], *s) for l, s in enumerate(net.arch.state_shapes)})
    assert all(r.shape == shapes[r.tensor] for r in rep.rows)
    assert rep.free_residual <= 1e-12


def test_symmetric_is_accurate_and_signs_agree(report):
    """At β = 1e-3 the symmetric error (O(β²)) is ≤ 1e-4 for every tensor, the one-sided one (O(β))
    is larger, and the per-step signs agree: a disagreement needs |BPTT| ≤ |EP − BPTT|."""
    *_, rep = report
    sym = [r for r in rep.rows if r.estimator == "symmetric"]
    one = {r.tensor: r for r in rep.rows if r.estimator == "one-sided"}
    for r in sym:
        assert r.sum_rel_error <= 1e-4 and r.rel_rmse <= 1e-4, r
        assert r.sign_agreement >= 0.99, r
        assert one[r.tensor].sum_rel_error >= r.sum_rel_error, (r, one[r.tensor])


def test_deltas_telescope_to_ep_and_bptt():
    """Σ_{t<K} ΔEP_θ(β, t) = (1/(βn))[∂Φ/∂θ(s^β_K) − ∂Φ/∂θ(s^0)] = −(one-sided EP with T2 = K)
    (Eq. 4.1) and, with K = T1, Σ_t −∇BPTT_θ(t) = −∇BPTT_θ for the network parameters (Eq. 5.4).
    The telescoping sum of K rounded differences differs by at most 2K·u·max|∂Φ/∂θ|/(βn) per element
    (plus the same for the estimate itself), the BPTT sum by γ_T·Σ_t|terms| ≤ T·u·Σ_t|∇BPTT_θ(t)|."""
    net, x, y = _setup()
    beta, T1 = 1e-3, 12
    rep = gdu_check(net, x, y, beta=beta, T1=T1, K=T1)
    n = x.shape[0]
    ep = pyeqprop.ep_estimate(net, x, y, beta=beta, T1=T1, T2=T1, estimator="one-sided")
    g_scale = max(float(np.max(np.abs(v))) for G in (net.dphi_dtheta(x, ep.free.state),
                                                       net.dphi_dtheta(x, ep.nudged[0].state)) for v in G.values())
    ref = pyeqprop.bptt(net, x, y, T=T1, per_step=True)
    for k in net.network_param_names():
        tol = (2 * T1 + 4) * U * g_scale / (beta * n)
        np.testing.assert_allclose(rep.deltas["+β"][k].sum(axis=0), -ep.grads[k], rtol=0, atol=tol, err_msg=k)
        abs_sum = sum(np.abs(step[k]) for step in ref.theta_steps)
        np.testing.assert_allclose(rep.deltas["bptt"][k].sum(axis=0), -ref.grads[k], rtol=0,
                                   atol=float(np.max(T1 * U * abs_sum)) + 1e-300, err_msg=k)


def test_unconverged_free_phase_shows():
    """The GDU statement needs a converged free phase: after 2 free steps the symmetric error is
    far above what β = 1e-3 allows (the check is not vacuous)."""
    net, x, y = _setup()
    rep = gdu_check(net, x, y, beta=1e-3, T1=2, K=2)
    assert rep.free_residual > 1e-3
    assert max(r.sum_rel_error for r in rep.rows if r.estimator == "symmetric") > 1e-2


@pytest.mark.parametrize("kw, words", [
    (dict(estimators=("two-sided",)), "estimator must be one of"),
    (dict(beta=0.0), "beta must be a positive finite number"),
    (dict(K=51), "K must be an integer with 1 <= K <= T1"),
    (dict(T1=0), "T1 must be a positive integer"),
])
def test_bad_arguments(kw, words):
    net, x, y = _setup(n=1)
    args = dict(beta=1e-3, T1=50, K=2) | kw
    with pytest.raises(ValueError, match=words):
        gdu_check(net, x, y, **args)


def test_format_table(report):
    *_, rep = report
    text = format_table(rep)
    lines = text.splitlines()
    assert lines[0].split() == ["estimator", "tensor", "shape", "sum", "rel", "err", "rel", "RMSE", "sign", "agree"]
    assert len(lines) == 2 + len(rep.rows)
    assert "conv1.weight" in text and "4×1×3×3" in text
    assert format_table(rep.rows) == text


def test_plot_is_a_png(report, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is needed for the GDU plot")
    *_, rep = report
    path = plot_gdu(rep, tmp_path / "gdu.png")
    data = open(path, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert {c.tensor for c in rep.curves} == {"conv1.weight", "conv2.weight"} | (
        {"fc1.weight"} if "fc1.weight" in rep.deltas["bptt"] else set())


def test_plot_without_matplotlib_says_how_to_install(report, tmp_path, monkeypatch):
    *_, rep = report
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_gdu(rep, tmp_path / "gdu.png")


def test_cli(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is needed for --plot")
    parser = add_gdu_arguments(argparse.ArgumentParser())
    defaults = parser.parse_args([])
    assert (defaults.arch, defaults.beta, defaults.readout, defaults.plot) == ("c8m-c16m", 1e-3, "mse", None)
    png = tmp_path / "cli.png"
    ns = parser.parse_args(["--arch", "c4m", "--batch", "3", "--T1", "40", "--K", "4", "--readout", "softmax",
                            "--plot", str(png)])
    assert run_gdu_cli(ns) == 0
    out = capsys.readouterr().out
    assert "free-phase residual" in out and "conv1.weight" in out and "symmetric" in out
    assert png.read_bytes()[:8] == PNG_MAGIC
    # an unconverged free phase is reported with exit code 1
    ns = parser.parse_args(["--arch", "c4m", "--batch", "2", "--T1", "1", "--K", "1"])
    assert run_gdu_cli(ns) == 1
    assert "has not converged" in capsys.readouterr().out


def test_summed_updates_against_the_equilibrium_gradient():
    """The report's reference (Eq. 5.7): with K = T1 on a contracting net (q = 0.4, free residual ≤ 1e-10
    after 50 steps), BPTT summed over all steps is the equilibrium gradient up to its truncated tail
    q^T1/(1 − q) ≈ 2e-20 and round-off; symmetric EP at β = 1e-3 is within its O(β²) error (≤ 1e-4,
    the rate test's bound) and closer than one-sided EP's O(β)."""
    net, x, y = _setup()
    rep = gdu_check(net, x, y, beta=1e-3, T1=50, K=50)
    assert rep.free_residual <= 1e-10
    err = rep.exact_rel_error
    assert set(err) == {"bptt", "one-sided", "symmetric"}
    assert err["bptt"] <= 1e-10
    assert err["symmetric"] <= 1e-4 and err["symmetric"] < err["one-sided"]
