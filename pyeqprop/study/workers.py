"""A study's training runs, ``jobs`` at a time, in worker processes that stop cleanly.

A study trains many runs, each into its own run folder. Stopping it must lose nothing and leave
nothing running:

- **SIGTERM or Ctrl-C to the study** (this process): it cuts the *lifeline*, a pipe whose write end
  only this process holds. Each worker then sends itself SIGTERM, which the training loop turns
  into a stop at the next batch boundary with latest.npz saved (:mod:`pyeqprop.train.loop`), and
  starts no further run. The study waits for them and raises :class:`StudyStopped`, naming the
  stopped runs; ``pyeqprop study depth --resume`` (the same flags) continues from there.
- **The study dies without a word** (SIGKILL, a crash): the pipe's write end closes with it, so the
  workers stop the same way, and then exit instead of waiting for work that will never come. (An
  orphaned worker used to train on, and to write into the run folders of a study started again.)
- **Workers ignore SIGINT.** A Ctrl-C at the terminal reaches the whole process group; the study
  alone decides what follows (a worker's second signal would abort its batch unsaved).

With ``jobs == 1`` the runs train in this process, where the training loop handles the signals
itself; a stopped run raises :class:`StudyStopped` just the same.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

__all__ = ["Stopped", "StudyStopped", "run_jobs", "worker_threads"]

_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Stopped:
    """What a job returns when a signal stopped its run: the run folder (latest.npz saved) and the signal."""

    run: str
    signum: int


class StudyStopped(Exception):
    """The study was stopped by a signal; ``stopped`` are the run folders that saved a partial run."""

    def __init__(self, signum: int, stopped=()):
        self.signum, self.stopped = int(signum), list(stopped)
        name = signal.Signals(self.signum).name
        saved = (f"{len(self.stopped)} run(s) saved latest.npz ({', '.join(self.stopped)})" if self.stopped
                 else "no run was mid-way")
        super().__init__(f"study stopped ({name}): {saved}; runs not yet started were not started. Continue "
                         "it with the same command and --resume: finished runs are read back, stopped ones go on "
                         "from their latest.npz")


# ---------------------------------------------------------------------------------------------- worker side
@dataclass
class _WorkerState:
    cut: bool = False  # the lifeline is cut: stop the current run, start no other
    training: bool = False  # a job is between its start and its end


_state = _WorkerState()


def _worker_init(lifeline) -> None:
    """Each worker's first act: ignore SIGINT, watch the lifeline, and print whole lines at once (the
    workers share the study's stdout)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    threading.Thread(target=_watch, args=(lifeline,), daemon=True, name="pyeqprop-lifeline").start()


def _watch(lifeline) -> None:
    """Wait for the lifeline's end (readable at EOF: the study closed it or died); then stop the run.

    The SIGTERM is sent once the training loop's deferred handler is armed (before, in the run's
    set-up, the default action would kill the worker mid-claim); a run that ends first needs none.
    """
    multiprocessing.connection.wait([lifeline])
    _state.cut = True  # written before ``training`` is read; _run_one writes them in the other order
    while _state.training:
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            os.kill(os.getpid(), signal.SIGTERM)
            return
        time.sleep(0.05)


def _run_one(fn, job):
    """``fn(job)`` in a worker, unless the lifeline is cut or a run of this worker was stopped; a worker whose
    study is gone exits afterwards."""
    _state.training = True
    try:
        if _state.cut:
            return None  # not started
        out = fn(job)
    finally:
        _state.training = False
    if isinstance(out, Stopped):  # signalled (by the study or by someone else): start no further run
        _state.cut = True
    if _state.cut and not multiprocessing.parent_process().is_alive():
        os._exit(128 + signal.SIGTERM)  # nobody to report to; the run saved its latest.npz
    return out


# ---------------------------------------------------------------------------------------------- study side
def worker_threads(jobs: int) -> str:
    """The BLAS threads each of ``jobs`` workers gets: cpu_count // jobs (at least 1), or what the caller set
    in $OPENBLAS_NUM_THREADS (:func:`run_jobs` sets the thread variables the caller left unset to the share)."""
    return os.environ.get("OPENBLAS_NUM_THREADS") or _share(jobs)


def _share(jobs: int) -> str:
    """cpu_count // jobs, at least 1: the threads that ``jobs`` processes can each use without oversubscribing."""
    return str(max(1, (os.cpu_count() or 1) // jobs))


class _Terminated(BaseException):
    """SIGTERM, raised in the study's main thread while its workers run."""


@dataclass
class _TermRaises:
    """While active, the first SIGTERM raises :class:`_Terminated` (a second one, the default action, ends
    the study at once; its workers still stop and save). Installed only in the main thread and only over the
    default handler, as the training loop's."""

    previous: list = field(default_factory=list)

    def _handler(self, signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise _Terminated

    def __enter__(self):
        if (threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGTERM")
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL):
            self.previous = [signal.signal(signal.SIGTERM, self._handler)]
        return self

    def __exit__(self, *exc):
        if self.previous:
            signal.signal(signal.SIGTERM, self.previous.pop())
        return False


def run_jobs(fn, todo, jobs: int, *, begin=lambda job: None, done=lambda out: None, log=print) -> list:
    """``[fn(job) for job in todo]``, ``jobs`` at a time; ``done(out)`` as each finishes (and, in this
    process, ``begin(job)`` as each starts).

    ``fn`` must be importable (the workers start by "spawn") and return a :class:`Stopped` for a run a
    signal stopped. Each worker's BLAS gets cpu_count // jobs threads (unless the caller set
    $OPENBLAS_NUM_THREADS, $OMP_NUM_THREADS or $MKL_NUM_THREADS): ``jobs`` processes each using every
    core would oversubscribe.

    Raises
    ------
    StudyStopped
        After SIGTERM or Ctrl-C, or when a run was stopped by a signal of its own: every other running run
        has then stopped at its next batch boundary and saved latest.npz.
    Exception
        What a job raised (the other runs stopped and saved as above).
    """
    if jobs == 1:
        results = []
        for job in todo:
            begin(job)
            out = fn(job)
            if isinstance(out, Stopped):
                raise StudyStopped(out.signum, [out.run])
            results.append(out)
            done(out)
        return results
    saved_env = {k: os.environ.get(k) for k in _THREAD_VARS}
    for k in _THREAD_VARS:
        os.environ.setdefault(k, _share(jobs))
    ctx = multiprocessing.get_context("spawn")
    lifeline, keeper = ctx.Pipe(duplex=False)  # the workers read; only this process holds the write end
    results, stopped, signum = [None] * len(todo), [], None
    try:
        with _TermRaises():
            pool = cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                                          initargs=(lifeline,))
            futures = {}
            try:
                futures = {pool.submit(_run_one, fn, job): i for i, job in enumerate(todo)}
                log(f"training {len(todo)} runs in {jobs} processes")
                for fut in cf.as_completed(futures):
                    out = fut.result()
                    if isinstance(out, Stopped):  # a run stopped by a signal of its own: stop the rest
                        signum = out.signum
                        break
                    results[futures[fut]] = out
                    done(out)
            except KeyboardInterrupt:
                signum = signal.SIGINT
            except _Terminated:
                signum = signal.SIGTERM
            except BaseException:
                keeper.close()
                pool.shutdown(wait=True, cancel_futures=True)
                raise
            if signum is not None:
                keeper.close()
                log(f"{signal.Signals(signum).name}: each running run stops at its next batch and saves latest.npz")
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        keeper.close()
        lifeline.close()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if signum is None:
        return results
    for fut in futures:
        if fut.done() and not fut.cancelled() and fut.exception() is None and isinstance(fut.result(), Stopped):
            stopped.append(fut.result().run)
    raise StudyStopped(signum, sorted(stopped))
