"""iterate_batches: coverage, order, dtypes and backends."""
import numpy as np
import pytest

from pyeqprop.backend import get_namespace, to_numpy
from pyeqprop.data import iterate_batches, num_batches

BACKENDS = ["numpy", "array_api_strict"]


def _xp(name):
    if name == "array_api_strict":
        pytest.importorskip("array_api_strict")
    return get_namespace(name)


def _split(n=23):
    x = np.arange(n * 2 * 3 * 3, dtype=np.float32).reshape(n, 2, 3, 3)
    y = (np.arange(n) % 4).astype(np.int32)  # deliberately not int64
    return x, y


@pytest.mark.parametrize("backend", BACKENDS)
def test_shuffled_epoch_covers_every_sample_once(backend):
    xp = _xp(backend)
    x, y = _split()
    rng = np.random.default_rng(0)
    orders = []
    for _ in range(2):
        seen = []
        for xb, yb in iterate_batches(x, y, 5, shuffle=True, rng=rng, xp=backend):
            assert yb.dtype == xp.int64 and xb.dtype == xp.float32 and type(xb) is type(xp.asarray(x))
            xb_h, yb_h = to_numpy(xb), to_numpy(yb)
            ids = (xb_h[:, 0, 0, 0] / 18).astype(int)  # sample id from its first pixel
            assert np.array_equal(yb_h, y[ids]) and np.array_equal(xb_h, x[ids])  # pairs stay together
            seen.extend(ids.tolist())
        assert sorted(seen) == list(range(23))
        orders.append(seen)
    assert orders[0] != orders[1] and orders[0] != list(range(23))  # a fresh permutation per epoch


@pytest.mark.parametrize("backend", BACKENDS)
def test_unshuffled_keeps_order_and_sizes(backend):
    x, y = _split()
    batches = list(iterate_batches(x, y, 10, shuffle=False, xp=backend))
    assert [xb.shape[0] for xb, _ in batches] == [10, 10, 3] and num_batches(23, 10) == 3
    assert np.array_equal(np.concatenate([to_numpy(xb) for xb, _ in batches]), x)
    assert np.array_equal(np.concatenate([to_numpy(yb) for _, yb in batches]), y)
    dropped = [xb.shape[0] for xb, _ in iterate_batches(x, y, 10, shuffle=False, xp=backend, drop_last=True)]
    assert dropped == [10, 10] and num_batches(23, 10, drop_last=True) == 2


def test_device_arrays_are_accepted():
    xp = _xp("array_api_strict")
    x, y = _split(8)
    xd, yd = xp.asarray(x), xp.asarray(y.astype(np.int64))
    batches = list(iterate_batches(xd, yd, 4, shuffle=True, rng=np.random.default_rng(1), xp=xp))
    assert len(batches) == 2
    got = np.concatenate([to_numpy(b[1]) for b in batches])
    assert sorted(got.tolist()) == sorted(y.tolist())


def test_errors():
    x, y = _split()
    with pytest.raises(TypeError, match="Generator"):
        iterate_batches(x, y, 4, shuffle=True, rng=None, xp="numpy")
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(x, y, 0, shuffle=False, xp="numpy")
    with pytest.raises(ValueError, match="samples"):
        iterate_batches(x, y[:-1], 4, shuffle=False, xp="numpy")
