"""``pyeqprop bench ep``: time one EP training step, split by kind of work, against a PyTorch peer.

One EP step = free phase (T1 steps from zero), two nudged phases (T2 steps each, symmetric
EP) and the parameter gradients (Eq. 4.2). The split attributes time to the bottom-up drive
(conv + pool, Eq. 3.1), the top-down drive (unpool + transposed conv, Eq. 3.7), and the rest
(activation, cost gradients, ∂Φ/∂θ). It is measured by wrapping the network's two drive
methods with timers for one extra run, so the reported median is untimed-overhead free.

The PyTorch peer (``--peer torch``) is what EP research code does today: Φ is built with
torch ops and ∂Φ/∂s comes from ``torch.autograd.grad`` at every step; ∂Φ/∂θ likewise. Same
shapes, dtype, thread count, and the same dynamics. torch is imported only here.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from ..backend import get_namespace, to_numpy

__all__ = ["run_ep_bench", "time_pyeqprop_step", "time_torch_step", "blas_threads", "settling_counts"]

CASES = {
    # name: (arch, input_shape, batch, T1, T2)
    "laborieux": ("laborieux", (3, 32, 32), 32, 30, 10),
    "digits": ("digits", (1, 8, 8), 32, 20, 6),
}


def blas_threads() -> int:
    """Threads NumPy's BLAS uses (threadpoolctl when installed, else the core count)."""
    try:
        from threadpoolctl import threadpool_info

        n = [i["num_threads"] for i in threadpool_info() if i.get("user_api") == "blas"]
        if n:
            return int(n[0])
    except ImportError:
        pass
    import os

    return os.cpu_count() or 1


def _sync(xp):
    if "cupy" in getattr(xp, "__name__", ""):
        import cupy

        cupy.cuda.Device().synchronize()


def _inputs(shape, batch, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (batch, *shape))
    y = rng.integers(0, num_classes, batch)
    return x, y


def time_pyeqprop_step(arch, shape, batch, T1, T2, *, backend="numpy", dtype="float32", repeats=5, beta=0.5,
                       readout="softmax", activation="half_hard_sigmoid"):
    """Median seconds of one symmetric EP step with pyeqprop, and the bottom-up/top-down split."""
    from ..model.crnn import CRNN
    from ..learning.estimators import ep_estimate

    xp = get_namespace(backend)
    net = CRNN(arch, shape, num_classes=10, readout=readout, activation=activation, dtype=dtype, xp=xp, seed=0)
    xh, yh = _inputs(shape, batch, 10)
    x = xp.asarray(xh.astype(dtype))
    y = xp.asarray(yh)
    ep_estimate(net, x, y, beta=beta, T1=T1, T2=T2)  # warm-up
    _sync(xp)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = ep_estimate(net, x, y, beta=beta, T1=T1, T2=T2)
        to_numpy(res.grads["conv1.weight"] if "conv1.weight" in res.grads else next(iter(res.grads.values())))
        _sync(xp)
        times.append(time.perf_counter() - t0)
    # split, measured once with timers around the two drive methods
    spent = {"bottom_up": 0.0, "top_down": 0.0}

    def timed(fn, key):
        def wrapper(*a, **k):
            _sync(xp)
            t = time.perf_counter()
            out = fn(*a, **k)
            _sync(xp)
            spent[key] += time.perf_counter() - t
            return out

        return wrapper

    for layer in net.layers:  # instrument this net's layer objects only
        layer.bottom_up = timed(layer.bottom_up, "bottom_up")
        layer.top_down = timed(layer.top_down, "top_down")
    t0 = time.perf_counter()
    ep_estimate(net, x, y, beta=beta, T1=T1, T2=T2)
    _sync(xp)
    total = time.perf_counter() - t0
    split = {k: v / total for k, v in spent.items()}
    split["rest"] = max(0.0, 1.0 - split["bottom_up"] - split["top_down"])
    return statistics.median(times), split


def time_torch_step(arch, shape, batch, T1, T2, *, device="cpu", dtype="float32", repeats=5, beta=0.5, threads=None):
    """Median seconds of the same EP step in a PyTorch autograd peer (softmax readout, half hard sigmoid)."""
    import torch
    import torch.nn.functional as F

    from ..model.arch import parse_arch

    if threads and device == "cpu":
        torch.set_num_threads(threads)
    tdt = getattr(torch, dtype)
    spec = parse_arch(arch, shape, 10, "softmax")
    g = torch.Generator().manual_seed(0)
    params = []
    for layer in spec.layers:
        if layer.kind == "conv":
            fan = layer.in_channels * layer.kernel ** 2
            w = (torch.rand(layer.out_channels, layer.in_channels, layer.kernel, layer.kernel, generator=g) * 2 - 1)
        else:
            fan = layer.in_features
            w = torch.rand(layer.out_features, layer.in_features, generator=g) * 2 - 1
        b = torch.rand(w.shape[0], generator=g) * 2 - 1
        params += [(w / fan ** 0.5).to(device, tdt).requires_grad_(), (b / fan ** 0.5).to(device, tdt).requires_grad_()]
    ro = spec.readout
    wo = ((torch.rand(ro.out_features, ro.in_features, generator=g) * 2 - 1) / ro.in_features ** 0.5).to(device, tdt)
    bo = torch.zeros(ro.out_features, device=device, dtype=tdt)
    wo.requires_grad_()
    bo.requires_grad_()
    xh, yh = _inputs(shape, batch, 10)
    x = torch.tensor(xh, dtype=tdt, device=device)
    y = torch.tensor(yh, device=device)

    def phi(s, beta_):
        total = 0.0
        below = x
        for i, layer in enumerate(spec.layers):
            w, b = params[2 * i], params[2 * i + 1]
            if layer.kind == "conv":
                z = F.conv2d(below, w, b, padding=layer.padding)
                if layer.pool == "max":
                    z = F.max_pool2d(z, 2)
                elif layer.pool == "avg":
                    z = F.avg_pool2d(z, 2)
            else:
                z = F.linear(below.flatten(1), w, b)
            total = total + (z * s[i]).flatten(1).sum(1)
            below = s[i]
        if beta_ != 0.0:
            logits = F.linear(s[-1].flatten(1), wo, bo)
            total = total - beta_ * F.cross_entropy(logits, y, reduction="none")
        return total.sum()

    def settle(s, T, beta_):
        for _ in range(T):
            s = [si.detach().requires_grad_() for si in s]
            grads = torch.autograd.grad(phi(s, beta_), s)
            s = [torch.clamp(0.5 * gi, 0.0, 1.0) for gi in grads]
        return [si.detach() for si in s]

    def step():
        s0 = [torch.zeros(batch, *layer.state_shape, device=device, dtype=tdt) for layer in spec.layers]
        sf = settle(s0, T1, 0.0)
        sp = settle(sf, T2, beta)
        sm = settle(sf, T2, -beta)
        allp = params + [wo, bo]
        gp = torch.autograd.grad(phi(sp, beta), allp, allow_unused=True)
        gm = torch.autograd.grad(phi(sm, -beta), allp, allow_unused=True)
        out = [(-(a - b) / (2 * beta * batch)) for a, b in zip(gp, gm)]
        if device != "cpu":
            torch.cuda.synchronize()
        return out

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def settling_counts(arch, shape, batch, *, tol, max_steps, backend="numpy", dtype="float32", repeats=3,
                    checkpoint=None, readout="softmax", activation="half_hard_sigmoid"):
    """Steps (sweeps) and seconds to settle the free phase from zero to r ≤ tol, per schedule (Eqs. 3.13-3.14).

    The schedules are timed interleaved (synchronous, Gauss–Seidel, synchronous, …) in one process, so
    a noisy machine shifts both alike; the residual is checked every step (check_every = 1) so that the
    counts are exact. ``checkpoint``: a run's .npz whose parameters replace the initial ones (the
    trained net settles more slowly than the initial one). Returns {schedule: (steps, converged, s)}.
    """
    from ..learning.settle import SCHEDULES, Settling, settle
    from ..model.crnn import CRNN

    xp = get_namespace(backend)
    net = CRNN(arch, shape, num_classes=10, readout=readout, activation=activation, dtype=dtype, xp=xp, seed=0)
    if checkpoint is not None:
        from ..train.checkpoint import load_checkpoint

        ck = load_checkpoint(checkpoint)
        for k in net.params:
            net.params[k] = xp.asarray(ck.params[k], dtype=net.dtype)
    xh, _ = _inputs(shape, batch, 10)
    x = xp.asarray(xh.astype(dtype))
    out = {sched: [None, None, []] for sched in SCHEDULES}
    for _ in range(max(1, repeats)):
        for sched in SCHEDULES:
            _sync(xp)
            t0 = time.perf_counter()
            r = settle(net, x, max_steps, settling=Settling(sched, tol=tol, check_every=1))
            _sync(xp)
            out[sched][2].append(time.perf_counter() - t0)
            out[sched][0], out[sched][1] = r.steps, r.converged
    return {k: (v[0], v[1], statistics.median(v[2])) for k, v in out.items()}


def run_ep_bench(ns) -> int:
    """Print the EP-step table: pyeqprop time, split, and (with --peer torch) the peer and the ratio."""
    backend = getattr(ns, "backend", "numpy")
    dtype = getattr(ns, "dtype", "float32")
    repeats = max(1, int(getattr(ns, "repeats", 5)))
    cases = ["digits"] if getattr(ns, "quick", False) else ["laborieux", "digits"]
    threads = blas_threads()
    print(f"EP step = free T1 + two nudged T2 (symmetric) + gradients; backend {backend}, {dtype}, "
          f"{threads} BLAS threads, median of {repeats}")
    print(f"{'case':<10} {'batch':>5} {'T1':>4} {'T2':>4} {'pyeqprop s':>11} {'bottom-up':>9} {'top-down':>9} "
          f"{'rest':>6} {'peer s':>8} {'ratio':>6}")
    for name in cases:
        arch, shape, batch, T1, T2 = CASES[name]
        t, split = time_pyeqprop_step(arch, shape, batch, T1, T2, backend=backend, dtype=dtype, repeats=repeats)
        peer = ""
        ratio = ""
        if getattr(ns, "peer", "none") == "torch":
            device = "cuda" if backend == "cupy" else "cpu"
            tp = time_torch_step(arch, shape, batch, T1, T2, device=device, dtype=dtype, repeats=repeats,
                                 threads=threads)
            peer, ratio = f"{tp:8.3f}", f"{t / tp:6.2f}"
        print(f"{name:<10} {batch:>5} {T1:>4} {T2:>4} {t:>11.3f} {100 * split['bottom_up']:>8.0f}% "
              f"{100 * split['top_down']:>8.0f}% {100 * split['rest']:>5.0f}% {peer:>8} {ratio:>6}")
    tol = float(getattr(ns, "tol", 1e-5) or 1e-5)
    checkpoint = getattr(ns, "checkpoint", None)
    print(f"\nfree phase from zero to r <= {tol:g} (Eq. 3.14), synchronous steps vs Gauss-Seidel sweeps (Eq. 3.13)"
          + (f", parameters of {checkpoint}" if checkpoint else ", initial parameters"))
    print(f"{'case':<10} {'sync steps':>10} {'GS sweeps':>10} {'sync s':>8} {'GS s':>8} {'time GS/sync':>12}")
    for name in (["digits"] if checkpoint else cases):
        arch, shape, batch, _, _ = CASES[name]
        c = settling_counts(arch, shape, batch, tol=tol, max_steps=1000, backend=backend, dtype=dtype,
                            repeats=repeats, checkpoint=checkpoint)
        (n_s, ok_s, t_s), (n_g, ok_g, t_g) = c["synchronous"], c["gauss-seidel"]
        mark = lambda n, ok: f"{n}{'' if ok else '*'}"  # noqa: E731  (* = stopped at 1000 above tol)
        print(f"{name:<10} {mark(n_s, ok_s):>10} {mark(n_g, ok_g):>10} {t_s:>8.3f} {t_g:>8.3f} {t_g / t_s:>12.2f}")
    return 0
