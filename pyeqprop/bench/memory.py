"""``pyeqprop bench memory``: peak memory of EP and of BPTT as the number of steps T grows.

EP keeps only the current state of each phase, so its peak should not depend on T; BPTT
stores every step's state, pre-activation and argmax for the reverse pass (Eqs. 5.1-5.4), so
its peak grows linearly in T. On NumPy the peak is measured with ``tracemalloc`` (NumPy
reports its buffers to it); on CuPy with the memory pool's high-water mark... which CuPy does
not expose directly, so we read ``used_bytes`` after each phase and a fresh pool per run.

Cross-check (host backends, Linux): at the largest T, EP and BPTT each run once more in a fresh
subprocess, which resets its peak resident set size after the set-up (``/proc/self/clear_refs``)
and reports the rise of the peak (VmHWM) over its resident size just before the call. RSS counts pages, not bytes asked for, and includes the
allocator's slack, so the two measures agree only roughly; what the cross-check guards is
that tracemalloc sees the buffers at all (a ratio near 1, not 0.01).
"""
from __future__ import annotations

import gc
import json
import subprocess
import sys
import tracemalloc

import numpy as np

from ..backend import backend_name, get_namespace

__all__ = ["peak_bytes", "peak_rss_rise", "run_memory_bench"]


def peak_bytes(fn, xp) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it."""
    gc.collect()
    if backend_name(xp) == "cupy":
        import cupy

        pool = cupy.get_default_memory_pool()
        pool.free_all_blocks()
        base = pool.used_bytes()
        peak = [base]
        # CuPy has no high-water mark; sample used_bytes through a hook on every allocation
        from cupy.cuda import memory_hook

        class Peak(memory_hook.MemoryHook):
            name = "pyeqprop-peak"

            def malloc_postprocess(self, **kw):
                peak[0] = max(peak[0], pool.used_bytes())

        with Peak():
            fn()
            cupy.cuda.Device().synchronize()
        return int(peak[0] - base)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return int(peak - base)


def _case(quick):
    return ("digits", (1, 8, 8), 16) if quick else ("mnist", (1, 28, 28), 32)


def _run_one(method, T, quick, dtype):
    """Build the bench's net and batch, then run one EP estimate or BPTT (the subprocess's work)."""
    from ..learning.bptt import bptt
    from ..learning.estimators import ep_estimate
    from ..model.crnn import CRNN

    arch, shape, batch = _case(quick)
    net = CRNN(arch, shape, num_classes=10, readout="softmax", activation="half_hard_sigmoid", dtype=dtype)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch, *shape)).astype(dtype)
    y = rng.integers(0, 10, batch)
    run = (lambda: ep_estimate(net, x, y, beta=0.5, T1=T, T2=max(1, T // 4))) if method == "ep" else \
        (lambda: bptt(net, x, y, T=T))
    return run


def _status_bytes(key: str) -> int:
    """A ``kB`` field of /proc/self/status (VmRSS: resident now; VmHWM: its high-water mark), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"/proc/self/status has no {key}")


def peak_rss_rise(method: str, T: int, *, quick: bool, dtype: str) -> int:
    """Rise of the peak RSS over the RSS just before one run of ``method`` ("ep" or "bptt"), measured in a
    fresh subprocess whose high-water mark is reset after the set-up (Linux: ``5 > /proc/self/clear_refs``)."""
    code = ("import json, sys; from pyeqprop.bench.memory import _child; "
            f"print(json.dumps(_child({method!r}, {int(T)}, {bool(quick)}, {dtype!r})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["rise"])


def _child(method, T, quick, dtype) -> dict:
    run = _run_one(method, T, quick, dtype)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        f.write("5")
    before = _status_bytes("VmRSS")
    run()
    return {"rise": max(0, _status_bytes("VmHWM") - before)}


def run_memory_bench(ns) -> int:
    from ..learning.bptt import bptt
    from ..model.crnn import CRNN
    from ..learning.estimators import ep_estimate

    backend = getattr(ns, "backend", "numpy")
    dtype = getattr(ns, "dtype", "float32")
    quick = getattr(ns, "quick", False)
    xp = get_namespace(backend)
    arch, shape, batch = _case(quick)
    Ts = (20, 50) if quick else (20, 50, 100, 200)
    net = CRNN(arch, shape, num_classes=10, readout="softmax", activation="half_hard_sigmoid", dtype=dtype, xp=xp)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.uniform(0, 1, (batch, *shape)).astype(dtype))
    y = xp.asarray(rng.integers(0, 10, batch))
    print(f"peak memory, preset {arch!r}, input {shape}, batch {batch}, {dtype}, backend {backend}")
    print(f"{'T':>5} {'EP (T1=T, T2=T/4) MiB':>22} {'BPTT (T) MiB':>13} {'BPTT/EP':>8}")
    rows = []
    for T in Ts:
        ep = peak_bytes(lambda: ep_estimate(net, x, y, beta=0.5, T1=T, T2=max(1, T // 4)), xp)
        bp = peak_bytes(lambda: bptt(net, x, y, T=T), xp)
        rows.append((T, ep, bp))
        print(f"{T:>5} {ep / 2**20:>22.2f} {bp / 2**20:>13.2f} {bp / max(ep, 1):>8.1f}")
    if len(rows) >= 2:
        print(f"EP peak at T={rows[-1][0]} / at T={rows[0][0]}: {rows[-1][1] / max(rows[0][1], 1):.3f}; "
              f"BPTT: {rows[-1][2] / max(rows[0][2], 1):.2f}")
    if backend_name(xp) != "cupy" and sys.platform.startswith("linux"):
        T, ep, bp = rows[-1]
        r_ep = peak_rss_rise("ep", T, quick=quick, dtype=dtype)
        r_bp = peak_rss_rise("bptt", T, quick=quick, dtype=dtype)
        print(f"cross-check at T={T}, peak RSS rise in a fresh subprocess: EP {r_ep / 2**20:.2f} MiB "
              f"(tracemalloc/RSS {ep / max(r_ep, 1):.2f}), BPTT {r_bp / 2**20:.2f} MiB "
              f"(tracemalloc/RSS {bp / max(r_bp, 1):.2f})")
    return 0
