"""The orthogonal initialisation calibrated to a spectral radius (SPEC.md Eq. 3.16).

Checked: the weights' orthogonality and gains, the radius of the linearised step in the linear
regime by dense eigenvalues (an arch without pooling above the first layer, where H does not
depend on the state), the centring of the pre-activations, that the default (uniform, Eq. 3.10)
is untouched, and the errors for bad arguments (the library's and the command line's).
"""
from __future__ import annotations

import numpy as np
import pytest

from pyeqprop.cli import main
from pyeqprop.model.crnn import CRNN
from pyeqprop.model.params import INPUT_GAIN, orthogonal_matrix, orthogonal_weight
from pyeqprop.model.spectrum import step_radius

ARCH, SHAPE = "c3-c4-f6", (1, 4, 4)  # no pooling: H is the same at every state


def _net(init="orthogonal", radius=0.85, arch=ARCH, shape=SHAPE, **kw):
    return CRNN(arch, shape, num_classes=3, readout="softmax", activation="half_hard_sigmoid", dtype="float64",
                xp="numpy", seed=5, init=init, radius=radius, **kw)


def _dense_H(net):
    """H = ∂²Φ/∂s² of one sample, column by column from Eq. 5.3 (independent of any state without pooling)."""
    shapes = net.state_shapes(1)
    sizes = [int(np.prod(s)) for s in shapes]
    cols = []
    for j in range(sum(sizes)):
        e = np.zeros(sum(sizes))
        e[j] = 1.0
        mu = [p.reshape(s) for p, s in zip(np.split(e, np.cumsum(sizes)[:-1]), shapes)]
        cols.append(np.concatenate([h.reshape(-1) for h in net.hessian_vector(mu, [None] * len(shapes))]))
    return np.stack(cols, axis=1)


def test_orthogonal_matrices_have_orthonormal_rows_or_columns():
    rng = np.random.default_rng(0)
    for rows, cols in ((3, 7), (7, 3), (5, 5)):
        q = orthogonal_matrix(rows, cols, rng)
        assert q.shape == (rows, cols)
        small = min(rows, cols)
        gram = q @ q.T if rows <= cols else q.T @ q
        np.testing.assert_allclose(gram, np.eye(small), atol=1e-12)
    w = orthogonal_weight((4, 2, 3, 3), rng, delta=True)
    assert np.count_nonzero(w[:, :, [0, 2], :]) == 0 and np.count_nonzero(w[:, :, :, [0, 2]]) == 0
    np.testing.assert_allclose(w[:, :, 1, 1].T @ w[:, :, 1, 1], 2.0 * np.eye(2), atol=1e-12)  # × √(4/2): rows RMS 1


@pytest.mark.parametrize("init", ["orthogonal", "delta-orthogonal"])
@pytest.mark.parametrize("radius", [0.5, 0.85, 1.2])
def test_the_linear_regime_radius_is_the_chosen_one(init, radius):
    """Eq. 3.16: with every unit in ρ's linear piece (D = ρ'_max I), ρ(J) = ρ'_max ρ(H) = r, by dense eigenvalues;
    W_1 has rows of root-mean-square norm a/2 (a = 2, the half hard sigmoid's linear piece), whatever r."""
    net = _net(init, radius)
    lam = np.linalg.eigvalsh(_dense_H(net))
    assert net.act.max_slope * np.max(np.abs(lam)) == pytest.approx(radius, rel=1e-4)
    w1 = net.params["conv1.weight"].reshape(3, -1)
    assert np.sqrt(np.mean(np.sum(w1 ** 2, axis=1))) == pytest.approx(INPUT_GAIN * 2.0, rel=1e-12)
    w2 = net.params["conv2.weight"]  # (4, 3, 3, 3): rows orthogonal (4 ≤ 27), or the centre tap's columns (4 > 3)
    m = w2[:, :, 1, 1].T if init == "delta-orthogonal" else w2.reshape(4, -1)
    if init == "delta-orthogonal":
        assert np.count_nonzero(w2) == np.count_nonzero(w2[:, :, 1, 1])
    gram = m @ m.T
    np.testing.assert_allclose(gram / gram[0, 0], np.eye(len(m)), atol=1e-10)


def test_biases_centre_the_pre_activations_in_the_linear_piece():
    """Eq. 3.16: at a state like the reference (neurons uniform in [0, 1], x = 0) every channel's mean
    pre-activation is near the centre a/2 = 1 of the half hard sigmoid's linear piece, and nearly every unit
    is inside it; the uniform init (Eq. 3.10) leaves them near 0, at the kink."""
    rng = np.random.default_rng(1)
    for init, near_centre in (("orthogonal", True), ("uniform", False)):
        net = _net(init, None if init == "uniform" else 0.85)
        s = [rng.uniform(0, 1, size=sh) for sh in net.state_shapes(64)]
        u = net.drive(np.zeros((64, *SHAPE)), s).u
        for l, ul in enumerate(u):
            axes = tuple(a for a in range(ul.ndim) if a != 1)
            mean = ul.mean(axis=axes)
            if near_centre:
                assert np.max(np.abs(mean - 1.0)) < 0.4, (l, mean)
                assert np.mean((ul > 0) & (ul < 2)) > 0.9
            else:
                assert np.min(np.abs(mean - 1.0)) > 0.4, (l, mean)


def test_the_radius_with_max_pooling_is_near_the_chosen_one_on_data():
    """Eq. 3.16 with max pooling above the first layer: at the free state of real inputs, ρ(J) of Eq. 3.17 is
    within 10 % of r (argmaxes differ from the reference's, and some units leave the linear piece)."""
    from pyeqprop.learning.settle import settle
    from pyeqprop.model.spectrum import linearisation

    net = _net("orthogonal", 0.85, arch="c4-c6m-c8", shape=(1, 8, 8))
    x = np.random.default_rng(2).standard_normal((8, 1, 8, 8))
    st = settle(net, x, 300)
    assert st.residual < 1e-8
    est = step_radius(net, *linearisation(net, x, st.state), iterations=2000, tol=1e-7)
    assert 0.75 < est.radius < 0.94


def test_the_default_init_is_uniform_and_unchanged():
    """Eq. 3.10 stays the default: the same draws as before, whatever the new arguments' defaults."""
    a = CRNN("c3-c4-f6", SHAPE, num_classes=3, dtype="float64", xp="numpy", seed=5)
    rng = np.random.default_rng(5)
    w = rng.uniform(-1 / 3, 1 / 3, size=(3, 1, 3, 3))  # the first draw: conv1.weight, fan_in 9
    np.testing.assert_array_equal(a.params["conv1.weight"], w)
    assert a.init == "uniform" and a.radius is None
    o = _net()
    assert o.init == "orthogonal" and o.radius == 0.85
    assert not np.array_equal(o.params["conv1.weight"], a.params["conv1.weight"])
    again = _net()
    for k in o.params:
        np.testing.assert_array_equal(o.params[k], again.params[k])  # seeded: the same draws twice


def test_bad_init_arguments_name_the_value():
    with pytest.raises(ValueError, match="init must be one of uniform, orthogonal, delta-orthogonal, got 'xavier'"):
        _net("xavier")
    with pytest.raises(ValueError, match="radius=0.5 applies to the orthogonal inits"):
        _net("uniform", 0.5)
    with pytest.raises(ValueError, match="radius must be a number > 0, got -1"):
        _net("orthogonal", -1)
    with pytest.raises(ValueError, match="weight_scale=2.0 applies to init='uniform'"):
        _net("orthogonal", 0.85, weight_scale=2.0)


def test_cli_rejects_weight_scale_with_an_orthogonal_init(tmp_path, capsys):
    rc = main(["train", "--init", "orthogonal", "--weight-scale", "2", "--epochs", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "config key 'weight_scale' has value 2.0; expected 1 with init 'orthogonal'" in err
    assert not (tmp_path / "r").exists()
    rc = main(["train", "--init", "glorot", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert rc == 2 and "glorot" in capsys.readouterr().err
