"""Reference properties of the primitives of SPEC.md §2, Eq. (2.1) to Eq. (2.11).

Each test checks one property and cites its equation. Comparisons with an independent
computation (the float64 loop oracles of ``pyeqprop.testing.oracles``, PyTorch, SciPy)
allow the difference derived in ``pyeqprop.testing.rounding``: twice the rounding bound
γ(d)·Σ|terms| of one computation, with d the rounding depth (number of terms reduced
into one element, plus one rounding for each further operation: bias, scaling, final
cast). Σ|terms| per element is the oracle run on absolute values. Selections (max
pooling values, indices) are compared exactly.

Arrays are drawn on the host from ``numpy.random.default_rng(config.seed)``, moved to the
backend of the ``xp`` fixture, and brought back with ``to_numpy``.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pyeqprop import backend, ops
from pyeqprop.testing import oracles
from pyeqprop.testing.checks import assert_adjoint, assert_allclose_dtype
from pyeqprop.testing.rounding import unit_roundoff
from pyeqprop.testing.strategies import (
    PoolConfig,
    conv_configs,
    linear_configs,
    pool_configs,
    random_array,
)

F64 = np.float64
F32 = np.float32


def _dev(a, xp):
    return backend.asarray(a, xp=xp)


def _host(a):
    return backend.to_numpy(a)


def _vdot(a, b) -> float:
    """⟨a, b⟩ on the host in float64."""
    return float(np.vdot(np.asarray(a, F64).ravel(), np.asarray(b, F64).ravel()))


def _conv_arrays(cfg, dtype=F64):
    rng = cfg.rng()
    x = random_array(rng, cfg.x_shape, dtype)
    w = random_array(rng, cfg.w_shape, dtype)
    b = random_array(rng, (cfg.o,), dtype)
    g = random_array(rng, cfg.y_shape, dtype)
    return x, w, b, g


def _pool_x(cfg, dtype=F64):
    return random_array(cfg.rng(), cfg.x_shape, dtype, integer=cfg.ties)


def _conv_kw(cfg):
    return dict(stride=cfg.stride, padding=cfg.padding)


def _pool_kw(cfg):
    return dict(kernel_size=cfg.kernel, stride=cfg.stride)


def _select(x, indices):
    """x[n, c].flat[indices[n, c]]: max pooling's values as a linear map of x at fixed indices."""
    n, c = x.shape[:2]
    flat = x.reshape(n, c, -1)  # (n, c, h, w) -> (n, c, h·w)
    return np.take_along_axis(flat, indices.reshape(n, c, -1), axis=2).reshape(indices.shape)


# An overlapping (s < k), non-square configuration with integer inputs (ties), always run.
TIES_OVERLAP = PoolConfig(n=2, c=3, h=6, w=7, kernel=(3, 2), stride=(1, 1), ties=True, seed=0)
# Windows that tile the plane (kernel = stride, h = k_h·h', w = k_w·w'): max_unpool2d's one-selection
# path (Eq. 2.7), square with ties and rectangular; and kernel = stride with a remainder row and column,
# which takes the per-tap path.
TILING = PoolConfig(n=2, c=3, h=6, w=8, kernel=(2, 2), stride=(2, 2), ties=True, seed=1)
TILING_RECT = PoolConfig(n=1, c=2, h=9, w=4, kernel=(3, 2), stride=(3, 2), ties=False, seed=2)
REMAINDER = PoolConfig(n=2, c=2, h=7, w=5, kernel=(2, 2), stride=(2, 2), ties=True, seed=3)


# ---------------------------------------------------------------------------------------------
# (1) Agreement with the float64 loop oracles, under every backend
# ---------------------------------------------------------------------------------------------

def _prepared(w, prepared):
    """``weight_matrix=`` for a conv call: W = conv_weight_matrix(w) built ahead (Eq. 2.1), or None."""
    return {"weight_matrix": ops.conv_weight_matrix(w)} if prepared else {}


@given(cfg=conv_configs(), with_bias=st.booleans(), prepared=st.booleans())
def test_conv2d_matches_oracle(xp, cfg, with_bias, prepared):
    """conv2d is the cross-correlation of Eq. (2.1) with the output size of Eq. (2.2), with its weight
    matrix built inside or passed in (``weight_matrix=``)."""
    x, w, b, _ = _conv_arrays(cfg)
    bb = b if with_bias else None
    y = ops.conv2d(_dev(x, xp), _dev(w, xp), None if bb is None else _dev(bb, xp), **_conv_kw(cfg),
                   **_prepared(_dev(w, xp), prepared))
    scale = oracles.conv2d(np.abs(x), np.abs(w), None if bb is None else np.abs(bb), **_conv_kw(cfg))
    kh, kw = cfg.kernel
    assert _host(y).shape == cfg.y_shape
    assert_allclose_dtype(_host(y), oracles.conv2d(x, w, bb, **_conv_kw(cfg)), dtype=F64,
                          n_terms=cfg.c * kh * kw + 2, abs_scale=scale, err_msg=repr(cfg))


@given(cfg=conv_configs(), prepared=st.booleans())
def test_conv2d_transpose_matches_oracle(xp, cfg, prepared):
    """conv2d_transpose is the scatter of Eq. (2.3), for every input size that Eq. (2.2) maps
    to the same h' (the strategy draws h freely, so all stride-ambiguous sizes occur), with its
    weight matrix built inside or passed in."""
    _, w, _, g = _conv_arrays(cfg)
    z = ops.conv2d_transpose(_dev(g, xp), _dev(w, xp), output_size=(cfg.h, cfg.w), **_conv_kw(cfg),
                             **_prepared(_dev(w, xp), prepared))
    expect = oracles.conv2d_transpose(g, w, output_size=(cfg.h, cfg.w), **_conv_kw(cfg))
    scale = oracles.conv2d_transpose(np.abs(g), np.abs(w), output_size=(cfg.h, cfg.w), **_conv_kw(cfg))
    kh, kw = cfg.kernel
    assert_allclose_dtype(_host(z), expect, dtype=F64, n_terms=cfg.o * kh * kw + 1, abs_scale=scale,
                          err_msg=repr(cfg))


@given(cfg=conv_configs())
def test_conv2d_weight_grad_matches_oracle(xp, cfg):
    """conv2d_weight_grad is the correlation of input and output gradient of Eq. (2.4);
    conv2d_bias_grad is the sum of g over (n, h', w') (the bias term of Eq. (2.1))."""
    x, _, _, g = _conv_arrays(cfg)
    dw = ops.conv2d_weight_grad(_dev(x, xp), _dev(g, xp), kernel_size=cfg.kernel, **_conv_kw(cfg))
    expect = oracles.conv2d_weight_grad(x, g, kernel_size=cfg.kernel, **_conv_kw(cfg))
    scale = oracles.conv2d_weight_grad(np.abs(x), np.abs(g), kernel_size=cfg.kernel, **_conv_kw(cfg))
    ho, wo = cfg.out_hw
    assert_allclose_dtype(_host(dw), expect, dtype=F64, n_terms=cfg.n * ho * wo + 1, abs_scale=scale,
                          err_msg=repr(cfg))
    db = ops.conv2d_bias_grad(_dev(g, xp))
    assert_allclose_dtype(_host(db), g.sum(axis=(0, 2, 3)), dtype=F64, n_terms=cfg.n * ho * wo,
                          abs_scale=np.abs(g).sum(axis=(0, 2, 3)), err_msg=repr(cfg))


@example(cfg=TIES_OVERLAP)
@given(cfg=pool_configs())
def test_max_pool2d_matches_oracle(xp, cfg):
    """max_pool2d returns the window maxima of Eq. (2.6), output size Eq. (2.5), and int64
    indices u·w + v of the *first* maximum in row-major window order; a selection, so exact."""
    x = _pool_x(cfg)
    y, idx = ops.max_pool2d(_dev(x, xp), **_pool_kw(cfg))
    ey, eidx = oracles.max_pool2d(x, **_pool_kw(cfg))
    y, idx = _host(y), _host(idx)
    assert y.dtype == F64 and idx.dtype == np.int64
    np.testing.assert_array_equal(y, ey, err_msg=repr(cfg))
    np.testing.assert_array_equal(idx, eidx, err_msg=repr(cfg))


@example(cfg=TIES_OVERLAP)
@example(cfg=TILING)
@example(cfg=TILING_RECT)
@example(cfg=REMAINDER)
@given(cfg=pool_configs())
def test_max_unpool2d_matches_oracle(xp, cfg):
    """max_unpool2d is the scatter-add of Eq. (2.7): with overlapping windows one input that
    is the maximum of several windows receives the sum of their gradients."""
    x = _pool_x(cfg)
    _, idx = oracles.max_pool2d(x, **_pool_kw(cfg))
    g = random_array(cfg.rng(), cfg.y_shape)
    z = ops.max_unpool2d(_dev(g, xp), _dev(idx, xp), output_size=(cfg.h, cfg.w), **_pool_kw(cfg))
    expect = oracles.max_unpool2d(g, idx, output_size=(cfg.h, cfg.w))
    scale = oracles.max_unpool2d(np.abs(g), idx, output_size=(cfg.h, cfg.w))
    kh, kw = cfg.kernel
    assert_allclose_dtype(_host(z), expect, dtype=F64, n_terms=kh * kw + 1, abs_scale=scale, err_msg=repr(cfg))


@given(cfg=pool_configs(ties=False))
def test_avg_pool2d_matches_oracle(xp, cfg):
    """avg_pool2d is the window mean of Eq. (2.8). Depth k_h·k_w sums, plus the rounded
    constant 1/(k_h·k_w), its product and the cast."""
    x = _pool_x(cfg)
    y = ops.avg_pool2d(_dev(x, xp), **_pool_kw(cfg))
    kh, kw = cfg.kernel
    assert_allclose_dtype(_host(y), oracles.avg_pool2d(x, **_pool_kw(cfg)), dtype=F64, n_terms=kh * kw + 3,
                          abs_scale=oracles.avg_pool2d(np.abs(x), **_pool_kw(cfg)), err_msg=repr(cfg))


@given(cfg=pool_configs(ties=False))
def test_avg_unpool2d_matches_oracle(xp, cfg):
    """avg_unpool2d spreads y/(k_h·k_w) over each window, accumulating overlaps (Eq. (2.8))."""
    g = random_array(cfg.rng(), cfg.y_shape)
    z = ops.avg_unpool2d(_dev(g, xp), output_size=(cfg.h, cfg.w), **_pool_kw(cfg))
    kw_ = dict(output_size=(cfg.h, cfg.w), **_pool_kw(cfg))
    kh, kw = cfg.kernel
    assert_allclose_dtype(_host(z), oracles.avg_unpool2d(g, **kw_), dtype=F64, n_terms=kh * kw + 3,
                          abs_scale=oracles.avg_unpool2d(np.abs(g), **kw_), err_msg=repr(cfg))


@given(cfg=linear_configs(), with_bias=st.booleans())
def test_linear_matches_oracle(xp, cfg, with_bias):
    """linear is y = x wᵀ + b of Eq. (2.11); linear_transpose is g w and linear_weight_grad
    is gᵀ x, the oracle's sums read along the other axes."""
    rng = cfg.rng()
    x, w = random_array(rng, (cfg.n, cfg.i)), random_array(rng, (cfg.o, cfg.i))
    b, g = random_array(rng, (cfg.o,)), random_array(rng, (cfg.n, cfg.o))
    bb = b if with_bias else None
    y = ops.linear(_dev(x, xp), _dev(w, xp), None if bb is None else _dev(bb, xp))
    assert_allclose_dtype(_host(y), oracles.linear(x, w, bb), dtype=F64, n_terms=cfg.i + 2,
                          abs_scale=oracles.linear(np.abs(x), np.abs(w), None if bb is None else np.abs(bb)))
    # z = g w: the oracle's y[n, i] = Σ_o g[n, o] w[o, i], i.e. linear(g, wᵀ)
    z = ops.linear_transpose(_dev(g, xp), _dev(w, xp))
    assert_allclose_dtype(_host(z), oracles.linear(g, w.T), dtype=F64, n_terms=cfg.o + 1,
                          abs_scale=oracles.linear(np.abs(g), np.abs(w).T))
    # Δw = gᵀ x: Δw[o, i] = Σ_n g[n, o] x[n, i], i.e. linear(gᵀ, xᵀ)
    dw = ops.linear_weight_grad(_dev(x, xp), _dev(g, xp))
    assert_allclose_dtype(_host(dw), oracles.linear(g.T, x.T), dtype=F64, n_terms=cfg.n + 1,
                          abs_scale=oracles.linear(np.abs(g).T, np.abs(x).T))


# ---------------------------------------------------------------------------------------------
# (2) Agreement with torch.nn.functional (NumPy backend, float64)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="PyTorch is not installed; the torch comparisons are skipped")


def _t(torch, a):
    return torch.from_numpy(np.ascontiguousarray(a))


@given(cfg=conv_configs())
def test_conv2d_matches_torch(torch, cfg):
    """conv2d equals torch.nn.functional.conv2d (cross-correlation, Eq. (2.1))."""
    x, w, b, _ = _conv_arrays(cfg)
    y = ops.conv2d(x, w, b, **_conv_kw(cfg))
    expect = torch.nn.functional.conv2d(_t(torch, x), _t(torch, w), _t(torch, b), **_conv_kw(cfg)).numpy()
    kh, kw = cfg.kernel
    assert_allclose_dtype(y, expect, dtype=F64, n_terms=cfg.c * kh * kw + 1,
                          abs_scale=oracles.conv2d(np.abs(x), np.abs(w), np.abs(b), **_conv_kw(cfg)),
                          err_msg=repr(cfg))


@given(cfg=conv_configs())
def test_conv2d_transpose_matches_torch(torch, cfg):
    """conv2d_transpose equals torch's conv_transpose2d (Eq. (2.3)), with output_padding
    h − ((h'−1)·s − 2p + k) ∈ [0, s) selecting the same input size among those of Eq. (2.2)."""
    _, w, _, g = _conv_arrays(cfg)
    (kh, kw), (sh, sw), (ph, pw) = cfg.kernel, cfg.stride, cfg.padding
    ho, wo = cfg.out_hw
    out_pad = (cfg.h - ((ho - 1) * sh - 2 * ph + kh), cfg.w - ((wo - 1) * sw - 2 * pw + kw))
    z = ops.conv2d_transpose(g, w, output_size=(cfg.h, cfg.w), **_conv_kw(cfg))
    expect = torch.nn.functional.conv_transpose2d(_t(torch, g), _t(torch, w), stride=cfg.stride,
                                                  padding=cfg.padding, output_padding=out_pad).numpy()
    assert_allclose_dtype(z, expect, dtype=F64, n_terms=cfg.o * kh * kw,
                          abs_scale=oracles.conv2d_transpose(np.abs(g), np.abs(w), output_size=(cfg.h, cfg.w),
                                                             **_conv_kw(cfg)),
                          err_msg=repr(cfg))


@given(cfg=conv_configs())
def test_conv2d_weight_grad_matches_torch(torch, cfg):
    """conv2d_weight_grad equals torch.nn.grad.conv2d_weight (Eq. (2.4))."""
    x, w, _, g = _conv_arrays(cfg)
    dw = ops.conv2d_weight_grad(x, g, kernel_size=cfg.kernel, **_conv_kw(cfg))
    expect = torch.nn.grad.conv2d_weight(_t(torch, x), w.shape, _t(torch, g), **_conv_kw(cfg)).numpy()
    ho, wo = cfg.out_hw
    assert_allclose_dtype(dw, expect, dtype=F64, n_terms=cfg.n * ho * wo,
                          abs_scale=oracles.conv2d_weight_grad(np.abs(x), np.abs(g), kernel_size=cfg.kernel,
                                                               **_conv_kw(cfg)),
                          err_msg=repr(cfg))


@example(cfg=TIES_OVERLAP)
@given(cfg=pool_configs())
def test_max_pool2d_matches_torch(torch, cfg):
    """max_pool2d equals torch's max_pool2d(return_indices=True), indices included, ties and
    overlapping windows too (Eq. (2.6): first maximum in row-major order)."""
    x = _pool_x(cfg)
    y, idx = ops.max_pool2d(x, **_pool_kw(cfg))
    ey, eidx = torch.nn.functional.max_pool2d(_t(torch, x), **_pool_kw(cfg), return_indices=True)
    np.testing.assert_array_equal(y, ey.numpy(), err_msg=repr(cfg))
    np.testing.assert_array_equal(idx, eidx.numpy(), err_msg=repr(cfg))


@given(cfg=pool_configs(), where=st.integers(0, 10_000), second=st.booleans())
def test_max_pool2d_propagates_nan_as_torch_does(torch, cfg, where, second):
    """Eq. (2.6) with NaN inputs: a window holding a NaN gives NaN wherever the NaN sits in it
    (not only first), with torch's index (its last NaN); other windows are untouched."""
    x = _pool_x(cfg).copy()
    flat = x.reshape(-1)
    flat[where % flat.size] = np.nan
    if second:
        flat[(where * 7 + 3) % flat.size] = np.nan
    y, idx = ops.max_pool2d(x, **_pool_kw(cfg))
    ey, eidx = torch.nn.functional.max_pool2d(_t(torch, x), **_pool_kw(cfg), return_indices=True)
    np.testing.assert_array_equal(np.isnan(y), np.isnan(ey.numpy()), err_msg=repr(cfg))
    np.testing.assert_array_equal(y, ey.numpy(), err_msg=repr(cfg))  # NaN == NaN for assert_array_equal
    np.testing.assert_array_equal(idx, eidx.numpy(), err_msg=repr(cfg))


def test_max_pool2d_nan_anywhere_in_a_window():
    """The case that used to hide a NaN: [1, 2, NaN, 5] in one 2×2 window gives NaN at index 2."""
    x = np.array([[[[1.0, 2.0], [np.nan, 5.0]]]])
    y, idx = ops.max_pool2d(x)
    assert np.isnan(y[0, 0, 0, 0]) and idx[0, 0, 0, 0] == 2


@example(cfg=TILING)
@example(cfg=TILING_RECT)
@example(cfg=REMAINDER)
@given(cfg=pool_configs(overlapping=False))
def test_max_unpool2d_matches_torch(torch, cfg):
    """max_unpool2d equals torch's max_unpool2d for disjoint windows (s ≥ k), Eq. (2.7).

    Overlapping windows are excluded on purpose: torch's max_unpool2d *writes* each value,
    so an input that is the maximum of two windows receives one of the two, while the
    adjoint of Eq. (2.7) adds them (tested against the oracle and the adjoint identity).
    With disjoint windows every position receives at most one value, so the match is exact.
    """
    x = _pool_x(cfg)
    _, idx = ops.max_pool2d(x, **_pool_kw(cfg))
    g = random_array(cfg.rng(), cfg.y_shape)
    z = ops.max_unpool2d(g, idx, output_size=(cfg.h, cfg.w), **_pool_kw(cfg))
    expect = torch.nn.functional.max_unpool2d(_t(torch, g), _t(torch, idx), **_pool_kw(cfg),
                                              output_size=(cfg.h, cfg.w)).numpy()
    np.testing.assert_array_equal(z, expect, err_msg=repr(cfg))


@given(cfg=pool_configs(ties=False))
def test_avg_pool2d_matches_torch(torch, cfg):
    """avg_pool2d equals torch's avg_pool2d without padding (Eq. (2.8))."""
    x = _pool_x(cfg)
    y = ops.avg_pool2d(x, **_pool_kw(cfg))
    expect = torch.nn.functional.avg_pool2d(_t(torch, x), **_pool_kw(cfg)).numpy()
    kh, kw = cfg.kernel
    assert_allclose_dtype(y, expect, dtype=F64, n_terms=kh * kw + 2,
                          abs_scale=oracles.avg_pool2d(np.abs(x), **_pool_kw(cfg)), err_msg=repr(cfg))


# ---------------------------------------------------------------------------------------------
# (3) Agreement with scipy.signal.correlate (stride 1)
# ---------------------------------------------------------------------------------------------

@given(cfg=conv_configs(stride=(1, 1)))
def test_conv2d_stride1_matches_scipy_correlate(cfg):
    """For stride 1, Eq. (2.1) is y[n,o] = b[o] + Σ_c correlate(x_p[n,c], w[o,c], 'valid').
    method='direct' keeps SciPy's error a sum of products (an FFT would not be)."""
    from scipy.signal import correlate

    x, w, b, _ = _conv_arrays(cfg)
    (ph, pw) = cfg.padding
    x_p = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    expect = np.empty(cfg.y_shape)
    for n in range(cfg.n):
        for o in range(cfg.o):
            expect[n, o] = b[o] + sum(correlate(x_p[n, c], w[o, c], mode="valid", method="direct")
                                      for c in range(cfg.c))
    y = ops.conv2d(x, w, b, **_conv_kw(cfg))
    kh, kw = cfg.kernel
    assert_allclose_dtype(y, expect, dtype=F64, n_terms=cfg.c * kh * kw + 1,
                          abs_scale=oracles.conv2d(np.abs(x), np.abs(w), np.abs(b), **_conv_kw(cfg)),
                          err_msg=repr(cfg))


# ---------------------------------------------------------------------------------------------
# (4) Adjoint identities ⟨A x, y⟩ = ⟨x, Aᵀ y⟩, tolerance 2γ(d)·Σ|y_i A_ij x_j|
#     d = inner reduction length + outer inner-product length + multiplications; the outer
#     products are taken in float64 on the host, whose roundings are within the dtype's u.
# ---------------------------------------------------------------------------------------------

dtypes = pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])


@dtypes
@given(cfg=conv_configs())
def test_conv2d_transpose_is_adjoint_of_conv2d(xp, dtype, cfg):
    """⟨conv2d(x, w), g⟩ = ⟨x, conv2d_transpose(g, w, output_size=(h, w))⟩, Eq. (2.3)."""
    x, w, _, g = _conv_arrays(cfg, dtype)
    kw_ = _conv_kw(cfg)
    y = _host(ops.conv2d(_dev(x, xp), _dev(w, xp), **kw_))
    z = _host(ops.conv2d_transpose(_dev(g, xp), _dev(w, xp), output_size=(cfg.h, cfg.w), **kw_))
    kh, kw = cfg.kernel
    depth = max(cfg.c * kh * kw + g.size, cfg.o * kh * kw + x.size) + 2
    abs_sum = _vdot(oracles.conv2d(np.abs(x).astype(F64), np.abs(w).astype(F64), **kw_), np.abs(g))
    assert_adjoint(_vdot(y, g), _vdot(x, z), dtype=dtype, n_terms=depth, abs_sum=abs_sum, err_msg=repr(cfg))


@dtypes
@given(cfg=conv_configs())
def test_conv2d_weight_grad_is_adjoint_of_conv2d(xp, dtype, cfg):
    """⟨conv2d(x, w), g⟩ = ⟨w, conv2d_weight_grad(x, g, kernel_size=(k_h, k_w))⟩, Eq. (2.4)."""
    x, w, _, g = _conv_arrays(cfg, dtype)
    kw_ = _conv_kw(cfg)
    y = _host(ops.conv2d(_dev(x, xp), _dev(w, xp), **kw_))
    dw = _host(ops.conv2d_weight_grad(_dev(x, xp), _dev(g, xp), kernel_size=cfg.kernel, **kw_))
    kh, kw = cfg.kernel
    ho, wo = cfg.out_hw
    depth = max(cfg.c * kh * kw + g.size, cfg.n * ho * wo + w.size) + 2
    abs_sum = _vdot(oracles.conv2d(np.abs(x).astype(F64), np.abs(w).astype(F64), **kw_), np.abs(g))
    assert_adjoint(_vdot(y, g), _vdot(w, dw), dtype=dtype, n_terms=depth, abs_sum=abs_sum, err_msg=repr(cfg))


@dtypes
@example(cfg=TIES_OVERLAP)
@example(cfg=TILING)
@example(cfg=TILING_RECT)
@example(cfg=REMAINDER)
@given(cfg=pool_configs())
def test_max_unpool2d_is_adjoint_at_fixed_indices(xp, dtype, cfg):
    """At fixed indices max pooling is the selection S x = x.flat[indices] (Eq. (2.7a)) and
    ⟨S x', g⟩ = ⟨x', max_unpool2d(g, indices)⟩ (Eq. (2.7)) for any x', including overlapping
    windows (one input selected by several windows) and ties (indices from integer inputs)."""
    rng = cfg.rng()
    x = random_array(rng, cfg.x_shape, dtype, integer=cfg.ties)
    x2 = random_array(rng, cfg.x_shape, dtype)  # a fresh point: the identity holds for every x'
    g = random_array(rng, cfg.y_shape, dtype)
    _, idx = ops.max_pool2d(_dev(x, xp), **_pool_kw(cfg))
    z = _host(ops.max_unpool2d(_dev(g, xp), idx, output_size=(cfg.h, cfg.w), **_pool_kw(cfg)))
    sel = _select(x2, _host(idx))
    kh, kw = cfg.kernel
    depth = max(g.size, kh * kw + x2.size) + 1
    assert_adjoint(_vdot(sel, g), _vdot(x2, z), dtype=dtype, n_terms=depth,
                   abs_sum=_vdot(np.abs(sel), np.abs(g)), err_msg=repr(cfg))


@dtypes
@given(cfg=pool_configs(ties=False))
def test_avg_unpool2d_is_adjoint_of_avg_pool2d(xp, dtype, cfg):
    """⟨avg_pool2d(x), g⟩ = ⟨x, avg_unpool2d(g, output_size=(h, w))⟩, Eq. (2.8)."""
    rng = cfg.rng()
    x, g = random_array(rng, cfg.x_shape, dtype), random_array(rng, cfg.y_shape, dtype)
    y = _host(ops.avg_pool2d(_dev(x, xp), **_pool_kw(cfg)))
    z = _host(ops.avg_unpool2d(_dev(g, xp), output_size=(cfg.h, cfg.w), **_pool_kw(cfg)))
    kh, kw = cfg.kernel
    depth = kh * kw + max(g.size, x.size) + 3
    abs_sum = _vdot(oracles.avg_pool2d(np.abs(x).astype(F64), **_pool_kw(cfg)), np.abs(g))
    assert_adjoint(_vdot(y, g), _vdot(x, z), dtype=dtype, n_terms=depth, abs_sum=abs_sum, err_msg=repr(cfg))


@dtypes
@given(cfg=linear_configs())
def test_linear_adjoints(xp, dtype, cfg):
    """⟨linear(x, w), g⟩ = ⟨x, linear_transpose(g, w)⟩ = ⟨w, linear_weight_grad(x, g)⟩, Eq. (2.11)."""
    rng = cfg.rng()
    x, w, g = (random_array(rng, s, dtype) for s in ((cfg.n, cfg.i), (cfg.o, cfg.i), (cfg.n, cfg.o)))
    y = _host(ops.linear(_dev(x, xp), _dev(w, xp)))
    z = _host(ops.linear_transpose(_dev(g, xp), _dev(w, xp)))
    dw = _host(ops.linear_weight_grad(_dev(x, xp), _dev(g, xp)))
    abs_sum = _vdot(np.abs(x).astype(F64) @ np.abs(w).astype(F64).T, np.abs(g))
    lhs = _vdot(y, g)
    depth = max(cfg.i + g.size, cfg.o + x.size, cfg.n + w.size) + 2
    assert_adjoint(lhs, _vdot(x, z), dtype=dtype, n_terms=depth, abs_sum=abs_sum, err_msg=repr(cfg))
    assert_adjoint(lhs, _vdot(w, dw), dtype=dtype, n_terms=depth, abs_sum=abs_sum, err_msg=repr(cfg))


# ---------------------------------------------------------------------------------------------
# (5) dtype: float32 in -> float32 out, float64 -> float64, every primitive and backend
# ---------------------------------------------------------------------------------------------

def _case_inputs(dtype):
    rng = np.random.default_rng(7)
    x = random_array(rng, (2, 3, 6, 5), dtype)
    w = random_array(rng, (4, 3, 3, 2), dtype)
    b = random_array(rng, (4,), dtype)
    g = random_array(rng, (2, 4, 3, 3), dtype)  # conv2d(x, w, stride=2, padding=1) output
    gp = random_array(rng, (2, 3, 3, 2), dtype)  # pool output of x with kernel 2, stride 2
    xl, wl, gl = (random_array(rng, s, dtype) for s in ((3, 5), (4, 5), (3, 4)))
    return dict(x=x, w=w, b=b, g=g, gp=gp, xl=xl, wl=wl, gl=gl)


_conv_geo = dict(stride=2, padding=1)
PRIMITIVES = {
    "conv2d": lambda a, d: ops.conv2d(d(a["x"]), d(a["w"]), d(a["b"]), **_conv_geo),
    "conv2d_transpose": lambda a, d: ops.conv2d_transpose(d(a["g"]), d(a["w"]), output_size=(6, 5), **_conv_geo),
    "conv2d_weight_grad": lambda a, d: ops.conv2d_weight_grad(d(a["x"]), d(a["g"]), kernel_size=(3, 2),
                                                              **_conv_geo),
    "conv2d_bias_grad": lambda a, d: ops.conv2d_bias_grad(d(a["g"])),
    "max_pool2d": lambda a, d: ops.max_pool2d(d(a["x"]))[0],
    "max_unpool2d": lambda a, d: ops.max_unpool2d(d(a["gp"]), ops.max_pool2d(d(a["x"]))[1], output_size=(6, 5)),
    "avg_pool2d": lambda a, d: ops.avg_pool2d(d(a["x"])),
    "avg_unpool2d": lambda a, d: ops.avg_unpool2d(d(a["gp"]), output_size=(6, 5)),
    "linear": lambda a, d: ops.linear(d(a["xl"]), d(a["wl"]), d(a["b"])),
    "linear_transpose": lambda a, d: ops.linear_transpose(d(a["gl"]), d(a["wl"])),
    "linear_weight_grad": lambda a, d: ops.linear_weight_grad(d(a["xl"]), d(a["gl"])),
    "hard_sigmoid": lambda a, d: ops.hard_sigmoid(d(a["x"])),
    "hard_sigmoid_grad": lambda a, d: ops.hard_sigmoid_grad(d(a["x"])),
    "half_hard_sigmoid": lambda a, d: ops.half_hard_sigmoid(d(a["x"])),
    "half_hard_sigmoid_grad": lambda a, d: ops.half_hard_sigmoid_grad(d(a["x"])),
}


@dtypes
@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_dtype_is_preserved(xp, dtype, name):
    """Every primitive of §2 returns its input's dtype and namespace (Eq. (2.1) to Eq. (2.11) are
    evaluated in the working precision; nothing is promoted or demoted)."""
    out = PRIMITIVES[name](_case_inputs(dtype), lambda a: _dev(a, xp))
    assert backend.backend_name(backend.namespace_of(out)) == backend.backend_name(xp)
    assert _host(out).dtype == dtype


def test_max_pool2d_indices_are_int64(xp):
    """max_pool2d's indices are int64 whatever the float dtype (Eq. (2.6))."""
    for dtype in (F32, F64):
        _, idx = ops.max_pool2d(_dev(_case_inputs(dtype)["x"], xp))
        assert _host(idx).dtype == np.int64


@given(cfg=conv_configs())
def test_float32_convolutions_match_oracle(xp, cfg):
    """In float32, conv2d, conv2d_transpose and conv2d_weight_grad (Eq. (2.1), Eq. (2.3), Eq. (2.4)) stay
    within the float32 rounding bound of the float64 oracle run on the same float32 inputs."""
    x, w, b, g = _conv_arrays(cfg, F32)
    kw_ = _conv_kw(cfg)
    kh, kw = cfg.kernel
    ho, wo = cfg.out_hw
    a = {k: np.abs(v).astype(F64) for k, v in dict(x=x, w=w, b=b, g=g).items()}
    y = ops.conv2d(_dev(x, xp), _dev(w, xp), _dev(b, xp), **kw_)
    assert_allclose_dtype(_host(y), oracles.conv2d(x, w, b, **kw_), dtype=F32, n_terms=cfg.c * kh * kw + 2,
                          abs_scale=oracles.conv2d(a["x"], a["w"], a["b"], **kw_), err_msg=repr(cfg))
    z = ops.conv2d_transpose(_dev(g, xp), _dev(w, xp), output_size=(cfg.h, cfg.w), **kw_)
    assert_allclose_dtype(_host(z), oracles.conv2d_transpose(g, w, output_size=(cfg.h, cfg.w), **kw_), dtype=F32,
                          n_terms=cfg.o * kh * kw + 1,
                          abs_scale=oracles.conv2d_transpose(a["g"], a["w"], output_size=(cfg.h, cfg.w), **kw_),
                          err_msg=repr(cfg))
    dw = ops.conv2d_weight_grad(_dev(x, xp), _dev(g, xp), kernel_size=cfg.kernel, **kw_)
    assert_allclose_dtype(_host(dw), oracles.conv2d_weight_grad(x, g, kernel_size=cfg.kernel, **kw_), dtype=F32,
                          n_terms=cfg.n * ho * wo + 1,
                          abs_scale=oracles.conv2d_weight_grad(a["x"], a["g"], kernel_size=cfg.kernel, **kw_),
                          err_msg=repr(cfg))


@given(cfg=pool_configs())
def test_float32_pooling_matches_oracle(xp, cfg):
    """In float32, max_pool2d (Eq. (2.6), exact), max_unpool2d (Eq. (2.7)) and avg pooling
    (Eq. (2.8)) stay within the float32 rounding bound of the oracles."""
    rng = cfg.rng()
    x = random_array(rng, cfg.x_shape, F32, integer=cfg.ties)
    g = random_array(rng, cfg.y_shape, F32)
    kh, kw = cfg.kernel
    pk, size = _pool_kw(cfg), (cfg.h, cfg.w)
    y, idx = ops.max_pool2d(_dev(x, xp), **pk)
    ey, eidx = oracles.max_pool2d(x, **pk)
    assert _host(y).dtype == F32
    np.testing.assert_array_equal(_host(y), ey)
    np.testing.assert_array_equal(_host(idx), eidx)
    z = ops.max_unpool2d(_dev(g, xp), idx, output_size=size, **pk)
    assert_allclose_dtype(_host(z), oracles.max_unpool2d(g, eidx, output_size=size), dtype=F32,
                          n_terms=kh * kw + 1, abs_scale=oracles.max_unpool2d(np.abs(g), eidx, output_size=size),
                          err_msg=repr(cfg))
    ya = ops.avg_pool2d(_dev(x, xp), **pk)
    assert_allclose_dtype(_host(ya), oracles.avg_pool2d(x, **pk), dtype=F32, n_terms=kh * kw + 3,
                          abs_scale=oracles.avg_pool2d(np.abs(x), **pk), err_msg=repr(cfg))
    za = ops.avg_unpool2d(_dev(g, xp), output_size=size, **pk)
    assert_allclose_dtype(_host(za), oracles.avg_unpool2d(g, output_size=size, **pk), dtype=F32,
                          n_terms=kh * kw + 3, abs_scale=oracles.avg_unpool2d(np.abs(g), output_size=size, **pk),
                          err_msg=repr(cfg))


# ---------------------------------------------------------------------------------------------
# (6) Activations: values, derivatives by finite differences away from the kinks
# ---------------------------------------------------------------------------------------------
#
# Kinks (documented in pyeqprop.ops.activations): hard_sigmoid ρ(u) = clip(u, 0, 1) has
# kinks at u = 0 and u = 1 (Eq. (2.9)); half_hard_sigmoid ρ(u) = clip(u/2, 0, 1) at u = 0 and
# u = 2 (Eq. (2.10)). There ρ has no derivative; the library's convention is ρ' = 0 at a kink.
# Finite differences are taken only at distance ≥ MARGIN > H from every kink, so both
# evaluation points lie on one linear piece.

ACT = {
    "hard_sigmoid": (ops.hard_sigmoid, ops.hard_sigmoid_grad, lambda u: np.clip(u, 0.0, 1.0), (0.0, 1.0), 1.0),
    "half_hard_sigmoid": (ops.half_hard_sigmoid, ops.half_hard_sigmoid_grad, lambda u: np.clip(u / 2, 0.0, 1.0),
                          (0.0, 2.0), 0.5),
}
H = 2.0**-20  # finite-difference step, a power of two so 2H and the division by it are exact
MARGIN = 2.0**-10


def _fd_bound(u, slope):
    """Rounding bound of the central difference (ρ(u+H) − ρ(u−H))/(2H) of a linear piece of
    slope σ, in float64: u ± H are rounded (relative u_r each, so ρ moves by ≤ σ·u_r(|u|+H)),
    the subtraction adds ≤ u_r|difference| and the division by 2H is exact:
    |FD − σ| ≤ σ·u_r·((|u| + H)(1 + u_r)/H + 1)."""
    ur = unit_roundoff(F64)
    return slope * ur * ((np.abs(u) + H) * (1 + ur) / H + 1)


@st.composite
def _points_off_kinks(draw, kinks):
    """Points u on every linear piece, each at distance ≥ MARGIN from all kinks."""
    lo, hi = kinks
    pieces = [(lo - 4.0, lo - MARGIN), (lo + MARGIN, hi - MARGIN), (hi + MARGIN, hi + 4.0)]
    return np.array([draw(st.floats(a, b)) for a, b in pieces for _ in range(3)])


@pytest.mark.parametrize("name", sorted(ACT))
def test_activation_values(xp, name):
    """hard_sigmoid = clip(u, 0, 1) (Eq. (2.9)), half_hard_sigmoid = clip(u/2, 0, 1) (Eq. (2.10)),
    exactly (clipping and halving are exact), kinks and far tails included."""
    fn, _, ref, kinks, _ = ACT[name]
    u = np.concatenate([np.random.default_rng(3).uniform(-3, 5, 200), kinks, [-1e300, 1e300, -0.0]])
    np.testing.assert_array_equal(_host(fn(_dev(u, xp))), ref(u))


@pytest.mark.parametrize("name", sorted(ACT))
@given(data=st.data())
def test_activation_grad_matches_finite_difference(xp, name, data):
    """ρ' equals the central finite difference of ρ away from the kinks (Eq. (2.9), Eq. (2.10)):
    σ inside (0, kink₂), 0 outside, within the derived rounding bound."""
    fn, grad, _, kinks, slope = ACT[name]
    u = data.draw(_points_off_kinks(kinks))
    fd = (_host(fn(_dev(u + H, xp))) - _host(fn(_dev(u - H, xp)))) / (2 * H)
    g = _host(grad(_dev(u, xp)))
    assert np.all(np.abs(g - fd) <= _fd_bound(u, slope)), (u, g, fd)
    np.testing.assert_array_equal(g, np.where((u > kinks[0]) & (u < kinks[1]), slope, 0.0))


@pytest.mark.parametrize("name", sorted(ACT))
def test_activation_kinks(xp, name):
    """At each documented kink the one-sided difference quotients differ (it is a kink, so a
    finite difference there would be meaningless), ρ is continuous, and ρ' follows the
    convention ρ' = 0 (Eq. (2.9), Eq. (2.10))."""
    fn, grad, _, kinks, slope = ACT[name]
    k = np.array(kinks)
    f = lambda v: _host(fn(_dev(v, xp)))  # noqa: E731
    right = (f(k + H) - f(k)) / H
    left = (f(k) - f(k - H)) / H
    np.testing.assert_array_equal(np.sort(np.abs(right - left)), [slope, slope])
    np.testing.assert_array_equal(_host(grad(_dev(k, xp))), [0.0, 0.0])
