"""``pyeqprop bench ops``: the convolution and pooling primitives on the layers of the ``laborieux`` net.

For each layer (3×3 kernels, padding 1, the c → o channels and sizes of L1-L4 of Laborieux et
al. 2021's net; batch 32) it times conv2d, conv2d_transpose (both with the weight matrix built
once, as the CRNN calls them), conv2d_weight_grad, max_pool2d (2×2/2 on the conv output) and
max_unpool2d. Each convolution does 2·n·o·c·k_h·k_w·h'·w' floating-point operations (the same
count for all three, Eqs. 2.1, 2.3, 2.4), reported as GFLOP/s and as a percentage of this
process's GEMM rate (a 2048² matmul in the same dtype): a convolution lowered to matrix
products is not expected to beat that rate, so the shortfall is data movement (padding,
unfolding, folding) and the smaller products' lower efficiency. ``%shape`` compares with the
bare product the convolution lowers to, (n·h'·w', k²c) × (k²c, o).

With ``peer="torch"`` the same operation runs in torch (CPU, or CUDA for the CuPy backend),
timed interleaved with ours (ours, torch, ours, …) so that a noisy machine shifts both alike;
``vs torch`` is our median over torch's (> 1: slower). torch is imported only here.
"""
from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from typing import Callable

import numpy as np

from .. import ops
from ..backend import backend_name, get_namespace, resolve, to_numpy

__all__ = ["run_ops_bench", "LAYERS", "QUICK_LAYERS", "gemm_gflops"]

LAYERS = (
    # (label, c, o, spatial size of the convolution)
    ("L1 3->128 @32", 3, 128, 32),
    ("L2 128->256 @16", 128, 256, 16),
    ("L3 256->512 @8", 256, 512, 8),
    ("L4 512->512 @4", 512, 512, 4),
)
QUICK_LAYERS = (("q1 2->8 @8", 2, 8, 8), ("q2 8->16 @4", 8, 16, 4))


def _sync(xp):
    if backend_name(xp) == "cupy":
        import cupy

        cupy.cuda.Device().synchronize()


def _once(fn, xp) -> float:
    t0 = time.perf_counter()
    fn()
    _sync(xp)
    return time.perf_counter() - t0


def interleaved_medians(fns: list, repeats: int, xp, warmup: int = 1) -> list[float]:
    """Median seconds of each callable, run in turns (a, b, a, b, …) after ``warmup`` rounds."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(warmup + repeats):
        for i, fn in enumerate(fns):
            if fn is None:
                continue
            t = _once(fn, xp)
            if r >= warmup:
                times[i].append(t)
    return [statistics.median(t) if t else None for t in times]


def gemm_gflops(size: int = 2048, repeats: int = 5, dtype="float32", xp=None) -> float:
    """This process's GEMM rate: 2·size³ / median time of ``a @ b`` (size×size, ``dtype``), in GFLOP/s;
    ``xp``: namespace or backend name (None: NumPy)."""
    xp = resolve(xp or "numpy")
    rng = np.random.default_rng(0)
    a = xp.asarray(rng.standard_normal((size, size)).astype(dtype))
    b = xp.asarray(rng.standard_normal((size, size)).astype(dtype))
    (t,) = interleaved_medians([lambda: a @ b], repeats, xp)
    return 2.0 * size**3 / t / 1e9


def _blas_threads() -> tuple[int | None, str]:
    """(threads, description) of NumPy's BLAS, via threadpoolctl."""
    from threadpoolctl import threadpool_info

    for info in threadpool_info():
        if info.get("user_api") == "blas":
            return int(info["num_threads"]), f"{info.get('internal_api')} {info.get('version')}, " \
                                             f"{info['num_threads']} threads"
    return None, "no BLAS found by threadpoolctl"


def _limit_threads(threads: int | None):
    if threads is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads)


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _layer_cases(n, c, o, size, rng, xp, dtype, torch, device):
    """[(op, flops or None, ours, theirs or None, gemm of the same shape or None)] for one layer."""
    h = lambda a: a.astype(dtype)  # noqa: E731
    x_h = h(rng.standard_normal((n, c, size, size)))
    w_h = h(rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c))
    g_h = h(rng.standard_normal((n, o, size, size)))  # padding 1 keeps h' = h
    x, w, g = xp.asarray(x_h), xp.asarray(w_h), xp.asarray(g_h)
    W = ops.conv_weight_matrix(w)
    y = ops.conv2d(x, w, padding=1, weight_matrix=W)
    yp, idx = ops.max_pool2d(y)
    gp = xp.asarray(h(rng.standard_normal(tuple(yp.shape))))
    flops = 2.0 * n * o * c * 9 * size * size
    cols = xp.asarray(h(rng.standard_normal((n * size * size, 9 * c))))
    Wt = xp.asarray(h(rng.standard_normal((o, 9 * c))))
    gm = xp.asarray(h(rng.standard_normal((n * size * size, o))))
    gemm_fwd = lambda: cols @ W  # noqa: E731  (the product conv2d lowers to)
    gemm_bwd = lambda: gm @ Wt  # noqa: E731  (conv2d_transpose's)
    cases = [
        ("conv2d", flops, lambda: ops.conv2d(x, w, padding=1, weight_matrix=W), gemm_fwd),
        ("conv2d_transpose", flops,
         lambda: ops.conv2d_transpose(g, w, padding=1, output_size=(size, size), weight_matrix=W), gemm_bwd),
        ("conv2d_weight_grad", flops, lambda: ops.conv2d_weight_grad(x, g, kernel_size=3, padding=1), None),
        ("max_pool2d", None, lambda: ops.max_pool2d(y), None),
        ("max_unpool2d", None, lambda: ops.max_unpool2d(gp, idx, output_size=(size, size)), None),
    ]
    theirs = {}
    if torch is not None:
        F = torch.nn.functional
        t = lambda a: torch.tensor(np.asarray(a), device=device)  # noqa: E731
        xt, wt, gt = t(x_h), t(w_h), t(g_h)
        yt = F.conv2d(xt, wt, padding=1)
        _, idxt = F.max_pool2d(yt, 2, 2, return_indices=True)
        gpt = t(to_numpy(gp))
        theirs = {
            "conv2d": lambda: F.conv2d(xt, wt, padding=1),
            "conv2d_transpose": lambda: F.conv_transpose2d(gt, wt, padding=1),
            "conv2d_weight_grad": lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, gt, padding=1),
            "max_pool2d": lambda: F.max_pool2d(yt, 2, 2, return_indices=True),
            "max_unpool2d": lambda: F.max_unpool2d(gpt, idxt, 2, 2, output_size=(size, size)),
        }
    return [(name, fl, fn, theirs.get(name), gemm) for name, fl, fn, gemm in cases]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def run_ops_bench(repeats: int = 5, threads: int | None = None, out: Callable[[str], object] = print, *,
                  backend="numpy", dtype="float32", quick=False, peer="torch", batch: int | None = None,
                  gemm_size: int | None = None, layers=None) -> list[dict]:
    """Time the conv and pooling primitives on the laborieux net's layers and print a table.

    Parameters
    ----------
    repeats : timed runs per operation (after one warm-up); the median is reported.
    threads : limit NumPy's BLAS (threadpoolctl) and torch to this many threads; None keeps
        NumPy's default and gives torch the same count.
    out : where each line of the report goes (``print`` by default; ``lambda s: None`` to silence).
    backend, dtype : the array backend and floating dtype of the operands.
    quick : two tiny layers, batch 4 and a 256² GEMM: a smoke run in well under a second.
    peer : "torch" (when importable) or "none".
    batch, gemm_size, layers : override the sizes (default 32, 2048, :data:`LAYERS`; quick: 4, 256,
        :data:`QUICK_LAYERS`).

    Returns
    -------
    One dict per (layer, op): ``layer``, ``op``, ``input_shape``, ``ms``, ``gflops`` (None for
    pooling), ``pct_gemm`` and ``pct_shape`` (None for pooling), ``torch_ms`` and ``vs_torch``
    (None without the peer), plus ``gemm_gflops``, ``threads``, ``backend`` and ``dtype``.
    """
    if int(repeats) != repeats or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if peer not in ("torch", "none"):
        raise ValueError(f"peer must be 'torch' or 'none', got {peer!r}")
    xp = get_namespace(backend)
    batch = batch or (4 if quick else 32)
    gemm_size = gemm_size or (256 if quick else 2048)
    layers = layers or (QUICK_LAYERS if quick else LAYERS)
    torch = _import_torch() if peer == "torch" else None
    device = "cuda" if backend_name(xp) == "cupy" else "cpu"
    rows: list[dict] = []
    with _limit_threads(threads):
        n_blas, blas_desc = _blas_threads()
        n_threads = threads if threads is not None else (n_blas or os.cpu_count() or 1)
        torch_threads_before = None
        if torch is not None:
            torch_threads_before = torch.get_num_threads()
            torch.set_num_threads(n_threads)
        try:
            gemm = gemm_gflops(gemm_size, repeats, dtype, xp)
            out(f"pyeqprop ops benchmark: backend {backend_name(xp)}, {dtype}, batch {batch}, 3x3 kernels, "
                f"padding 1; median of {repeats} after 1 warm-up" + (", interleaved with torch" if torch else ""))
            out(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
                f"NumPy {np.__version__} ({blas_desc}); threads used {n_threads}")
            out(f"{dtype} GEMM ({gemm_size}x{gemm_size} matmul): {gemm:.1f} GFLOP/s")
            if peer == "torch":
                out("torch: " + (f"{torch.__version__} {device}, {torch.get_num_threads()} threads" if torch
                                 else "not installed (no comparison)"))
            header = (f"{'layer':<17} {'op':<19} {'ms':>9} {'GFLOP/s':>8} {'%GEMM':>6} {'%shape':>6} "
                      f"{'torch ms':>9} {'vs torch':>8}")
            out(header)
            out("-" * len(header))
            rng = np.random.default_rng(0)
            for label, c, o, size in layers:
                for op, flops, ours, theirs, same in _layer_cases(batch, c, o, size, rng, xp, dtype, torch, device):
                    ctx = torch.inference_mode() if torch is not None else contextlib.nullcontext()
                    with ctx:
                        t, t_torch, t_gemm = interleaved_medians([ours, theirs, same], repeats, xp)
                    gf = None if flops is None else flops / t / 1e9
                    pct = None if gf is None else 100.0 * gf / gemm
                    pct_shape = None if t_gemm is None else 100.0 * t_gemm / t
                    ratio = None if t_torch is None else t / t_torch
                    rows.append(dict(layer=label, op=op, input_shape=(batch, c, size, size), ms=1e3 * t,
                                     gflops=gf, pct_gemm=pct, pct_shape=pct_shape,
                                     torch_ms=None if t_torch is None else 1e3 * t_torch, vs_torch=ratio,
                                     gemm_gflops=gemm, threads=n_threads, backend=backend_name(xp), dtype=dtype))
                    out(f"{label:<17} {op:<19} {1e3 * t:>9.2f} {_fmt(gf, '8.1f'):>8} {_fmt(pct, '5.0f'):>6} "
                        f"{_fmt(pct_shape, '5.0f'):>6} {_fmt(None if t_torch is None else 1e3 * t_torch, '9.2f'):>9} "
                        f"{_fmt(ratio, '7.2f'):>8}")
        finally:
            if torch is not None and torch_threads_before is not None:
                torch.set_num_threads(torch_threads_before)
    return rows
