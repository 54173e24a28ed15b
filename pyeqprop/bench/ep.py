"""``pyeqprop bench ep``: time one EP training step against a PyTorch peer and the FLOP floor.

One EP step = free phase (T1 steps from zero), two nudged phases (T2 steps each, symmetric
EP) and the parameter gradients (Eqs. 4.2, 4.6). On a host backend every case is timed at
1 and at 2 threads, the contenders interleaved in one process (ours, peer, ours, peer, …, so
that a noisy machine shifts all alike):

- ``ours``: 1 thread: one BLAS thread; 2 threads: two batch shards in two threads with one
  BLAS thread each (Eq. 4.7);
- ``ours, BLAS``: 2 threads: the whole batch with two BLAS threads (only the products use the
  second core);
- ``peer``: PyTorch autograd with that many threads.

The floor is :func:`ep_step_flops` (the products the step needs, counted from the
architecture) over the rate of a 2048² GEMM measured in the same process at that thread count.
The split attributes our 1-thread time to the bottom-up drive (conv + pool, Eq. 3.1), the
top-down drive (unpool + transposed conv, Eq. 3.7), and the rest (activation, cost gradients,
∂Φ/∂θ); it is measured by wrapping the network's two drive methods with timers for one extra
run, so the reported medians carry no timer overhead.

The PyTorch peer is what EP research code does today: Φ is built with torch ops and ∂Φ/∂s
comes from ``torch.autograd.grad`` at every step; ∂Φ/∂θ likewise. Same shapes, dtype and
dynamics. torch is imported only here.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from ..backend import backend_name, get_namespace, to_numpy

__all__ = ["run_ep_bench", "make_pyeqprop_step", "make_torch_step", "ep_step_flops", "step_split", "blas_threads",
           "settling_counts"]

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


def _net_and_batch(arch, shape, batch, backend, dtype, readout="softmax", activation="half_hard_sigmoid"):
    from ..model.crnn import CRNN

    xp = get_namespace(backend)
    net = CRNN(arch, shape, num_classes=10, readout=readout, activation=activation, dtype=dtype, xp=xp, seed=0)
    xh, yh = _inputs(shape, batch, 10)
    return net, xp.asarray(xh.astype(dtype)), xp.asarray(yh)


def make_pyeqprop_step(arch, shape, batch, T1, T2, *, backend="numpy", dtype="float32", shards=1, blas=1,
                       beta=0.5):
    """A callable running one symmetric EP step with pyeqprop: ``shards`` batch shards in threads (Eq. 4.7),
    ``blas`` BLAS threads (per shard) while it runs; it returns after the gradients reach the host."""
    from threadpoolctl import threadpool_limits

    from ..learning.estimators import ep_estimate

    net, x, y = _net_and_batch(arch, shape, batch, backend, dtype)
    xp = net.xp

    def step():
        with threadpool_limits(limits=blas, user_api="blas"):
            res = ep_estimate(net, x, y, beta=beta, T1=T1, T2=T2, shards=shards)
        to_numpy(res.grads[net.layers[0].weight])
        _sync(xp)

    return step


def step_split(arch, shape, batch, T1, T2, *, backend="numpy", dtype="float32", beta=0.5):
    """Fractions of one 1-thread EP step in the bottom-up drive, the top-down drive and the rest."""
    from threadpoolctl import threadpool_limits

    from ..learning.estimators import ep_estimate

    net, x, y = _net_and_batch(arch, shape, batch, backend, dtype)
    xp = net.xp
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
    with threadpool_limits(limits=1, user_api="blas"):
        t0 = time.perf_counter()
        ep_estimate(net, x, y, beta=beta, T1=T1, T2=T2)
        _sync(xp)
        total = time.perf_counter() - t0
    split = {k: v / total for k, v in spent.items()}
    split["rest"] = max(0.0, 1.0 - split["bottom_up"] - split["top_down"])
    return split


def ep_step_flops(arch, shape, batch, T1, T2) -> float:
    """Floating-point operations of the matrix products in one symmetric EP step of pyeqprop.

    With F_l = 2·n·h_l·w_l·k²·c_l·o_l (conv layer l at its convolution's resolution) or 2·n·in·out
    (fc): B_1(x) once per batch (F_1); every step the bottom-up and top-down maps of layers
    2 … L (2 Σ_{l≥2} F_l), over T1 + 2·T2 steps; then Eq. 4.6: the argmaxes of both phases'
    max-pooled layers ≥ 2 (F_l each), one weight-gradient pass at layer 1 (x is shared) and two
    at the others. The readout's products (n·in·K) are left out: they are < 0.1 %.
    """
    from ..model.arch import parse_arch

    spec = parse_arch(arch, shape, 10, "softmax")
    F = []
    for layer in spec.layers:
        if layer.kind == "conv":
            h, w = layer.conv_hw
            F.append(2.0 * batch * h * w * layer.kernel ** 2 * layer.in_channels * layer.out_channels)
        else:
            F.append(2.0 * batch * layer.in_features * layer.out_features)
    upper = sum(F[1:])
    argmax = sum(2 * f for f, layer in zip(F[1:], spec.layers[1:]) if layer.kind == "conv" and layer.pool == "max")
    return F[0] + (T1 + 2 * T2) * 2 * upper + argmax + F[0] + 2 * upper


def make_torch_step(arch, shape, batch, T1, T2, *, device="cpu", dtype="float32", beta=0.5, threads=1):
    """A callable running the same EP step in a PyTorch autograd peer (softmax readout, half hard sigmoid)
    with ``threads`` torch threads (CPU)."""
    import torch
    import torch.nn.functional as F

    from ..model.arch import parse_arch

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
        if device == "cpu":
            torch.set_num_threads(threads)
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

    return step


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


def _gemm_rate(threads, dtype, backend, repeats):
    from threadpoolctl import threadpool_limits

    from .ops import gemm_gflops

    with threadpool_limits(limits=threads, user_api="blas"):
        return gemm_gflops(2048, repeats, dtype, backend)


def run_ep_bench(ns) -> int:
    """Print the EP-step table (1 and 2 threads, interleaved contenders, FLOP floor) and the settling table."""
    from .ops import interleaved_medians

    backend = getattr(ns, "backend", "numpy")
    dtype = getattr(ns, "dtype", "float32")
    repeats = max(1, int(getattr(ns, "repeats", 5)))
    peer = getattr(ns, "peer", "none") == "torch"
    cases = ["digits"] if getattr(ns, "quick", False) else ["laborieux", "digits"]
    xp = get_namespace(backend)
    on_device = backend_name(xp) == "cupy"
    thread_counts = (None,) if on_device else (1, 2)
    print(f"EP step = free T1 + two nudged T2 (symmetric) + gradients; backend {backend}, {dtype}; median of "
          f"{repeats}, contenders interleaved" + ("" if on_device else "; ours at 2 threads = 2 batch shards "
                                                                    "(Eq. 4.7), 1 BLAS thread each"))
    print(f"{'case':<10} {'batch':>5} {'T1':>4} {'T2':>4} {'thr':>3} {'ours s':>8} {'ours,BLAS s':>11} "
          f"{'peer s':>8} {'ours/peer':>9} {'GFLOP':>7} {'floor s':>8} {'floor/ours':>10}")
    for name in cases:
        arch, shape, batch, T1, T2 = CASES[name]
        flops = ep_step_flops(arch, shape, batch, T1, T2)
        for thr in thread_counts:
            k = thr or 1
            ours = make_pyeqprop_step(arch, shape, batch, T1, T2, backend=backend, dtype=dtype,
                                      shards=k if not on_device else 1, blas=1)
            blas = None if on_device or k == 1 else make_pyeqprop_step(arch, shape, batch, T1, T2, backend=backend,
                                                                        dtype=dtype, shards=1, blas=k)
            theirs = make_torch_step(arch, shape, batch, T1, T2, device="cuda" if on_device else "cpu", dtype=dtype,
                                     threads=k) if peer else None
            t, tb, tp = interleaved_medians([ours, blas, theirs], repeats, xp)
            floor = None if on_device else flops / (_gemm_rate(k, dtype, backend, 3) * 1e9)
            f = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
            print(f"{name:<10} {batch:>5} {T1:>4} {T2:>4} {f(thr, 'd'):>3} {t:>8.3f} {f(tb, '.3f'):>11} "
                  f"{f(tp, '.3f'):>8} {f(None if tp is None else t / tp, '.2f'):>9} {flops / 1e9:>7.1f} "
                  f"{f(floor, '.3f'):>8} {f(None if floor is None else floor / t, '.2f'):>10}")
    print("\nsplit of our 1-thread step (Eqs. 3.1, 3.7)")
    print(f"{'case':<10} {'bottom-up':>9} {'top-down':>9} {'rest':>6}")
    for name in cases:
        arch, shape, batch, T1, T2 = CASES[name]
        sp = step_split(arch, shape, batch, T1, T2, backend=backend, dtype=dtype)
        print(f"{name:<10} {100 * sp['bottom_up']:>8.0f}% {100 * sp['top_down']:>8.0f}% {100 * sp['rest']:>5.0f}%")
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
