"""``pyeqprop bench precision``: the float32 EP estimate against the float64 one, with converged phases.

Both estimates are the symmetric one (Eq. 4.2, differences formed before the reductions,
Eq. 4.6) on the same batch and initial parameters; every phase settles to a tolerance
(Eq. 3.14): float64 to 1e-10, float32 to 3e-7 (its residual cannot go much below the
float32 spacing of the states, ≈ 6e-8). Reported per parameter: the max-norm error
relative to the float64 estimate's max |g|, and the steps each phase took; for each way a nudged
phase settles (in s, or in δ = s − s⁰, Eq. 4.8). The deep case is the depth study's 8-conv net at
ω = 0.1 (Eq. 3.18), where the state form's bottom-layer estimate is float32 rounding.
"""
from __future__ import annotations

import time

import numpy as np

__all__ = ["precision_table", "run_precision_bench"]

CASES = {
    # name: (arch, input_shape, batch, network keywords)
    "laborieux": ("laborieux", (3, 32, 32), 8, {}),
    "digits-4conv": ("c8-c8m-c16-c16m", (1, 8, 8), 32, {}),  # the 4-conv net of reference_tests/test_precision.py
    "digits-8conv": ("c8-c8-c16m-c16-c16-c32m-c32-c32", (1, 8, 8), 32,  # the depth study's deep net
                     {"feedback": 0.1, "weight_scale": 4.0}),
}


def precision_table(arch, shape, batch, *, beta=0.5, tol64=1e-10, tol32=3e-7, max_steps=400, nudged="state",
                    network=None):
    """{param: relative max-norm error of the float32 estimate}, and the phases' (steps, converged) per dtype;
    ``nudged``: how the nudged phases settle (Eq. 4.8); ``network``: CRNN keywords (ω, weight scale)."""
    from ..learning.estimators import ep_estimate
    from ..learning.settle import Settling
    from ..model.crnn import CRNN

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (batch, *shape))
    y = rng.integers(0, 10, batch)
    res, phases = {}, {}
    for dtype, tol in (("float64", tol64), ("float32", tol32)):
        net = CRNN(arch, shape, num_classes=10, readout="softmax", activation="half_hard_sigmoid", dtype=dtype,
                   xp="numpy", seed=0, **(network or {}))
        e = ep_estimate(net, x.astype(dtype), y, beta=beta, T1=max_steps, T2=max_steps,
                        settling=Settling("synchronous", tol=tol, check_every=5, nudged=nudged))
        res[dtype] = e.grads
        phases[dtype] = [(p.steps, p.converged, p.residual) for p in e.phases()]
    err = {}
    for k, g64 in res["float64"].items():
        scale = float(np.max(np.abs(g64)))
        err[k] = float(np.max(np.abs(res["float32"][k].astype(np.float64) - g64))) / scale if scale else 0.0
    return err, phases


def run_precision_bench(ns) -> int:
    quick = getattr(ns, "quick", False)
    cases = ["digits-4conv", "digits-8conv"] if quick else ["digits-4conv", "digits-8conv", "laborieux"]
    print("float32 vs float64 symmetric EP estimate (Eqs. 4.2, 4.6), beta 0.5, phases settled to 1e-10 "
          "(float64) and 3e-7 (float32); nudged phases in s (state) or in δ = s − s⁰ (difference, Eq. 4.8; "
          "residual in gradient units)")
    for name in cases:
        arch, shape, batch, network = CASES[name]
        t0 = time.perf_counter()
        tables = {form: precision_table(arch, shape, batch, nudged=form, network=network)
                  for form in ("state", "difference")}
        print(f"\n{name} ({arch}{''.join(f', {k} {v}' for k, v in network.items())}, batch {batch}), "
              f"{time.perf_counter() - t0:.0f} s")
        for form, (_, phases) in tables.items():
            for dtype, ph in phases.items():
                print(f"  {form}, {dtype} phases (steps, converged, residual): "
                      + ", ".join(f"({s}, {c}, {r:.1e})" for s, c, r in ph))
        print(f"  {'parameter':<16} {'state':>12} {'difference':>12}   (max-norm rel error of float32)")
        errs = {form: err for form, (err, _) in tables.items()}
        for k in errs["state"]:
            print(f"  {k:<16} {errs['state'][k]:>12.2e} {errs['difference'][k]:>12.2e}")
        print(f"  {'worst':<16} {max(errs['state'].values()):>12.2e} {max(errs['difference'].values()):>12.2e}")
    return 0
