"""Timing of the convolution and pooling primitives on CIFAR-sized layers.

For each layer (batch 32, float32, 3×3 kernels, padding 1, the shapes of Laborieux et al.
2021's first blocks) it times conv2d, conv2d_transpose, conv2d_weight_grad, max_pool2d
(2×2/2 on the conv output) and max_unpool2d: the median of ``repeats`` runs after one
warm-up run. Each convolution does 2·n·o·c·k_h·k_w·h'·w' floating-point operations
(the same count for all three, Eqs. 2.1, 2.3, 2.4), reported as GFLOP/s and as a
percentage of this machine's float32 GEMM rate (NumPy matmul of two square matrices,
median of ``repeats``): a convolution lowered to matrix products is not expected to
beat that rate, so the shortfall is roughly the cost of data movement (padding,
unfolding, folding) and of smaller, less efficient products. When PyTorch is importable,
the same operation is timed with torch on the CPU with the same thread count, and
``vs torch`` is our time over torch's (> 1: slower).
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

__all__ = ["run_ops_bench", "LAYERS", "gemm_gflops"]

LAYERS = (
    # (label, c, o, spatial size)
    ("3->128 @32x32", 3, 128, 32),
    ("128->128 @16x16", 128, 128, 16),
    ("256->256 @8x8", 256, 256, 8),
)


def _median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_gflops(size: int = 2048, repeats: int = 5, dtype=np.float32) -> float:
    """This machine's GEMM rate: 2·size³ / median time of ``a @ b`` (size×size, ``dtype``), in GFLOP/s."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(dtype)
    b = rng.standard_normal((size, size)).astype(dtype)
    t = _median_seconds(lambda: a @ b, repeats)
    return 2.0 * size**3 / t / 1e9


def _blas_threads() -> tuple[int | None, str]:
    """(threads, description) of NumPy's BLAS, via threadpoolctl when installed."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None, "BLAS threads unknown (threadpoolctl not installed)"
    for info in threadpool_info():
        if info.get("user_api") == "blas":
            return int(info["num_threads"]), f"{info.get('internal_api')} {info.get('version')}, " \
                                             f"{info['num_threads']} threads"
    return None, "no BLAS found by threadpoolctl"


def _limit_threads(threads: int | None, out):
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        out(f"note: threadpoolctl is not installed; NumPy's BLAS threads are not limited to {threads}")
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def _import_torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _layer_cases(n: int, c: int, o: int, size: int, rng: np.random.Generator, torch):
    """[(op, flops or None, ours, theirs or None)] for one layer, inputs prepared outside the timed calls."""
    f32 = np.float32
    x = rng.standard_normal((n, c, size, size)).astype(f32)
    w = (rng.standard_normal((o, c, 3, 3)) / np.sqrt(9 * c)).astype(f32)
    g = rng.standard_normal((n, o, size, size)).astype(f32)  # padding 1 keeps h' = h
    y = ops.conv2d(x, w, padding=1)
    yp, idx = ops.max_pool2d(y)
    gp = rng.standard_normal(yp.shape).astype(f32)
    flops = 2.0 * n * o * c * 9 * size * size

    cases = [
        ("conv2d", flops, lambda: ops.conv2d(x, w, padding=1)),
        ("conv2d_transpose", flops, lambda: ops.conv2d_transpose(g, w, padding=1, output_size=(size, size))),
        ("conv2d_weight_grad", flops, lambda: ops.conv2d_weight_grad(x, g, kernel_size=3, padding=1)),
        ("max_pool2d", None, lambda: ops.max_pool2d(y)),
        ("max_unpool2d", None, lambda: ops.max_unpool2d(gp, idx, output_size=(size, size))),
    ]
    theirs = {}
    if torch is not None:
        F = torch.nn.functional
        xt, wt, gt, yt = (torch.from_numpy(a) for a in (x, w, g, y))
        gpt, idxt = torch.from_numpy(gp), torch.from_numpy(idx)
        theirs = {
            "conv2d": lambda: F.conv2d(xt, wt, padding=1),
            "conv2d_transpose": lambda: F.conv_transpose2d(gt, wt, padding=1),
            "conv2d_weight_grad": lambda: torch.nn.grad.conv2d_weight(xt, wt.shape, gt, padding=1),
            "max_pool2d": lambda: F.max_pool2d(yt, 2, 2, return_indices=True),
            "max_unpool2d": lambda: F.max_unpool2d(gpt, idxt, 2, 2, output_size=(size, size)),
        }
    return [(name, fl, fn, theirs.get(name)) for name, fl, fn in cases]


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def run_ops_bench(repeats: int = 5, threads: int | None = None, out: Callable[[str], object] = print,
                  *, batch: int = 32, gemm_size: int = 2048, layers=LAYERS) -> list[dict]:
    """Time the conv and pooling primitives on CIFAR-sized float32 layers and print a table.

    Parameters
    ----------
    repeats : timed runs per operation (after one warm-up); the median is reported.
    threads : limit NumPy's BLAS (through threadpoolctl, when installed) and torch to this
        many threads; None keeps NumPy's default and gives torch the same count.
    out : where each line of the report goes (``print`` by default; ``lambda s: None`` to silence).

    Returns
    -------
    One dict per (layer, op): ``layer``, ``op``, ``input_shape``, ``ms``, ``gflops``
    (None for pooling), ``pct_gemm`` (None for pooling), ``torch_ms`` and ``vs_torch``
    (None without torch), plus ``gemm_gflops`` and ``threads``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    torch = _import_torch()
    rows: list[dict] = []
    with _limit_threads(threads, out):
        n_blas, blas_desc = _blas_threads()
        n_threads = threads if threads is not None else (n_blas or os.cpu_count() or 1)
        torch_threads_before = None
        if torch is not None:
            torch_threads_before = torch.get_num_threads()
            torch.set_num_threads(n_threads)
        try:
            gemm = gemm_gflops(gemm_size, repeats)
            out(f"pyeqprop ops benchmark: batch {batch}, float32, 3x3 kernels, padding 1; "
                f"median of {repeats} after 1 warm-up")
            out(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
                f"NumPy {np.__version__} ({blas_desc}); threads used {n_threads}")
            out(f"float32 GEMM ({gemm_size}x{gemm_size} matmul): {gemm:.1f} GFLOP/s")
            out("torch: " + (f"{torch.__version__} CPU, {torch.get_num_threads()} threads" if torch is not None
                             else "not installed (no comparison)"))
            header = f"{'layer':<16} {'op':<19} {'ms':>9} {'GFLOP/s':>8} {'%GEMM':>6} {'torch ms':>9} {'vs torch':>8}"
            out(header)
            out("-" * len(header))
            rng = np.random.default_rng(0)
            for label, c, o, size in layers:
                for op, flops, ours, theirs in _layer_cases(batch, c, o, size, rng, torch):
                    t = _median_seconds(ours, repeats)
                    gf = None if flops is None else flops / t / 1e9
                    pct = None if gf is None else 100.0 * gf / gemm
                    t_torch = None
                    if theirs is not None:
                        with torch.inference_mode():
                            t_torch = _median_seconds(theirs, repeats)
                    ratio = None if t_torch is None else t / t_torch
                    rows.append(dict(layer=label, op=op, input_shape=(batch, c, size, size), ms=1e3 * t,
                                     gflops=gf, pct_gemm=pct, torch_ms=None if t_torch is None else 1e3 * t_torch,
                                     vs_torch=ratio, gemm_gflops=gemm, threads=n_threads))
                    out(f"{label:<16} {op:<19} {1e3 * t:>9.2f} {_fmt(gf, '8.1f'):>8} {_fmt(pct, '5.0f'):>6} "
                        f"{_fmt(None if t_torch is None else 1e3 * t_torch, '9.2f'):>9} {_fmt(ratio, '7.2f'):>8}")
        finally:
            if torch is not None and torch_threads_before is not None:
                torch.set_num_threads(torch_threads_before)
    return rows
