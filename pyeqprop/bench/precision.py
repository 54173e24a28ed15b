"""``pyeqprop bench precision``: the float32 EP estimate against the float64 one, with converged phases.

Both estimates are the symmetric one (Eq. 4.2, differences formed before the reductions,
Eq. 4.6) on the same batch and initial parameters; every phase settles to a tolerance
(Eq. 3.14): float64 to 1e-10, float32 to 3e-7 (its residual cannot go much below the
float32 spacing of the states, ≈ 6e-8). Reported per parameter: the max-norm error
relative to the float64 estimate's max |g|, and the steps each phase took.
"""
from __future__ import annotations

import time

import numpy as np

__all__ = ["precision_table", "run_precision_bench"]

CASES = {
    # name: (arch, input_shape, batch)
    "laborieux": ("laborieux", (3, 32, 32), 8),
    "digits-4conv": ("c8-c8m-c16-c16m", (1, 8, 8), 32),  # the 4-conv net of reference_tests/test_precision.py
}


def precision_table(arch, shape, batch, *, beta=0.5, tol64=1e-10, tol32=3e-7, max_steps=400):
    """{param: relative max-norm error of the float32 estimate}, and the phases' (steps, converged) per dtype."""
    from ..learning.estimators import ep_estimate
    from ..learning.settle import Settling
    from ..model.crnn import CRNN

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch, *shape))
    y = rng.integers(0, 10, batch)
    res, phases = {}, {}
    for dtype, tol in (("float64", tol64), ("float32", tol32)):
        net = CRNN(arch, shape, num_classes=10, readout="softmax", activation="half_hard_sigmoid", dtype=dtype,
                   xp="numpy", seed=0)
        e = ep_estimate(net, x.astype(dtype), y, beta=beta, T1=max_steps, T2=max_steps,
                        settling=Settling("synchronous", tol=tol, check_every=5))
        res[dtype] = e.grads
        phases[dtype] = [(p.steps, p.converged, p.residual) for p in e.phases()]
    err = {}
    for k, g64 in res["float64"].items():
        scale = float(np.max(np.abs(g64)))
        err[k] = float(np.max(np.abs(res["float32"][k].astype(np.float64) - g64))) / scale if scale else 0.0
    return err, phases


def run_precision_bench(ns) -> int:
    cases = ["digits-4conv"] if getattr(ns, "quick", False) else ["digits-4conv", "laborieux"]
    print("float32 vs float64 symmetric EP estimate (Eqs. 4.2, 4.6), beta 0.5, phases settled to 1e-10 "
          "(float64) and 3e-7 (float32)")
    for name in cases:
        arch, shape, batch = CASES[name]
        t0 = time.perf_counter()
        err, phases = precision_table(arch, shape, batch)
        print(f"\n{name} ({arch}, batch {batch}), {time.perf_counter() - t0:.0f} s")
        for dtype, ph in phases.items():
            print(f"  {dtype} phases (steps, converged, residual): "
                  + ", ".join(f"({s}, {c}, {r:.1e})" for s, c, r in ph))
        print(f"  {'parameter':<16} {'max-norm rel error':>18}")
        for k, v in err.items():
            print(f"  {k:<16} {v:>18.2e}")
        print(f"  worst {max(err.values()):.2e}")
    return 0
