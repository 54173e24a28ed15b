"""``pyeqprop bench scaling``: throughput of one data-parallel EP step at N = 1 and 2 MPI ranks.

One step = what ``mpiexec -n N pyeqprop train`` does per batch
(:meth:`pyeqprop.train.parallel.DataParallel.train_step`): each rank settles its contiguous shard of
the global batch (free T1, two nudged T2, symmetric EP, Eq. 4.2) and one ``MPI_Allgather``
combines the estimates (Eq. 4.7). Every rank runs with one BLAS thread
(``OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=MKL_NUM_THREADS=1`` in its environment), so N ranks use N cores.

Each measurement is a fresh job (``mpiexec -n N python -m pyeqprop.bench.scaling``; N = 1 runs
the same worker without MPI); the jobs alternate N = 1, 2, 1, 2, … (``--repeats`` rounds), so that
a machine shared with other work slows both alike. A job times ``STEPS`` steps after one warm-up
step, the step's time being the slowest rank's; its figure is the median. Reported: samples/s =
n / (median step time) per N (median over rounds), the speed-up S_2/S_1 of each round against the
N = 1 job just before it (median, min and max over rounds) and the efficiency S_2 / (2 S_1).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["run_scaling_bench", "time_steps", "mpiexec_path", "ONE_THREAD_ENV"]

ONE_THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
"""The environment of every rank: one BLAS thread."""

STEPS = 5
"""Timed steps per job (after one warm-up step)."""


def mpiexec_path() -> str | None:
    """The ``mpiexec`` next to this Python (the ``mpich`` wheel's), else the first on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def time_steps(case: str, steps: int, dtype: str = "float32", backend: str = "numpy") -> dict:
    """Time ``steps`` data-parallel EP steps of ``case`` (a key of :data:`pyeqprop.bench.ep.CASES`) on this
    job's ranks; returns (on every rank) the global batch n, N and each step's time (the slowest rank's)."""
    from ..backend import get_namespace
    from ..train.comm import world
    from ..train.config import TrainConfig
    from ..train.parallel import DataParallel
    from .ep import CASES

    arch, shape, batch, T1, T2 = CASES[case]
    comm = world()
    dp = DataParallel(comm)
    cfg = TrainConfig(arch=arch, T1=T1, T2=T2, batch_size=batch, dtype=dtype, backend=backend,
                      estimator="symmetric", local_layers="none", kd_layers="none")
    from ..model.crnn import CRNN

    xp = get_namespace(backend)
    net = CRNN(arch, shape, num_classes=10, readout=cfg.readout, activation=cfg.activation, dtype=dtype, xp=xp,
               seed=0)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.uniform(0.0, 1.0, (batch, *shape)).astype(dtype))
    y = xp.asarray(rng.integers(0, 10, batch))
    times = []
    for i in range(steps + 1):
        comm.allgather_rows(np.zeros(1))  # start together
        t0 = time.perf_counter()
        upd, _, _ = dp.train_step(net, x, y, cfg, np.random.default_rng([0, i]), where=(1, i + 1), stop=False)
        float(np.asarray(upd.grads[net.layers[0].weight]).ravel()[0])
        mine = time.perf_counter() - t0
        if i:
            times.append(float(comm.allgather_rows(np.asarray([mine])).max()))
    return {"batch": batch, "ranks": comm.size, "times": times}


def _job(n_ranks: int, case: str, dtype: str, backend: str, steps: int) -> dict:
    env = {**os.environ, **ONE_THREAD_ENV, "PYTHONUNBUFFERED": "1"}
    worker = [sys.executable, "-m", "pyeqprop.bench.scaling", case, str(steps), dtype, backend]
    if n_ranks > 1:
        mpiexec = mpiexec_path()
        if mpiexec is None:
            raise RuntimeError("bench scaling needs mpiexec and mpi4py: pip install -e \".[mpi]\"")
        worker = [mpiexec, "-n", str(n_ranks), *worker]
    proc = subprocess.run(worker, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the {n_ranks}-rank job failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def run_scaling_bench(ns) -> int:
    """Print samples/s at N = 1 and 2 ranks, the per-round speed-ups and the efficiency (see the module)."""
    from ..train.errors import TrainingError

    case = "digits" if getattr(ns, "quick", False) else (getattr(ns, "case", None) or "digits")
    rounds = max(1, int(getattr(ns, "repeats", 5)))
    dtype, backend = getattr(ns, "dtype", "float32"), getattr(ns, "backend", "numpy")
    if backend != "numpy":
        raise TrainingError(f"bench scaling times host ranks with one BLAS thread each; backend {backend!r} is not "
                            "measured (GPUs: not done yet)")
    if mpiexec_path() is None:
        raise TrainingError("bench scaling needs mpiexec and mpi4py: pip install -e \".[mpi]\"")
    steps = 2 if getattr(ns, "quick", False) else STEPS
    from .ep import CASES

    arch, shape, batch, T1, T2 = CASES[case]
    print(f"data-parallel EP step (symmetric, T1={T1}, T2={T2}), case {case} ({arch}, global batch {batch}), "
          f"{dtype}; one BLAS thread per rank; {rounds} rounds of N=1, N=2 jobs, {steps} timed steps each")
    per_n = {1: [], 2: []}
    ratios = []
    for _ in range(rounds):
        for n in (1, 2):
            res = _job(n, case, dtype, backend, steps)
            per_n[n].append(res["batch"] / statistics.median(res["times"]))
        ratios.append(per_n[2][-1] / per_n[1][-1])
    s1, s2 = statistics.median(per_n[1]), statistics.median(per_n[2])
    print(f"{'ranks':>5} {'samples/s':>10} {'step s':>8}")
    for n, s in ((1, s1), (2, s2)):
        print(f"{n:>5} {s:>10.1f} {batch / s:>8.3f}")
    sp = statistics.median(ratios)
    print(f"speed-up S2/S1 per round: median {sp:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}); "
          f"efficiency S2/(2 S1) = {sp / 2:.2f}")
    return 0


if __name__ == "__main__":  # the worker of one job: case, steps, dtype, backend
    out = time_steps(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4])
    from ..train.comm import world

    if world().is_root:
        print(json.dumps(out), flush=True)
