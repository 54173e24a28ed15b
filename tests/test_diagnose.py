"""The per-layer signal diagnosis (pyeqprop.diagnostics.signals, ``pyeqprop diagnose``)."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from pyeqprop.backend import asarray
from pyeqprop.data.synthetic import make_synthetic
from pyeqprop.diagnostics.signals import SETTINGS, ablation_settings, diagnose, format_diagnose_table, plot_diagnose
from pyeqprop.model import CRNN
from pyeqprop.learning.signals import attach_signals
from pyeqprop.model.teacher import Teacher

ARCH, SHAPE, K = "c4m-c4-c4m-c4", (1, 8, 8), 4  # four conv layers: 4×4×4, 4×4×4, 4×2×2, 4×2×2


def _run(seed, settings=SETTINGS):
    x, y, _ = make_synthetic(SHAPE, K, 16, seed=seed)

    def make():
        return CRNN(ARCH, SHAPE, num_classes=K, readout="softmax", dtype="float64", xp="numpy", seed=seed)

    teacher = Teacher(ARCH, SHAPE, num_classes=K, dtype="float64", xp="numpy", seed=seed + 1)
    return diagnose(make, asarray(x, xp="numpy", dtype="float64"), asarray(y, xp="numpy"), settings=settings,
                    beta=0.5, T1=30, T2=10, teacher=teacher)


@pytest.fixture(scope="module")
def rows():
    return _run(0)


def test_table_has_every_setting_and_layer(rows):
    assert [r.setting for r in rows] == list(SETTINGS)
    for r in rows:
        assert r.layers == ["conv1", "conv2", "conv3", "conv4"] and r.drift == rows[0].drift
        assert len(r.displacement) == 4 and all(np.isfinite(d) and d >= 0 for d in r.displacement)
        assert r.beta == 0.5 and np.isfinite(r.free_residual) and np.isfinite(r.nudged_residual)
    assert {r.free_residual for r in rows} == {rows[0].free_residual}  # one shared free phase
    assert not any(k.startswith(("head", "kd")) for k in rows[0].grad)
    assert any(k.startswith("head") for k in rows[1].grad) and any(k.startswith("kd") for k in rows[2].grad)
    table = format_diagnose_table(rows)
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("layer"))
    assert header.split() == ["layer", "shape", *SETTINGS, "free", "drift"]
    for name in ("conv1", "conv2", "conv3", "conv4", "conv1.weight", "conv4.bias", "fc1.weight"):
        assert any(line.split()[:1] == [name] for line in lines), name
    assert "4×4×4" in table and "4×2×2" in table


def test_rows_carry_the_cosine_with_the_equilibrium_gradient(rows):
    """Eq. 5.7 as the diagnosis' reference: a cosine per neuron layer's weight, for every setting."""
    for r in rows:
        assert list(r.cosine_exact) == [f"{name}.weight" for name in r.layers]
        assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in r.cosine_exact.values() if not np.isnan(c))
    assert "equilibrium gradient (Eq. 5.7)" in format_diagnose_table(rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_local_errors_move_the_first_layer_more(seed):
    """The point of local errors (SPEC.md §6, after Lin, Bal & Sengupta): in plain EP the nudge
    reaches layer 1 only through three layers of feedback and is weak there; a local head
    nudges it directly, so the first layer's displacement grows."""
    by = {r.setting: r for r in _run(seed)}
    ep = by["EP"].displacement[0]
    assert by["EP+local"].displacement[0] > ep
    assert by["EP+local+KD"].displacement[0] > ep
    # and plain EP's signal fades towards the input on this net
    assert by["EP"].displacement[0] < by["EP"].displacement[-1]


def test_displacement_is_from_the_continued_free_phase():
    """D_l = mean|s^β_l − s̄^0_l| with s̄^0 the free phase continued T2 steps; on a converged free
    phase (contracting weights, long T1) the drift is zero and D_l = mean|s^β_l − s^0_l|."""
    from pyeqprop.learning import ep_estimate

    x, y, _ = make_synthetic(SHAPE, K, 8, seed=3)
    xb, yb = asarray(x, xp="numpy", dtype="float64"), asarray(y, xp="numpy")

    def make():
        return CRNN(ARCH, SHAPE, num_classes=K, readout="softmax", dtype="float64", xp="numpy", seed=3,
                    weight_scale=0.3)

    (row,) = diagnose(make, xb, yb, settings=("EP+local",), beta=0.5, T1=150, T2=10)
    assert max(row.drift) == 0.0

    net = make()
    attach_signals(net, ablation_settings()["EP+local"])
    res = ep_estimate(net, xb, yb, beta=0.5, T1=150, T2=10)
    want = [float(np.mean(np.abs(a - b))) for a, b in zip(res.nudged[0].state, res.free.state)]
    assert row.displacement == pytest.approx(want, rel=1e-12, abs=0)


def test_same_base_parameters_required():
    calls = []

    def make():
        calls.append(1)
        return CRNN(ARCH, SHAPE, num_classes=K, dtype="float64", xp="numpy", seed=len(calls))

    x, y, _ = make_synthetic(SHAPE, K, 4, seed=0)
    with pytest.raises(ValueError, match="same network"):
        diagnose(make, asarray(x, xp="numpy", dtype="float64"), asarray(y, xp="numpy"), settings=("EP",),
                 beta=0.5, T1=3, T2=2)


def test_distillation_setting_needs_teacher():
    x, y, _ = make_synthetic(SHAPE, K, 4, seed=0)
    with pytest.raises(ValueError, match="needs a teacher"):
        diagnose(lambda: CRNN(ARCH, SHAPE, num_classes=K, dtype="float64", xp="numpy"),
                 asarray(x, xp="numpy", dtype="float64"), asarray(y, xp="numpy"), settings=("EP+KD",),
                 beta=0.5, T1=3, T2=2)


def test_plot_is_a_png(rows, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "diagnose.png"
    assert plot_diagnose(rows, path) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    assert data[-8:-4] == b"IEND"


def test_cli(tmp_path, capsys):
    """``pyeqprop diagnose`` end to end on a tiny synthetic run, through the real parser."""
    from pyeqprop.cli import build_parser

    plot = tmp_path / "d.png"
    ns = build_parser().parse_args(["diagnose", "--arch", "c2m-c2", "--dataset", "synthetic", "--input-shape",
                                    "1,8,8", "--num-classes", "3", "--batch", "6", "--T1", "5", "--T2", "3",
                                    "--teacher-epochs", "1", "--teacher-samples", "32", "--settings",
                                    "EP,EP+KD", "--plot", str(plot)])
    assert ns.func(ns) == 0
    out = capsys.readouterr().out
    assert "EP+KD" in out and "conv2" in out and "teacher: trained 1 epoch(s) on 32 samples" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"
    from pyeqprop.cli import main

    # a usage error: one error line and exit status 2, as everywhere in the CLI (it was a SystemExit, status 1)
    assert main(["diagnose", "--settings", "EP,EP+foo", "--dataset", "synthetic"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown setting(s) ['EP+foo']") and len(err.splitlines()) == 1, err
