"""Unit tests of the primitives' argument checking and of the backend switch.

Every invalid call raises ValueError naming the offending argument and what was expected;
mixing array libraries raises TypeError; an unusable backend raises BackendError.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from pyeqprop import backend, ops
from pyeqprop.backend import BackendError

F32, F64 = np.float32, np.float64


def _r(*shape, dtype=F64):
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def raises(msg_regex, exc=ValueError):
    return pytest.raises(exc, match=msg_regex)


# --- rank -----------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: ops.conv2d(_r(3, 5, 5), _r(2, 3, 3, 3)),
         r"x must have rank 4 \(n, c, h, w\), got shape \(3, 5, 5\)"),
        (lambda: ops.conv2d(_r(1, 3, 5, 5), _r(3, 3, 3)),
         r"w must have rank 4 \(o, c, k_h, k_w\), got shape \(3, 3, 3\)"),
        (lambda: ops.conv2d_transpose(_r(2, 3, 3), _r(2, 3, 3, 3), output_size=(5, 5)),
         r"g must have rank 4 \(n, o, h', w'\), got shape \(2, 3, 3\)"),
        (lambda: ops.conv2d_weight_grad(_r(1, 3, 5, 5), _r(2, 3, 3), kernel_size=3),
         r"g must have rank 4 \(n, o, h', w'\)"),
        (lambda: ops.conv2d_bias_grad(_r(2, 3)), r"g must have rank 4"),
        (lambda: ops.max_pool2d(_r(4, 4)), r"x must have rank 4 \(n, c, h, w\), got shape \(4, 4\)"),
        (lambda: ops.avg_pool2d(_r(1, 4, 4)), r"x must have rank 4 \(n, c, h, w\)"),
        (lambda: ops.avg_unpool2d(_r(2, 2), output_size=(4, 4)), r"y must have rank 4 \(n, c, h, w\)"),
        (lambda: ops.max_unpool2d(_r(2, 2), np.zeros((2, 2), np.int64), output_size=(4, 4)), r"y must have rank 4"),
        (lambda: ops.linear(_r(2, 3, 1), _r(4, 3)), r"x must have rank 2 \(n, i\), got shape \(2, 3, 1\)"),
    ],
    ids=["conv2d-x", "conv2d-w", "transpose-g", "weight_grad-g", "bias_grad-g", "max_pool-x", "avg_pool-x",
         "avg_unpool-y", "max_unpool-y", "linear-x"],
)
def test_wrong_rank(call, pattern):
    with raises(pattern):
        call()


# --- shapes that do not fit together -----------------------------------------------------------

def test_conv2d_channel_mismatch_names_expected_w_shape():
    with raises(re.escape("w has 2 input channels but x has 3: expected w of shape (4, 3, 3, 3)")):
        ops.conv2d(_r(1, 3, 5, 5), _r(4, 2, 3, 3))


def test_conv2d_transpose_channel_mismatch():
    with raises(re.escape("w has 5 output channels but g has 4: expected w of shape (4, c, 3, 3)")):
        ops.conv2d_transpose(_r(1, 4, 3, 3), _r(5, 3, 3, 3), output_size=(5, 5))


def test_conv2d_bias_shape():
    with raises(re.escape("b must have shape (4,), got (3,)")):
        ops.conv2d(_r(1, 3, 5, 5), _r(4, 3, 3, 3), _r(3))


def test_conv2d_weight_grad_g_shape():
    # x (2, 3, 5, 5), k 3, s 1, p 0 -> g must be (2, o, 3, 3)
    with raises(re.escape("g must have shape (2, o, 3, 3) for x of shape (2, 3, 5, 5), got (2, 4, 4, 3)")):
        ops.conv2d_weight_grad(_r(2, 3, 5, 5), _r(2, 4, 4, 3), kernel_size=3)
    with raises(r"g must have shape \(2, o, 3, 3\)"):
        ops.conv2d_weight_grad(_r(2, 3, 5, 5), _r(1, 4, 3, 3), kernel_size=3)  # batch differs


@pytest.mark.parametrize("size", [(6, 5), (9, 5), (5, 7), (1, 1)])
def test_conv2d_transpose_output_size_inconsistent(size):
    # g (1, 4, 3, 3) from k 3, s 2, p 0: h in [7, 8] gives h' = 3
    with raises(r"output_size [hw]=\d+ is inconsistent with the gradient's spatial size 3 .* "
                r"expected [hw] in \[7, 8\]"):
        ops.conv2d_transpose(_r(1, 4, 3, 3), _r(4, 2, 3, 3), stride=2, output_size=size)


def test_conv2d_transpose_accepts_every_consistent_output_size():
    for h in (7, 8):
        z = ops.conv2d_transpose(_r(1, 4, 3, 3), _r(4, 2, 3, 3), stride=2, output_size=(h, 8))
        assert z.shape == (1, 2, h, 8)
    z = ops.conv2d_transpose(_r(1, 4, 3, 3), _r(4, 2, 3, 3), stride=2, output_size=(1, 2, 7, 7))  # x.shape
    assert z.shape == (1, 2, 7, 7)


def test_output_size_required():
    with raises("output_size is required"):
        ops.conv2d_transpose(_r(1, 4, 3, 3), _r(4, 2, 3, 3), output_size=None)
    with raises("output_size is required"):
        ops.avg_unpool2d(_r(1, 1, 2, 2), output_size=None)


@pytest.mark.parametrize("unpool", ["max", "avg"])
def test_unpool_output_size_inconsistent(unpool):
    y = _r(1, 2, 2, 3)  # from k 2, s 2: h in [4, 5], w in [6, 7]
    call = (lambda s: ops.max_unpool2d(y, np.zeros(y.shape, np.int64), output_size=s)) if unpool == "max" \
        else (lambda s: ops.avg_unpool2d(y, output_size=s))
    with raises(re.escape("output_size h=6 is inconsistent with the pooled size 2 (kernel 2, stride 2): "
                          "expected h in [4, 5]")):
        call((6, 6))
    with raises(re.escape("output_size w=5 is inconsistent with the pooled size 3 (kernel 2, stride 2): "
                          "expected w in [6, 7]")):
        call((4, 5))


def test_max_unpool2d_indices_shape_mismatch():
    with raises(re.escape("indices must have the shape of y (1, 2, 2, 2), got (1, 2, 2, 1)")):
        ops.max_unpool2d(_r(1, 2, 2, 2), np.zeros((1, 2, 2, 1), np.int64), output_size=(4, 4))


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: ops.linear(_r(2, 3), _r(4, 5)), re.escape("w must have shape (o, 3), got (4, 5)")),
        (lambda: ops.linear(_r(2, 3), _r(4, 3), _r(5)), re.escape("b must have shape (4,), got (5,)")),
        (lambda: ops.linear_transpose(_r(2, 3), _r(4, 5)),
         re.escape("g must have shape (n, 4) for w (4, 5), got (2, 3)")),
        (lambda: ops.linear_weight_grad(_r(2, 3), _r(3, 4)), r"x \(n, i\) and g \(n, o\) must share n"),
    ],
    ids=["linear-w", "linear-b", "linear_transpose-g", "linear_weight_grad-n"],
)
def test_linear_shapes(call, pattern):
    with raises(pattern):
        call()


# --- geometry ------------------------------------------------------------------------------------

def test_negative_padding():
    with raises(re.escape("padding must be >= 0, got (0, -1)")):
        ops.conv2d(_r(1, 1, 5, 5), _r(1, 1, 3, 3), padding=(0, -1))
    with raises("padding must be >= 0"):
        ops.conv2d_transpose(_r(1, 1, 3, 3), _r(1, 1, 3, 3), padding=-1, output_size=(5, 5))


@pytest.mark.parametrize(
    "call",
    [
        lambda: ops.conv2d(_r(1, 1, 5, 5), _r(1, 1, 3, 3), stride=0),
        lambda: ops.conv2d_weight_grad(_r(1, 1, 5, 5), _r(1, 1, 3, 3), kernel_size=3, stride=(1, 0)),
        lambda: ops.max_pool2d(_r(1, 1, 4, 4), stride=0),
        lambda: ops.avg_pool2d(_r(1, 1, 4, 4), stride=(0, 2)),
    ],
    ids=["conv2d", "weight_grad", "max_pool", "avg_pool"],
)
def test_stride_zero(call):
    with raises(r"stride must be >= 1, got \(\d, \d\)"):
        call()


def test_kernel_larger_than_padded_input():
    with raises(re.escape("kernel size 5 is larger than the padded input 2 + 2*1 = 4")):
        ops.conv2d(_r(1, 1, 2, 6), _r(1, 1, 5, 3), padding=1)
    with raises(re.escape("pooling kernel 3 is larger than the input size 2")):
        ops.max_pool2d(_r(1, 1, 2, 4), kernel_size=3, stride=1)


@pytest.mark.parametrize("bad", [True, (1, 2, 3), "3", (1.0, 2)])
def test_malformed_geometry_names_argument(bad):
    with raises(r"kernel_size must be an int or a pair of ints"):
        ops.max_pool2d(_r(1, 1, 4, 4), kernel_size=bad)


# --- dtypes -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: ops.conv2d(_r(1, 2, 4, 4, dtype=F32), _r(3, 2, 3, 3)),
         r"w has dtype float64 but the input has dtype float32"),
        (lambda: ops.conv2d(_r(1, 2, 4, 4), _r(3, 2, 3, 3), _r(3, dtype=F32)),
         r"b has dtype float32 but the input has dtype float64"),
        (lambda: ops.conv2d_transpose(_r(1, 3, 2, 2, dtype=F32), _r(3, 2, 3, 3), output_size=(4, 4)),
         r"w has dtype float64 but the input has dtype float32"),
        (lambda: ops.conv2d_weight_grad(_r(1, 2, 4, 4), _r(1, 3, 2, 2, dtype=F32), kernel_size=3),
         r"g has dtype float32 but the input has dtype float64"),
        (lambda: ops.linear(_r(2, 3, dtype=F32), _r(4, 3)), r"w has dtype float64 but x has dtype float32"),
        (lambda: ops.linear(_r(2, 3, dtype=F32), _r(4, 3, dtype=F32), _r(4)),
         r"b has dtype float64 but x has dtype float32"),
        (lambda: ops.linear_transpose(_r(2, 4, dtype=F32), _r(4, 3)), r"w has dtype float64 but g has dtype float32"),
        (lambda: ops.linear_weight_grad(_r(2, 3), _r(2, 4, dtype=F32)), r"g has dtype float32 but x has dtype float64"),
    ],
    ids=["conv2d-w", "conv2d-b", "transpose-w", "weight_grad-g", "linear-w", "linear-b", "linear_transpose-w",
         "linear_weight_grad-g"],
)
def test_dtype_mismatch(call, pattern):
    with raises(pattern):
        call()


def test_unknown_activation():
    with raises(r"unknown activation 'relu'; expected one of \['half_hard_sigmoid', 'hard_sigmoid'\]"):
        ops.get_activation("relu")


# --- a batch of one ---------------------------------------------------------------------------

def test_batch_of_one_shapes():
    x, w, g = _r(1, 3, 5, 4), _r(2, 3, 3, 2), _r(1, 2, 3, 3)  # conv k (3, 2), s 2, p 1 -> (3, 3)
    assert ops.conv2d(x, w, stride=2, padding=1).shape == (1, 2, 3, 3)
    assert ops.conv2d_transpose(g, w, stride=2, padding=1, output_size=(5, 4)).shape == (1, 3, 5, 4)
    assert ops.conv2d_weight_grad(x, g, kernel_size=(3, 2), stride=2, padding=1).shape == (2, 3, 3, 2)
    assert ops.conv2d_bias_grad(g).shape == (2,)
    y, idx = ops.max_pool2d(x)
    assert y.shape == idx.shape == (1, 3, 2, 2)
    assert ops.max_unpool2d(y, idx, output_size=(5, 4)).shape == (1, 3, 5, 4)
    assert ops.avg_unpool2d(ops.avg_pool2d(x), output_size=(5, 4)).shape == (1, 3, 5, 4)
    assert ops.linear(_r(1, 3), _r(4, 3), _r(4)).shape == (1, 4)
    assert ops.linear_transpose(_r(1, 4), _r(4, 3)).shape == (1, 3)
    assert ops.linear_weight_grad(_r(1, 3), _r(1, 4)).shape == (4, 3)


def test_batch_of_one_equals_slice_of_batch():
    """Each sample's result does not depend on the others (n = 1 is not a special case)."""
    x, w = _r(3, 2, 6, 5), _r(4, 2, 3, 3)
    full = ops.conv2d(x, w, padding=1)
    for n in range(3):
        np.testing.assert_array_equal(ops.conv2d(x[n:n + 1], w, padding=1), full[n:n + 1])
    np.testing.assert_array_equal(ops.max_pool2d(x[1:2])[1], ops.max_pool2d(x)[1][1:2])


# --- backends ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def xs():
    return pytest.importorskip("array_api_strict", reason="array-api-strict is not installed")


def test_namespace_of_rejects_mixed_backends(xs):
    with raises(r"arrays from different namespaces were mixed in one call: "
                r"\['array_api_strict\._array_object\.Array', 'numpy\.ndarray'\]", TypeError):
        backend.namespace_of(np.zeros(2), xs.asarray([1.0, 2.0]))


@pytest.mark.parametrize(
    "call",
    [
        lambda s: ops.conv2d(_r(1, 2, 4, 4), s(_r(3, 2, 3, 3))),
        lambda s: ops.conv2d(_r(1, 2, 4, 4), _r(3, 2, 3, 3), s(_r(3))),
        lambda s: ops.conv2d_transpose(s(_r(1, 3, 2, 2)), _r(3, 2, 3, 3), output_size=(4, 4)),
        lambda s: ops.conv2d_weight_grad(_r(1, 2, 4, 4), s(_r(1, 3, 2, 2)), kernel_size=3),
        lambda s: ops.max_unpool2d(s(_r(1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.int64), output_size=(4, 4)),
        lambda s: ops.linear(s(_r(2, 3)), _r(4, 3)),
        lambda s: ops.linear_transpose(_r(2, 4), s(_r(4, 3))),
        lambda s: ops.linear_weight_grad(s(_r(2, 3)), _r(2, 4)),
    ],
    ids=["conv2d-w", "conv2d-b", "transpose", "weight_grad", "max_unpool", "linear", "linear_transpose",
         "linear_weight_grad"],
)
def test_primitives_reject_mixed_backends(xs, call):
    with raises("different namespaces", TypeError):
        call(lambda a: backend.asarray(a, xp="array_api_strict"))


@pytest.fixture
def clean_backend(monkeypatch):
    """No process default set (as at import), no environment variable; restored afterwards."""
    monkeypatch.setattr(backend, "_default_name", None)
    monkeypatch.delenv("PYEQPROP_BACKEND", raising=False)
    return monkeypatch


def test_default_backend_is_numpy(clean_backend):
    assert backend.backend_name(backend.get_backend()) == "numpy"


def test_env_var_selects_backend(clean_backend, xs):
    clean_backend.setenv("PYEQPROP_BACKEND", "array_api_strict")
    assert backend.get_backend() is xs
    assert backend.backend_name(backend.namespace_of(backend.asarray([1.0]))) == "array_api_strict"
    clean_backend.setenv("PYEQPROP_BACKEND", "")
    assert backend.backend_name(backend.get_backend()) == "numpy"


def test_env_var_unknown_backend(clean_backend):
    clean_backend.setenv("PYEQPROP_BACKEND", "jax")
    with raises(r"unknown backend 'jax'; expected one of numpy, cupy, array_api_strict", BackendError):
        backend.get_backend()


def test_set_backend_overrides_env_var(clean_backend, xs):
    clean_backend.setenv("PYEQPROP_BACKEND", "numpy")
    assert backend.set_backend("array_api_strict") is xs
    assert backend.get_backend() is xs
    assert backend.backend_name(backend.set_backend("numpy")) == "numpy"
    assert backend.backend_name(backend.get_backend()) == "numpy"


def test_set_backend_unknown_name_keeps_previous(clean_backend, xs):
    backend.set_backend("array_api_strict")
    with raises("unknown backend 'torch'", BackendError):
        backend.set_backend("torch")
    assert backend.get_backend() is xs


def test_set_backend_cupy_without_gpu(clean_backend):
    if backend.cupy_available():
        pytest.skip("a GPU with CuPy is present: the no-GPU error cannot be provoked")
    with raises(r"backend 'cupy' was requested but", BackendError):
        backend.set_backend("cupy")
    assert backend.backend_name(backend.get_backend()) == "numpy"  # the failed switch changed nothing


def _backends():
    return [pytest.param(n, marks=[pytest.mark.skip(reason="CuPy/GPU not available")]
                         if n == "cupy" and not backend.cupy_available() else [])
            for n in backend.BACKENDS]


@pytest.mark.parametrize("name", _backends())
@pytest.mark.parametrize("dtype", [F32, F64, np.int64])
def test_to_numpy_round_trip(name, dtype):
    if name == "array_api_strict":
        pytest.importorskip("array_api_strict", reason="array-api-strict is not installed")
    a = (np.arange(24).reshape(2, 3, 4) - 7).astype(dtype)
    d = backend.asarray(a, xp=name)
    assert backend.backend_name(backend.namespace_of(d)) == name
    back = backend.to_numpy(d)
    assert isinstance(back, np.ndarray) and back.dtype == dtype
    np.testing.assert_array_equal(back, a)
    # and through a primitive: the result comes back with its dtype
    if dtype != np.int64:
        x = backend.asarray(_r(1, 1, 4, 4, dtype=dtype), xp=name)
        y, idx = ops.max_pool2d(x)
        assert backend.to_numpy(y).dtype == dtype and backend.to_numpy(idx).dtype == np.int64


def test_asarray_dtype_by_name(xs):
    d = backend.asarray([1, 2], xp="array_api_strict", dtype="float32")
    assert d.dtype == xs.float32


@pytest.mark.parametrize("op", ["conv2d", "conv2d_transpose"])
def test_weight_matrix_must_be_that_of_w(op):
    """A weight_matrix= that is not conv_weight_matrix(w) (shape or dtype) is named, with what was expected."""
    w = _r(4, 3, 3, 3)
    call = (lambda m: ops.conv2d(_r(1, 3, 5, 5), w, weight_matrix=m)) if op == "conv2d" else \
        (lambda m: ops.conv2d_transpose(_r(1, 4, 3, 3), w, output_size=(5, 5), weight_matrix=m))
    with pytest.raises(ValueError, match=re.escape("weight_matrix must be conv_weight_matrix(w): shape (27, 4) "
                                                   "and dtype float64, got shape (4, 27)")):
        call(ops.conv_weight_matrix(w).T)
    with pytest.raises(ValueError, match="dtype float64, got shape \\(27, 4\\) and dtype float32"):
        call(ops.conv_weight_matrix(w).astype(np.float32))
