"""The communicator of a training job: one process, or the ranks of an MPI job (mpi4py).

The library (ops, model, learning) never communicates; data parallelism lives in the training
application (:mod:`pyeqprop.train.parallel`), behind the small interface of :class:`Comm`:

    size, rank            how many processes, and which one this is (0 … size − 1)
    allgather_rows(buf)   every rank's 1-D float64 buffer, stacked in rank order: one collective
    allgather(obj)        every rank's Python object, in rank order (start-up checks, errors)
    bcast(obj)            rank 0's Python object on every rank
    abort(code)           end every rank of the job now, with exit status ``code``

:func:`world` picks the implementation: :class:`SingleProcess` unless the process was started by
an MPI launcher (``mpiexec -n N``, ``srun``) with N > 1, which it tells from the launcher's
environment (``PMI_SIZE`` of MPICH, Intel MPI and Slurm's PMI; ``OMPI_COMM_WORLD_SIZE`` of Open MPI;
``MV2_COMM_WORLD_SIZE`` of MVAPICH) without initialising MPI; then :class:`MPIComm` over
``mpi4py.MPI.COMM_WORLD``. mpi4py is imported only then (``pip install -e ".[mpi]"``).
"""
from __future__ import annotations

import os
import sys
import time
from functools import lru_cache

import numpy as np

from .errors import TrainingError

__all__ = ["Comm", "SingleProcess", "MPIComm", "world", "launcher_size", "LAUNCHER_SIZE_VARS", "ABORT_GRACE_S"]

LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
"""Environment variables in which MPI launchers announce the number of processes of the job."""


ABORT_GRACE_S = 1.0
"""Seconds :meth:`MPIComm.abort` waits after flushing, so that the launcher forwards the error message first."""


class Comm:
    """The operations a data-parallel job needs; see the module docstring. Rank 0 is the root."""

    size: int = 1
    rank: int = 0

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allgather_rows(self, buf: np.ndarray) -> np.ndarray:
        """(size, m): row r is rank r's ``buf`` (1-D float64, the same length m on every rank)."""
        raise NotImplementedError

    def allgather(self, obj) -> list:
        """Every rank's ``obj`` (picklable), in rank order."""
        raise NotImplementedError

    def bcast(self, obj):
        """Rank 0's ``obj`` (picklable; ignored on the other ranks) on every rank."""
        raise NotImplementedError

    def abort(self, code: int):
        """End every process of the job with exit status ``code``; does not return."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the log."""
        raise NotImplementedError


class SingleProcess(Comm):
    """The job is this process alone: every collective returns its own input."""

    def allgather_rows(self, buf):
        return np.asarray(buf, dtype=np.float64).reshape(1, -1)

    def allgather(self, obj):
        return [obj]

    def bcast(self, obj):
        return obj

    def abort(self, code):
        raise SystemExit(int(code))  # nobody else to end

    def describe(self):
        return "one process"


class MPIComm(Comm):
    """The ranks of an MPI communicator (``mpi4py.MPI.COMM_WORLD`` by default).

    ``allgather_rows`` is one ``MPI_Allgather`` of a contiguous float64 buffer (no pickling);
    ``allgather``/``bcast`` use mpi4py's pickle-based lower-case collectives, for small objects
    and start-up only.
    """

    def __init__(self, comm=None):
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.comm = comm
        self.size = int(comm.Get_size())
        self.rank = int(comm.Get_rank())

    def allgather_rows(self, buf):
        from mpi4py import MPI

        send = np.ascontiguousarray(buf, dtype=np.float64).reshape(-1)
        out = np.empty((self.size, send.size), dtype=np.float64)
        self.comm.Allgather([send, MPI.DOUBLE], [out, MPI.DOUBLE])
        return out

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def abort(self, code):
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_S)  # MPICH's launcher drops output it has not forwarded when the job is aborted
        self.comm.Abort(int(code))
        raise SystemExit(int(code))  # MPICH's MPI_Abort may return before the launcher ends this process

    def describe(self):
        pids = self.allgather(os.getpid())
        return f"{self.size} MPI ranks (pids: " + ", ".join(f"rank {r} {p}" for r, p in enumerate(pids)) + ")"


def launcher_size(environ=None) -> tuple[int, str | None]:
    """(N, variable): the process count an MPI launcher announced in the environment; (1, None) if none did."""
    env = os.environ if environ is None else environ
    for var in LAUNCHER_SIZE_VARS:
        value = env.get(var, "")
        if value.strip().isdigit():
            return int(value), var
    return 1, None


@lru_cache(maxsize=1)
def world() -> Comm:
    """The job's communicator, made once per process: :class:`MPIComm` over ``COMM_WORLD`` when an MPI
    launcher started this process as one of N > 1, else :class:`SingleProcess`.

    Raises
    ------
    TrainingError
        Started by a launcher with N > 1 but mpi4py is missing, or MPI sees another size.
    """
    n, var = launcher_size()
    if n <= 1:
        return SingleProcess()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise TrainingError(f"this process is one of {n} started by an MPI launcher ({var}={n}), but mpi4py is "
                            "not installed; install it with: pip install -e \".[mpi]\"") from None
    comm = MPIComm()
    if comm.size != n:
        raise TrainingError(f"the MPI launcher announced {n} processes ({var}={n}) but MPI_COMM_WORLD has "
                            f"{comm.size}: is mpi4py built against the MPI of this mpiexec?")
    return comm
