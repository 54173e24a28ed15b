"""Batch shards settled in parallel threads: one estimate from k sub-batch estimates (SPEC.md Eq. 4.7).

Notation: a batch of n samples split in order into k contiguous shards of n_1 … n_k samples
(sizes differ by at most one); g_j the estimate of shard j alone.

Φ is a sum over samples and no phase couples two samples, so every estimator (EP's and
BPTT's alike) is a batch mean of per-sample terms, and

    g = Σ_j (n_j / n) g_j, summed in shard order                               (Eq. 4.7)

is the estimate of the whole batch: equal up to rounding when the phases run a fixed
number of steps; with a tolerance (Eq. 3.14) each shard stops when *its* residual is below
it, so the steps taken (not the guarantee r ≤ tol) may differ from an unsharded run. The
sum runs in shard order, so a result depends on the number of shards and never on thread
timing.

The shards run in a pool of k threads, each with one BLAS thread (NumPy releases the GIL in
its matrix products and large element-wise operations, so k threads use k cores where one
process with k BLAS threads parallelises only the products). On a GPU backend one device
already runs each operation in parallel: sharding is refused there.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace

from ..backend import backend_name
from .settle import Settled

__all__ = ["CPU_BACKENDS", "shard_bounds", "sharded", "merge_settled"]

CPU_BACKENDS = ("numpy", "array_api_strict")
"""Backends whose arrays live in host memory, where threads over shards use more cores."""


def shard_bounds(n: int, k: int) -> list[slice]:
    """The k contiguous shards of a batch of n, in order, sizes ⌈n/k⌉ then ⌊n/k⌋ (k ≤ n)."""
    if not (isinstance(k, int) and 1 <= k <= n):
        raise ValueError(f"shards must be an integer in [1, {n}] for a batch of {n}, got {k!r}")
    q, r = divmod(n, k)
    out, start = [], 0
    for j in range(k):
        size = q + (1 if j < r else 0)
        out.append(slice(start, start + size))
        start += size
    return out


@contextmanager
def _one_blas_thread():
    """BLAS limited to one thread while the shards run (threadpoolctl; process-wide)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def merge_settled(xp, parts: list) -> Settled:
    """One phase of the whole batch from its shards' phases: states concatenated along the batch in
    shard order, the largest residual and step count, converged when every shard is (None when
    settling fixed step counts); recorded residuals: the largest at each step."""
    state = [xp.concat([p.state[l] for p in parts], axis=0) for l in range(len(parts[0].state))]
    res = [p.residual for p in parts]
    residual = float("nan") if any(math.isnan(r) for r in res) else max(res)
    longest = max(len(p.residuals) for p in parts)
    hist = [max(p.residuals[t] for p in parts if t < len(p.residuals)) for t in range(longest)]
    conv = [p.converged for p in parts]
    converged = None if all(c is None for c in conv) else all(bool(c) for c in conv)
    return Settled(state, residual, hist, max(p.steps for p in parts), converged)


def sharded(fn, net, x, y, *, shards: int, free_state=None, **kw):
    """Run the estimator ``fn`` on ``shards`` contiguous sub-batches in parallel threads and combine
    them by Eq. 4.7 into one :class:`~pyeqprop.learning.estimators.Estimate` of the whole batch.

    Parameters
    ----------
    fn : an estimator of :data:`~pyeqprop.learning.estimators.ESTIMATORS`.
    net : CRNN on a host backend (:data:`CPU_BACKENDS`); x : (n, c, h, w); y : (n,) labels.
    shards : int in [1, n]; 1 runs ``fn`` on the whole batch, here, in this thread.
    free_state : optional settled free state of the whole batch, split like x.
    kw : the estimator's other arguments (beta, T1, T2, sign, record, settling).

    Returns
    -------
    Estimate: grads = Σ_j (n_j/n) g_j in shard order (Eq. 4.7); each phase merged by
    :func:`merge_settled`; ``info`` maps each key of the shards' info to the list of their values.
    """
    if shards == 1:
        return fn(net, x, y, free_state=free_state, **kw)
    net.check_input(x)  # x is an array of the net's input shape before it is split
    n = x.shape[0]
    bounds = shard_bounds(n, shards)
    name = backend_name(net.xp)
    if name not in CPU_BACKENDS:
        raise ValueError(f"shards={shards} runs threads over host arrays; backend {name!r} runs every operation "
                         f"on its device already: use shards=1 (host backends: {', '.join(CPU_BACKENDS)})")

    def run(sl):
        fs = None if free_state is None else [s[sl] for s in free_state]
        return fn(net, x[sl], y[sl], free_state=fs, **kw)

    with _one_blas_thread(), ThreadPoolExecutor(max_workers=shards) as pool:
        parts = list(pool.map(run, bounds))
    xp = net.xp
    grads = {}
    for k in parts[0].grads:
        total = None
        for sl, p in zip(bounds, parts):
            term = ((sl.stop - sl.start) / n) * p.grads[k]
            total = term if total is None else total + term
        grads[k] = total
    free = merge_settled(xp, [p.free for p in parts])
    nudged = [merge_settled(xp, [p.nudged[i] for p in parts]) for i in range(len(parts[0].nudged))]
    info = {key: [p.info[key] for p in parts] for key in parts[0].info}
    return replace(parts[0], grads=grads, free=free, nudged=nudged, betas=list(parts[0].betas), info=info)
