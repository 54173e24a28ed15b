"""Data-parallel training over the ranks of a :class:`~pyeqprop.train.comm.Comm` (SPEC.md Eq. 4.7).

Notation: a global batch of n samples (the batch the one-process run trains on), N ranks,
rank r's shard the r-th of the N contiguous shards of :func:`~pyeqprop.learning.shards.shard_bounds`
(n_r samples, sizes ⌈n/N⌉ then ⌊n/N⌋), g_r the estimate of that shard alone.

Every rank holds the whole data set and walks the same global batches (the permutation of
epoch e from ``default_rng([seed, e])``); it augments the *whole* global batch with the batch's
generator ``default_rng([seed, e, b])`` (cheap next to settling), so every rank draws the same
crops, flips and random sign (Eq. 4.3) as the one-process run, and then settles its shard only.
The estimate of the global batch is Eq. 4.7 across ranks,

    g = Σ_r (n_r / n) g_r,   summed in rank order,

the rule in-process shards use (:func:`~pyeqprop.learning.shards.sharded`). Each rank packs
(n_r/n)·g_r and the step's metrics into one float64 buffer, and one ``MPI_Allgather`` per step
gives every rank every row; every rank then sums the rows in rank order, so every rank applies
the bitwise same update, and the result does not depend on MPI's reduction order (which
``MPI_Allreduce`` leaves to the implementation): with a float64 network an N-rank run equals the
one-process run with ``--shards N`` bit for bit, and the one with ``--shards 1`` to rounding. The
gather moves N times the bytes of an Allreduce, which is nothing next to an EP step on CPUs.

What the buffer carries besides the gradients, combined by its rule:

- the largest residual of the free and of the nudged phases, the steps they took and whether
  they missed the tolerance: the maximum over ranks (as :func:`~pyeqprop.learning.shards.merge_settled`
  merges shards); the per-layer mean |g| is taken from the summed g, as in one process;
- whether a phase diverged on the rank (then every rank raises the same
  :class:`~pyeqprop.train.errors.TrainingDiverged`, naming the rank), and whether Ctrl-C was
  pressed there (then every rank stops at the same batch boundary).

The readout's loss and correct count are read *after* the update (as ``metrics.jsonl`` always has),
so they cannot travel in that step's buffer: each rank sums them over its shards, and
:meth:`DataParallel.epoch_sums` adds the ranks' sums once per epoch (and before a mid-epoch
checkpoint). The progress bar of rank 0 therefore shows rank 0's shards' running loss and accuracy.

Rank 0 alone writes the run folder, checkpoints, metrics and log; it alone reads the checkpoint
to resume from and broadcasts it, so resuming with another N works as long as the global batch is the
same. The teacher is trained (or loaded) on rank 0 and its parameters are broadcast. Errors
that every rank meets together (a bad flag, a missing checkpoint, differing configurations or
data, divergence) are raised on every rank and reported once, by rank 0; any other exception on
one rank is printed naming the rank and aborts the whole job (:func:`run_on_ranks`).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import sys
import traceback
from dataclasses import replace

import numpy as np

from ..backend import to_numpy
from ..learning.shards import shard_bounds
from .comm import Comm
from .config import ConfigError
from .errors import TrainingDiverged, TrainingError
from .step import Update, train_step

__all__ = ["DataParallel", "run_on_ranks", "everywhere", "on_root", "config_digest", "raised_on_every_rank"]


def raised_on_every_rank(exc: BaseException) -> bool:
    """Whether every rank raises ``exc`` at the same point (then rank 0 alone reports it)."""
    return bool(getattr(exc, "raised_on_every_rank", False)) or isinstance(exc, TrainingDiverged)
    # TrainingDiverged: the parameters are the same on every rank, and a phase's divergence is
    # shared in the step's buffer


def _shared(exc: BaseException) -> BaseException:
    exc.raised_on_every_rank = True
    return exc


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it pickles, else a TrainingError with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return TrainingError(f"{type(exc).__name__}: {exc}")


def everywhere(comm: Comm, fn):
    """``fn()`` on every rank; if it raised on any rank, every rank raises the first such rank's exception
    (its message prefixed by the rank when not every rank failed). One collective."""
    if comm.size == 1:
        return fn()
    try:
        value, err = fn(), None
    except Exception as exc:  # noqa: BLE001 - every exception is shared, then raised
        value, err = None, _portable(exc)
    errs = comm.allgather(err)
    failed = [r for r, e in enumerate(errs) if e is not None]
    if failed:
        first = errs[failed[0]]
        if len(failed) < comm.size:
            first = type(first)(f"rank {failed[0]} of {comm.size}: {first}") if _rebuildable(first) else \
                TrainingError(f"rank {failed[0]} of {comm.size}: {first}")
        raise _shared(first)
    return value


def _rebuildable(exc) -> bool:
    try:
        type(exc)("probe")
        return True
    except Exception:
        return False


def on_root(comm: Comm, fn):
    """``fn()`` on rank 0, its value (or exception) on every rank. One collective."""
    if comm.size == 1:
        return fn()
    if comm.is_root:
        try:
            out = (True, fn())
        except Exception as exc:  # noqa: BLE001 - shared, then raised on every rank
            out = (False, _portable(exc))
    else:
        out = None
    ok, value = comm.bcast(out)
    if not ok:
        raise _shared(value)
    return value


def config_digest(cfg, resume=None) -> str:
    """SHA-256 of the configuration (and the run to resume) as canonical JSON."""
    text = json.dumps({"config": cfg.to_dict(), "resume": None if resume is None else str(resume)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _data_digest(data) -> str:
    h = hashlib.sha256()
    for a in (data.x_train, data.y_train):
        a = np.ascontiguousarray(to_numpy(a))
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def run_on_ranks(comm: Comm, fn, exit_code):
    """Run the command ``fn()`` on this rank and return its exit status, so that no rank is left waiting.

    Parameters
    ----------
    comm : the job's communicator; with one process ``fn()`` is simply called.
    fn : the command; returns an exit status.
    exit_code : maps an exception to the exit status the command line gives it.

    An exception every rank raises together (:func:`raised_on_every_rank`) propagates on rank 0
    (which reports it) and is the exit status, silently, on the others. Any other exception is
    printed on stderr naming the rank (with its traceback unless it is a known error, status 2),
    and ``comm.abort`` ends every rank with its status: the others may be waiting in a collective.
    """
    if comm.size == 1:
        return fn()
    try:
        return fn()
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt must not leave ranks waiting
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        if raised_on_every_rank(exc):
            if comm.is_root:
                raise
            return exit_code(exc)
        code = exit_code(exc)
        if code not in (2, 3, 130):
            traceback.print_exc()
        print(f"error: rank {comm.rank} of {comm.size}: {type(exc).__name__}: {exc}; aborting all "
              f"{comm.size} ranks", file=sys.stderr, flush=True)
        comm.abort(code)  # raises SystemExit(code) if the launcher has not ended this process yet
        raise


class DataParallel:
    """The hooks of the training loop for a job over ``comm`` (see the module docstring).

    With one process every hook is the identity and the loop is the one-process loop.
    """

    def __init__(self, comm: Comm):
        self.comm = comm
        self.size, self.rank = comm.size, comm.rank
        self.stop_agreed = False  # Ctrl-C on any rank, as of the last step's buffer

    @property
    def is_root(self) -> bool:
        return self.comm.is_root

    # ------------------------------------------------------------------ start-up checks
    def check_config(self, cfg, resume=None):
        """Refuse configurations that differ between ranks (a hash broadcast from rank 0 against each rank's)."""
        if self.size == 1:
            return
        mine = config_digest(cfg, resume)
        root = self.comm.bcast(mine)
        bad = self.comm.allgather(mine != root)
        if not any(bad):
            return
        seen = self.comm.allgather({"config": cfg.to_dict(), "resume": None if resume is None else str(resume)})
        r = bad.index(True)
        diff = [f"{k}={seen[r]['config'][k]!r} (rank 0: {seen[0]['config'][k]!r})"
                for k in seen[0]["config"] if seen[r]["config"][k] != seen[0]["config"][k]]
        if seen[r]["resume"] != seen[0]["resume"]:
            diff.append(f"--resume {seen[r]['resume']} (rank 0: {seen[0]['resume']})")
        raise _shared(ConfigError(f"the configuration differs between MPI ranks: rank {r} has {', '.join(diff)}; "
                                  f"start every rank with the same command and config file"))

    def check_data(self, data, batch_size: int):
        """Refuse training data that differ between ranks, and global batches with fewer samples than ranks."""
        if self.size == 1:
            return
        digests = self.comm.allgather(_data_digest(data))
        other = [r for r, d in enumerate(digests) if d != digests[0]]
        if other:
            raise _shared(TrainingError(f"the training data differ between MPI ranks: rank {other[0]}'s is not rank "
                                        f"0's ({data.name}); every rank must load the same data set"))
        n = int(data.x_train.shape[0])
        smallest = min(batch_size, n % batch_size or batch_size)
        if smallest < self.size:
            raise _shared(TrainingError(f"{self.size} MPI ranks need at least {self.size} samples in every batch, but "
                                        f"with {n} training samples and batch_size {batch_size} the smallest batch "
                                        f"holds {smallest}; use fewer ranks or another batch_size"))

    def exists(self, path) -> bool:
        """Whether ``path`` exists on rank 0 (whose file system holds the run folder)."""
        return on_root(self.comm, path.exists)

    def teacher(self, get, rebuild):
        """The job's teacher: ``get()`` (train or load it) on rank 0, which broadcasts its parameters;
        ``rebuild(spec)`` makes the other ranks' (a :class:`~pyeqprop.model.teacher.Teacher` of ``spec``)."""
        if self.size == 1:
            return get()
        mine = {}

        def root():
            mine["teacher"] = t = get()
            return t.spec(), {k: to_numpy(v) for k, v in t.params.items()}

        spec, params = on_root(self.comm, root)
        if self.is_root:
            return mine["teacher"]
        t = rebuild(spec)
        for k, v in params.items():
            t.params[k] = t.xp.asarray(v, dtype=t.dtype)
        return t

    # ------------------------------------------------------------------ the step
    def should_stop(self, requested: bool) -> bool:
        """Whether to stop at this batch boundary: Ctrl-C here (one process), or on any rank as of the last
        step's buffer (so that every rank stops at the same boundary)."""
        return requested if self.size == 1 else self.stop_agreed

    def train_step(self, net, xb, yb, cfg, rng, *, where, stop: bool):
        """This rank's shard of the global batch, its update, and the global update (Eq. 4.7).

        Returns
        -------
        (upd, xs, ys): the :class:`~pyeqprop.train.step.Update` of the global batch (the same on every
        rank: grads, per-layer |g|, the phases' residuals and steps combined over ranks; the free state is
        this rank's shard's) and this rank's shard (xs, ys), which :func:`~pyeqprop.train.step.step_metrics`
        reads. With one process: ``train_step`` on the whole batch, and ``stop`` as given.
        """
        if self.size == 1:
            return train_step(net, xb, yb, cfg, rng, where=where), xb, yb
        n = int(xb.shape[0])
        sl = shard_bounds(n, self.size)[self.rank]
        xs, ys = xb[sl], yb[sl]
        try:
            upd, failure = train_step(net, xs, ys, cfg, rng, where=where), None
        except TrainingDiverged as exc:
            upd, failure = None, str(exc)
        keys = list(net.params)
        w = (sl.stop - sl.start) / n
        k_ph = self._nudged_phases(cfg)
        n_resp = 2 * len(net.layers) if k_ph == 2 else 0  # the response sums of Eq. 4.9: they add over ranks
        if upd is not None:
            est = upd.estimate
            grads = [np.ravel(to_numpy(w * est.grads[k])) for k in keys]  # (n_r/n) g_r, Eq. 4.7
            grads += [np.ravel(to_numpy(upd.response)).astype(np.float64)] if n_resp else []  # (L, 2) -> (2L,)
            meta = [x for ph in est.phases() for x in (ph.residual, ph.steps, int(ph.converged is False))]
            meta += [est.info.get("cg_iterations", 0), int(est.info.get("solved") is False)]  # Eq. 5.7's solve
        else:  # this rank's phase diverged: its row only says so
            grads = [np.zeros(int(np.prod(net.params[k].shape))) for k in keys] + [np.zeros(n_resp)]
            meta = [0.0, 0, 0] * (1 + k_ph) + [0, 0]
        meta += [float(failure is not None), float(stop)]
        rows = self.comm.allgather_rows(np.concatenate(grads + [np.asarray(meta, dtype=np.float64)]))
        m = len(meta)
        diverged = rows[:, -2] > 0
        if diverged.any():  # every rank raises, naming the first rank that diverged
            msgs = self.comm.allgather(failure)
            r = int(np.flatnonzero(diverged)[0])
            raise TrainingDiverged(f"{msgs[r]} (on MPI rank {r} of {self.size})")
        self.stop_agreed = bool(rows[:, -1].max() > 0)
        total = rows[0, :-m].copy()
        for r in range(1, self.size):  # in rank order: the same bits on every rank
            total = total + rows[r, :-m]
        xp = net.xp
        grads_out, at = {}, 0
        for k in keys:
            p = net.params[k]
            size = int(np.prod(p.shape))
            grads_out[k] = xp.asarray(np.reshape(total[at:at + size], p.shape), dtype=p.dtype)
            at += size
        top = rows[:, -m:-4].max(axis=0).reshape(-1, 3)  # per phase: residual, steps, missed the tolerance
        solve = rows[:, -4:-2].max(axis=0)  # the implicit solve's most iterations, and whether any rank's missed

        def merged(ph, i):
            return replace(ph, residual=float(top[i, 0]), steps=int(top[i, 1]),
                           converged=None if ph.converged is None else not top[i, 2] > 0)

        info = dict(est.info)
        if "solved" in info:  # every rank skips the batch when one rank's solve missed its tolerance
            info.update(cg_iterations=int(solve[0]), solved=not solve[1] > 0)
        est = replace(est, grads=grads_out, free=merged(est.free, 0),
                      nudged=[merged(ph, 1 + i) for i, ph in enumerate(est.nudged)], info=info)
        mags = {layer.weight: xp.mean(xp.abs(grads_out[layer.weight])) for layer in net.layers}
        response = xp.asarray(np.reshape(total[at:at + n_resp], (-1, 2))) if n_resp else None  # the batch's sums
        return Update(est, mags, response), xs, ys

    @staticmethod
    def _nudged_phases(cfg) -> int:
        """Nudged phases of ``cfg.estimator`` (Eqs. 4.1-4.3; none for bptt and implicit)."""
        return {"symmetric": 2, "one-sided": 1, "random-sign": 1}.get(cfg.estimator, 0)

    # ------------------------------------------------------------------ the epoch's sums
    def own_share(self, acc):
        """The running sums a rank starts from on resume: rank 0 keeps the checkpoint's loss, correct count,
        samples seen and saturated counts, the other ranks start those at 0 (:meth:`epoch_sums` adds them up)."""
        if acc is None or self.is_root:
            return acc
        zero = {name: [0, 0, 0] for name in acc.get("saturated", {})}  # the same layers as rank 0's
        return {**acc, "loss": 0.0, "correct": 0, "seen": 0, "saturated": zero}

    def epoch_sums(self, acc):
        """The epoch's running sums with the readout loss, correct count, samples seen and saturated counts
        (Eq. 3.19) added over ranks (the rest is the same on every rank already). One collective; the
        identity with one process."""
        if self.size == 1 or acc is None:
            return acc
        sat = acc.get("saturated") or {}
        names = list(sat)  # the same layers in the same order on every rank
        counts = [c for name in names for c in sat[name]]
        rows = self.comm.allgather_rows(np.asarray([acc["loss"], acc["correct"], acc["seen"], *counts],
                                                   dtype=np.float64))
        loss = 0.0
        for r in range(self.size):
            loss += float(rows[r, 0])
        total = [int(v) for v in rows[:, 3:].sum(axis=0)]  # this rank's shard's counts, added over ranks
        out = {**acc, "loss": loss, "correct": int(rows[:, 1].sum()), "seen": int(rows[:, 2].sum())}
        if sat:
            out["saturated"] = {name: total[3 * i:3 * i + 3] for i, name in enumerate(names)}
        return out
