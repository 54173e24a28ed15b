"""Mini-batches on the active backend.

:func:`iterate_batches` moves a whole split to the device once and then cuts batches there, so
an epoch costs one transfer of the split (none when the arrays are already in the namespace)
plus one small index vector per batch when shuffling.
"""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from ..backend import asarray, backend_name, device_of, resolve

__all__ = ["iterate_batches", "num_batches"]


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """Number of batches :func:`iterate_batches` yields for n samples."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def _on(xp, a, dtype):
    """``a`` in namespace ``xp`` with ``dtype``; arrays already there are not copied through the host."""
    if hasattr(a, "__array_namespace__") and not isinstance(a, np.ndarray) and backend_name(xp) != "numpy":
        try:
            from array_api_compat import array_namespace

            if backend_name(array_namespace(a)) == backend_name(xp):
                return a if dtype is None or a.dtype == dtype else xp.astype(a, dtype)
        except TypeError:
            pass
    return asarray(a, xp=xp, dtype=dtype)


def iterate_batches(x, y, batch_size: int, *, shuffle: bool, rng: np.random.Generator | None = None,
                    xp=None, drop_last: bool = False) -> Iterator[tuple]:
    """Yield (x_batch, y_batch) pairs on namespace ``xp`` covering the split once (one epoch).

    Parameters
    ----------
    x : (n, ...) host or device array; kept in its dtype.
    y : (n,) labels; yielded as int64.
    batch_size : samples per batch; the last batch is smaller unless ``drop_last``.
    shuffle : draw a fresh permutation from ``rng`` (``rng.permutation(n)``), else keep order.
    rng : a NumPy ``Generator``, required when ``shuffle``.
    xp : namespace or backend name (``None``: process default, see :mod:`pyeqprop.backend`).

    Every sample appears exactly once per call (``drop_last`` drops the final n mod batch_size).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = x.shape[0]
    if y.shape[0] != n:
        raise ValueError(f"x has {n} samples but y has {y.shape[0]}")
    perm = None
    if shuffle:
        if not isinstance(rng, np.random.Generator):
            raise TypeError("shuffle=True needs rng=numpy.random.Generator (np.random.default_rng(seed))")
        perm = rng.permutation(n).astype(np.int64)
    xp = resolve(xp)
    x_dev = _on(xp, x, None)
    y_dev = _on(xp, y, xp.int64)
    return _batches(xp, x_dev, y_dev, n, batch_size, perm, drop_last)  # checks above run at call time


def _batches(xp, x_dev, y_dev, n, batch_size, perm, drop_last):
    dev = device_of(x_dev)
    for k in range(num_batches(n, batch_size, drop_last)):
        lo, hi = k * batch_size, min((k + 1) * batch_size, n)
        if perm is None:
            yield x_dev[lo:hi, ...], y_dev[lo:hi]
        else:
            idx = xp.asarray(perm[lo:hi], device=dev)
            yield xp.take(x_dev, idx, axis=0), xp.take(y_dev, idx, axis=0)
