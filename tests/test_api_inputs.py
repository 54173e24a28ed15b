"""What the library API accepts and how it refuses the rest (issue 15, items 6 and 14).

Labels outside 0 … K−1 used to be accepted silently (an all-zero one-hot target); NumPy scalars as β,
NumPy dtypes, lists, empty batches and a missing architecture gave rejections or tracebacks that did
not say what was wrong. Each case here is refused with a ``TypeError``/``ValueError`` naming the value,
or accepted and computed in the network's dtype.
"""
from __future__ import annotations

import numpy as np
import pytest

import pyeqprop as pe
from pyeqprop.learning import ESTIMATORS, bptt_gradients, estimate
from pyeqprop.model.teacher import Teacher

X = np.random.default_rng(0).random((4, 1, 8, 8)).astype(np.float32)


def net(**kw):
    return pe.CRNN("c4m-f10", (1, 8, 8), num_classes=10, xp="numpy", **kw)


def ep(n, x, y, **kw):
    return pe.ep_gradients(n, x, y, **{"beta": 0.5, "T1": 3, "T2": 2, **kw})


# ---------------------------------------------------------------------- item 6: labels
@pytest.mark.parametrize("y, words", [
    (np.array([0, 1, 2, 10]), "y holds the label 10, outside 0 … 9 (the network has num_classes=10)"),
    (np.array([0, 1, 2, -1]), "y holds the label -1, outside 0 … 9"),
    (np.array([0.0, 1.0, 2.0, 3.0]), "y must hold integer class labels, got dtype float64"),
    (np.array([0, 1, 2]), "y must have shape (4,), got (3,)"),
])
@pytest.mark.parametrize("name", ["ep_gradients", "bptt_gradients", *ESTIMATORS])
def test_bad_labels_are_refused_by_every_gradient(name, y, words):
    def call():
        if name == "ep_gradients":
            return ep(net(), X, y)
        if name == "bptt_gradients":
            return bptt_gradients(net(), X, y, T=3)
        return estimate(name, net(), X, y, beta=0.5, T1=3, T2=2, sign=1)

    with pytest.raises(ValueError) as info:
        call()
    assert words in str(info.value)


def test_labels_in_range_are_accepted_on_the_strict_namespace():
    xs = pytest.importorskip("array_api_strict")
    n = pe.CRNN("c4m-f10", (1, 8, 8), num_classes=10, xp="array_api_strict")
    g = pe.ep_gradients(n, xs.asarray(X), xs.asarray(np.array([0, 9, 3, 3])), beta=0.5, T1=3, T2=2)
    assert set(g) == set(n.params)
    with pytest.raises(ValueError, match="label 12"):
        pe.ep_gradients(n, xs.asarray(X), xs.asarray(np.array([0, 12, 3, 3])), beta=0.5, T1=3, T2=2)


# ---------------------------------------------------------------------- item 14: β, dtype, x, arch
@pytest.mark.parametrize("beta", [np.float32(0.5), np.float64(0.5), 0.5, 1])
def test_numpy_scalar_beta_is_accepted_and_keeps_the_networks_dtype(beta):
    """np.float32(0.5) was refused; np.float64(0.5) promoted a float32 network's gradients to float64."""
    g = ep(net(), X, np.arange(4), beta=beta)
    assert {v.dtype for v in g.values()} == {np.dtype(np.float32)}
    want = ep(net(), X, np.arange(4), beta=0.5 if beta != 1 else 1.0)
    assert all(np.array_equal(g[k], want[k]) for k in g)


@pytest.mark.parametrize("beta", [True, np.bool_(True), "0.5", None, float("nan"), -0.5])
def test_beta_that_is_not_a_positive_number_is_refused(beta):
    with pytest.raises(ValueError, match="beta must be a positive finite number"):
        ep(net(), X, np.arange(4), beta=beta)


def test_a_list_is_reported_as_not_an_array():
    """It was reported as "arrays from different namespaces were mixed"."""
    with pytest.raises(TypeError) as info:
        ep(net(), X.tolist(), np.arange(4))
    assert str(info.value).startswith("expected an array (numpy, cupy or array_api_strict), got list")
    with pytest.raises(TypeError, match="expected an array .*got list"):
        ep(net(), X, [0, 1, 2, 3])


def test_an_empty_batch_is_refused():
    """It failed with a raw reshape error."""
    with pytest.raises(ValueError, match=r"x is an empty batch \(shape \(0, 1, 8, 8\)\)"):
        ep(net(), X[:0], np.arange(0))


@pytest.mark.parametrize("arch, shape, error, words", [
    (None, (1, 8, 8), TypeError, "arch must be a spec string such as 'c16m-c32m' or a preset name, got None"),
    (16, (1, 8, 8), TypeError, "arch must be a spec string"),
    ("c4m", None, TypeError, "input_shape must be a sequence (c, h, w) of three integers, got None"),
])
def test_missing_architecture_is_refused(arch, shape, error, words):
    """CRNN(None, …) raised an AttributeError from inside the parser."""
    with pytest.raises(error) as info:
        pe.CRNN(arch, shape)
    assert words in str(info.value)


@pytest.mark.parametrize("dtype, name", [("float32", "float32"), (np.float32, "float32"), (np.float64, "float64"),
                                         (np.dtype("float64"), "float64"), (np.dtype(np.float32), "float32")])
def test_dtype_may_be_a_numpy_type_or_dtype(dtype, name):
    """Only the strings were accepted."""
    assert net(dtype=dtype).dtype_name == name
    assert Teacher("c4m", (1, 8, 8), dtype=dtype, xp="numpy").dtype_name == name


def test_dtype_may_be_the_namespaces_own():
    xs = pytest.importorskip("array_api_strict")
    n = pe.CRNN("c4m", (1, 8, 8), dtype=xs.float64, xp="array_api_strict")
    assert n.dtype_name == "float64" and n.params["conv1.weight"].dtype == xs.float64


@pytest.mark.parametrize("dtype", [np.int32, "int8", None, np.float16, 3])
def test_other_dtypes_are_refused_naming_the_value(dtype):
    with pytest.raises(ValueError) as info:
        net(dtype=dtype)
    assert str(info.value).startswith("dtype must be 'float32' or 'float64'") and repr(dtype) in str(info.value)
