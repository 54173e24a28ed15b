"""The training loop: epochs, metrics, checkpoints and resume around :func:`~pyeqprop.train.step.train_step`.

``train(cfg)`` runs one job into a run folder (:mod:`pyeqprop.train.runfolder`: how it is named and
claimed, and what each file is)::

    RUN/config.toml        the configuration the run was started with
    RUN/resumes.toml       what each resume changed (only when one did)
    RUN/metrics.jsonl      one JSON object per epoch (keys: METRIC_KEYS)
    RUN/latest.npz         checkpoint after the last epoch, every checkpoint_batches batches or
                           checkpoint_minutes minutes mid-epoch, and at Ctrl-C or SIGTERM
    RUN/best.npz           checkpoint with the best validation accuracy (none without a validation split)
    RUN/teacher.npz        the backprop teacher (trained once, then reused)
    RUN/curves.png         loss (log scale) and accuracy per epoch (with matplotlib; else one line says
                           it was skipped, and ``pyeqprop plot RUN`` draws it later)

Nothing is created until the job is known to start: the configuration is checked, the data loaded
and the network (with its intermediate signals) built first, so a bad ``--arch`` leaves no folder.

metrics.jsonl keys: ``epoch`` (1-based), ``train_loss``/``train_acc`` (running mean over the
epoch's batches at the free state), ``val_loss``/``val_acc`` (after the epoch, on the validation
split held out of the training split; None without one), ``test_loss``/``test_acc`` (after the epoch, T_eval
steps), ``residual_free``/``residual_nudged`` (largest settling residual of the epoch; the nudged one in
gradient units with ``nudged_phase = "difference"``, Eq. 4.8),
``lr`` (largest rate of the epoch), ``seconds`` (training time of the epoch). The file is
rewritten from the checkpoint's history on resume, so it always matches latest.npz.

Randomness is derived, not carried: the permutation of epoch e comes from
``default_rng([seed, e])`` and everything drawn for batch b (augmentation, the random sign)
from ``default_rng([seed, e, b])``. A checkpoint therefore only needs (epoch, batch) to
resume exactly where an uninterrupted run would be. The checkpoint's ``progress`` record holds
that position, the running sums of the unfinished epoch, the metrics history and the best validation
accuracy so far.

Under ``mpiexec -n N`` the job is data-parallel (:mod:`pyeqprop.train.parallel`): every rank runs this
loop on its shard of each batch, rank 0 alone writes the run folder and logs.

Ctrl-C (SIGINT) and SIGTERM, in the main thread, are deferred to the next batch boundary, where the
position (epoch, batch) and the parameters agree; latest.npz is saved there (``RunResult.signal``
says which signal; the CLI exits with 128 + its number: 130, 143). A second one stops at once:
latest.npz is saved too, unless it arrived while the parameters and the position were being updated
(then the previous checkpoint is kept, as a mixed state would not resume exactly). Before the epochs
start (data, teacher) both act as they do by default.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backend import BackendError, get_namespace
from ..learning.response import too_asymmetric
from ..learning.signals import attach_signals, kd_schedule_factor, set_kd_weights
from .checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .curves import MATPLOTLIB_MISSING, figure_title, have_matplotlib, plot_curves
from .data import prepare_data
from .errors import TrainingDiverged, TrainingError
from .evaluate import accuracy_and_loss
from .optim import SGD
from .parallel import DataParallel, on_root
from .progress import ProgressBar
from .runfolder import (changed_keys, check_can_create, check_fresh, claim_run_dir, record_resume,
                        recorded_config)
from .step import check_params_finite, skips_update, step_metrics
from .student import build_network, learning_rates, make_signal_config, prepare_targets
from .teacher import build_teacher, get_teacher, rebuild_teacher

__all__ = ["train", "RunResult", "METRIC_KEYS"]

METRIC_KEYS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc", "residual_free",
               "residual_nudged", "lr", "seconds", "grad_mean_abs", "steps_free", "steps_nudged",
               "unconverged_free", "unconverged_nudged", "skipped_updates", "saturated_free",
               "skipped_asymmetric", "asymmetry_max", "kd_weights", "steps_solve", "unsolved")
# grad_mean_abs: {layer weight: epoch mean of mean |g|}, over every batch's estimate, the skipped ones too;
# steps_*: {min, median, p90, max} of the steps the epoch's phases took; unconverged_*: the fraction of
# phases that hit T1/T2 above settle_tol (None when 0);
# skipped_updates: the fraction of batches not applied for that (unconverged = "skip"; None when settle_tol 0
# and no solve ran);
# saturated_free: {neuron layer: {"low", "high"}}, the fractions of the epoch's free-state entries at ρ = 0
# and at ρ = 1 (Eq. 3.19); skipped_asymmetric: the fraction of batches not applied for their response
# asymmetry (asymmetry_limit, Eq. 4.9; None when off; they count in skipped_updates too); asymmetry_max:
# {neuron layer: the epoch's largest a_l} (Eq. 4.9; None without the symmetric estimator); kd_weights:
# {distillation term: the weight γ_l or κ it had in the epoch} (Eq. 6.8; None without distillation);
# steps_solve: {min, median, p90, max} of the conjugate-gradient iterations of the implicit estimator's
# solves (Eq. 5.7; None for the other estimators); unsolved: the fraction of them that stopped above their
# tolerance (None without a solve; with unconverged = "skip" they count in skipped_updates)


@dataclass
class RunResult:
    run_dir: Path
    history: list = field(default_factory=list)
    test_acc: float = float("nan")
    teacher_test_acc: float | None = None
    interrupted: bool = False
    seconds: float = 0.0
    signal: int | None = None  # the signal that stopped the run (SIGINT, SIGTERM); None: max_batches or none


@dataclass
class Progress:
    """Where a run stands: the next batch (epoch, batch: 0-based epoch, batches done in it), the running
    sums of that epoch (None: not started), the metrics history and the best validation accuracy so far."""

    epoch: int = 0
    batch: int = 0
    accum: dict | None = None
    history: list = field(default_factory=list)
    best: float = -1.0

    def record(self) -> dict:
        """The checkpoint's ``progress`` entry."""
        return {"position": {"epoch": self.epoch, "batch": self.batch}, "accum": self.accum,
                "history": self.history, "best_val_acc": self.best}

    @classmethod
    def of_checkpoint(cls, ckpt) -> "Progress":
        rec = ckpt.progress if isinstance(ckpt.progress, dict) else {}
        pos = rec.get("position", {})
        return cls(int(pos.get("epoch", ckpt.epoch)), int(pos.get("batch", 0)), rec.get("accum"),
                   list(rec.get("history", [])), float(rec.get("best_val_acc", -1.0)))
        # a checkpoint from before the validation split chose best.npz on the test split: start afresh


def _fresh_accum() -> dict:
    return {"loss": 0.0, "correct": 0, "seen": 0, "res_free": 0.0, "res_nudged": 0.0, "time": 0.0, "grad": {},
            "batches": 0, "steps_free": [], "steps_nudged": [], "unconverged_free": 0, "unconverged_nudged": 0,
            "saturated": {}, "skipped": 0, "asymmetric": 0, "asymmetry": {}, "steps_solve": [], "unsolved": 0}


def _add_step(acc: dict, m) -> None:
    """Add one batch's :class:`~pyeqprop.train.step.StepMetrics` to the epoch's running sums."""
    acc["loss"] += m.loss_sum
    acc["correct"] += m.correct
    acc["seen"] += m.seen
    acc["res_free"] = max(acc["res_free"], m.residual_free)
    acc["res_nudged"] = max(acc["res_nudged"], m.residual_nudged)
    grad_sums = acc.setdefault("grad", {})  # setdefault: a checkpoint from before this field
    for k, v in m.grad_mean_abs.items():
        grad_sums[k] = grad_sums.get(k, 0.0) + v
    acc["batches"] = acc.get("batches", 0) + 1
    acc.setdefault("steps_free", []).append(m.steps_free)  # setdefault: a checkpoint from before these fields
    acc.setdefault("steps_nudged", []).extend(m.steps_nudged)
    acc["unconverged_free"] = acc.get("unconverged_free", 0) + m.unconverged_free
    acc["unconverged_nudged"] = acc.get("unconverged_nudged", 0) + m.unconverged_nudged
    acc["skipped"] = acc.get("skipped", 0) + m.skipped  # get: a checkpoint from before this field
    acc["asymmetric"] = acc.get("asymmetric", 0) + m.asymmetric
    acc.setdefault("steps_solve", []).extend(m.steps_solve)  # setdefault, get: a checkpoint from before these
    acc["unsolved"] = acc.get("unsolved", 0) + m.unsolved
    worst = acc.setdefault("asymmetry", {})  # the epoch's largest a_l per layer (Eq. 4.9)
    for name, a in m.asymmetry.items():
        worst[name] = max(worst.get(name, 0.0), a)
    sums = acc.setdefault("saturated", {})  # setdefault: a checkpoint from before this field
    for name, counts in m.saturated_free.items():  # (n_lo, n_hi, size): fractions over the batches counted
        sums[name] = [a + b for a, b in zip(sums.get(name, [0, 0, 0]), counts)]


def _distribution(steps: list) -> dict | None:
    """Min, median, 90th percentile and max of the steps the epoch's phases (Eq. 3.14) or solves (Eq. 5.7) took."""
    if not steps:
        return None
    a = np.asarray(steps, dtype=np.float64)
    return {"min": int(a.min()), "median": float(np.median(a)), "p90": float(np.percentile(a, 90)),
            "max": int(a.max())}


def _epoch_row(epoch, acc, val, test_acc, test_loss, lr_now, tol, limit=0.0, kd_weights=None) -> dict:
    """metrics.jsonl's line of a finished epoch (keys: METRIC_KEYS); ``val`` = (accuracy, loss) or None."""
    seen = max(acc["seen"], 1)
    n_free, n_nudged = len(acc.get("steps_free", [])), len(acc.get("steps_nudged", []))
    n_batches = max(acc.get("batches", 0), 1)
    n_solve = len(acc.get("steps_solve", []))
    return {"epoch": epoch, "train_loss": acc["loss"] / seen, "train_acc": acc["correct"] / seen,
            "val_loss": None if val is None else val[1], "val_acc": None if val is None else val[0],
            "test_loss": test_loss, "test_acc": test_acc, "residual_free": acc["res_free"],
            "residual_nudged": acc["res_nudged"], "lr": lr_now, "seconds": acc["time"],
            "grad_mean_abs": {k: v / max(acc.get("batches", 0), 1) for k, v in acc.get("grad", {}).items()},
            "steps_free": _distribution(acc.get("steps_free", [])),
            "steps_nudged": _distribution(acc.get("steps_nudged", [])),
            "unconverged_free": acc.get("unconverged_free", 0) / n_free if tol > 0 and n_free else None,
            "unconverged_nudged": acc.get("unconverged_nudged", 0) / n_nudged if tol > 0 and n_nudged else None,
            "skipped_updates": acc.get("skipped", 0) / n_batches if tol > 0 or limit > 0 or n_solve else None,
            "saturated_free": _saturation(acc.get("saturated")),
            "skipped_asymmetric": acc.get("asymmetric", 0) / n_batches if limit > 0 else None,
            "asymmetry_max": dict(acc["asymmetry"]) if acc.get("asymmetry") else None,
            "kd_weights": kd_weights or None,
            "steps_solve": _distribution(acc.get("steps_solve", [])),
            "unsolved": acc.get("unsolved", 0) / n_solve if n_solve else None}


def _saturation(sums: dict | None) -> dict | None:
    """The epoch's fractions of free-state entries at ρ = 0 and ρ = 1 per neuron layer (Eq. 3.19)."""
    if not sums:
        return None
    return {name: {"low": lo / size, "high": hi / size} for name, (lo, hi, size) in sums.items()}


def _evaluate_epoch(cfg, net, data, acc, epoch, lr_now) -> dict:
    """The finished epoch's metrics.jsonl row: its running sums, then the validation and test splits."""
    val = None if data.x_val is None else accuracy_and_loss(net, data.x_val, data.y_val, cfg.eval_steps,
                                                            settling=cfg.settling)
    test_acc, test_loss = accuracy_and_loss(net, data.x_test, data.y_test, cfg.eval_steps, settling=cfg.settling)
    kd = {getattr(term, "name", term.kind): w for w, term in net.cost_terms if term.kind in ("kd", "kd_out")}
    return _epoch_row(epoch, acc, val, test_acc, test_loss, lr_now, cfg.settle_tol, cfg.asymmetry_limit, kd)


def _epoch_line(row, epochs) -> str:
    """The epoch's one log line."""
    val = "" if row["val_acc"] is None else f"val acc {100 * row['val_acc']:6.2f}%  "
    return (f"epoch {row['epoch']:3d}/{epochs}  train loss {row['train_loss']:.4f} acc {100 * row['train_acc']:6.2f}%  "
            f"{val}test loss {row['test_loss']:.4f} acc {100 * row['test_acc']:6.2f}%  "
            f"residual free {row['residual_free']:.1e} nudged {row['residual_nudged']:.1e}  {row['seconds']:.1f}s")


def _anneal(opt, net, cfg, epoch):
    """Set this epoch's learning rates by the cosine schedule (Eq. 8.2) and its distillation weights
    (Eq. 6.8); returns the largest rate."""
    if cfg.cosine_epochs >= 0:
        opt.anneal(epoch, lr_min=cfg.lr_min, epochs_cos=cfg.cosine_epochs or cfg.epochs)
    set_kd_weights(net, kd_schedule_factor(cfg.kd_schedule, epoch, cfg.epochs))
    return max(opt.lrs.values())


def _ensure_writable(run: Path):
    """An existing run folder (on resume) can be written: a probe file, created and removed."""
    try:
        probe = run / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"run folder {str(run)!r} is not writable ({exc.strerror or exc}); "
                            "make it writable or copy it elsewhere and resume that") from None


class _Stop(Exception):
    """Raised at a batch boundary to stop the run (Ctrl-C deferred there, or ``max_batches``)."""


class _DeferredInterrupt:
    """While active, the first SIGINT or SIGTERM only sets ``requested`` (and ``signum``); a second one
    raises KeyboardInterrupt at once.

    Installed only in the main thread and only over the default handlers (Python's
    ``default_int_handler`` for SIGINT, ``SIG_DFL`` for SIGTERM), so an embedding application that
    handles either signal itself keeps its handler.
    """

    _WORDS = {"SIGINT": ("interrupt", "Ctrl-C again"), "SIGTERM": ("terminated (SIGTERM)", "SIGTERM again")}

    def __init__(self, log):
        self.log = log
        self.requested = False
        self.signum = None
        self.finishing = False  # set while the final checkpoint is written: the signals are then ignored
        self._previous = {}

    def _handler(self, signum, frame):
        if self.finishing:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        what, again = self._WORDS.get(signal.Signals(signum).name, ("signal", "again"))
        self.log(f"\n{what}: stopping after the current batch and saving latest.npz ({again} to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            defaults = [(signal.SIGINT, signal.default_int_handler)]
            if hasattr(signal, "SIGTERM"):
                defaults.append((signal.SIGTERM, signal.SIG_DFL))
            for signum, default in defaults:
                if signal.getsignal(signum) is default:
                    self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False


def _where(epoch: int, batch: int) -> str:
    """A position (next epoch, 0-based; batches done in it) in words."""
    if batch == 0:
        return f"end of epoch {epoch}" if epoch else "before the first batch"
    return f"epoch {epoch + 1}, after batch {batch}"


def _write_metrics(run: Path, history):
    """Rewrite metrics.jsonl from ``history`` atomically (at the start of a run or a resume)."""
    tmp = run / ".metrics.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in history))
    os.replace(tmp, run / "metrics.jsonl")


@dataclass
class _Job:
    """What a started job trains: its data, network, optimizer and run folder."""

    run: Path
    data: object
    net: object
    opt: SGD
    teacher_acc: float | None


def _open_run(resume):
    """On resume: the run folder, its latest checkpoint (None: the run stopped before its first one and
    starts again from the beginning) and the progress to continue from."""
    run = Path(resume)
    latest = run / "latest.npz"
    if latest.exists():
        ckpt = load_checkpoint(latest)
        return run, ckpt, Progress.of_checkpoint(ckpt)
    if (run / "config.toml").exists():
        return run, None, Progress()
    raise TrainingError(f"cannot resume: {latest} does not exist (is {str(run)!r} a run folder?)")


def _check_signals(cfg, data, xp, signals) -> None:
    """Attach the intermediate signals to a throwaway network (and an untrained teacher, which has the
    trained one's shapes), so that a bad --local-layers, --kd-layers or --local-grid fails before the run
    folder is created or the teacher trained."""
    net = build_network(cfg, data.input_shape, data.num_classes, xp)
    attach_signals(net, signals, build_teacher(cfg, data, xp) if signals.needs_teacher() else None)


def _restore_optimizer(opt, ckpt, cfg, run):
    """Momentum buffers and the step count from the checkpoint; the configuration's rates win
    (a flag like --lr on resume must not be ignored)."""
    if ckpt.optimizer_state is None:
        return
    base_lrs = dict(opt.base_lrs)
    try:
        opt.load_state_dict(ckpt.optimizer_state)
    except ValueError as exc:
        raise CheckpointError(f"cannot resume from {run / 'latest.npz'}: {exc}") from None
    opt.base_lrs, opt.lrs = base_lrs, dict(base_lrs)
    opt.momentum, opt.weight_decay = cfg.momentum, cfg.weight_decay


def _start(cfg, xp, run, ckpt, log, dp) -> _Job:
    """Load the data, build the student once (checked against the checkpoint) and check its signals; only
    then create the run folder (``run`` None: a new run) or check it is writable. Then get the teacher,
    attach the signals and the optimizer, and restore the checkpoint's parameters and optimizer state."""
    data = prepare_data(cfg, xp)
    dp.check_data(data, cfg.batch_size)
    log(f"data: {data.name}, {data.x_train.shape[0]} train / {data.x_test.shape[0]} test, input {data.input_shape}, "
        f"{data.num_classes} classes; backend {cfg.backend}, {cfg.dtype}")
    net = build_network(cfg, data.input_shape, data.num_classes, xp)
    if ckpt is not None:  # the student's own layers first, so a wrong --arch is named as such
        check_compatible({k: ckpt.params[k] for k in ckpt.params if k in net.params}, net.params)
    signals = make_signal_config(cfg)
    needs_teacher = signals.needs_teacher()
    _check_signals(cfg, data, xp, signals)
    fresh = ckpt is None  # a new run, or one that stopped before its first checkpoint
    if run is None:
        run = on_root(dp.comm, lambda: claim_run_dir(cfg))  # the job starts: from here on it has a folder
    else:
        on_root(dp.comm, lambda: _ensure_writable(run))
    log(f"run folder {run}")
    teacher, teacher_acc = None, None
    if needs_teacher or (cfg.teacher_epochs > 0 and fresh) or dp.exists(run / "teacher.npz"):
        if needs_teacher or cfg.teacher_epochs > 0 or cfg.teacher:  # trained on rank 0, broadcast
            teacher = dp.teacher(lambda: get_teacher(cfg, data, xp, run, log), lambda s: rebuild_teacher(s, xp))
            teacher_acc = teacher.accuracy(data.x_test, data.y_test)
            log(f"teacher: test accuracy {100 * teacher_acc:.2f}%")
    attach_signals(net, signals, teacher if needs_teacher else None)
    prepare_targets(net, cfg, data.x_train)  # Eq. 6.9: from the teacher and the training split alone
    opt = SGD(net.params, lr=max(cfg.lr), momentum=cfg.momentum, weight_decay=cfg.weight_decay,
              lr_per_param=learning_rates(net, cfg))
    if ckpt is not None:
        check_compatible(ckpt.params, net.params)
        for k in net.params:
            net.params[k] = xp.asarray(ckpt.params[k], dtype=net.dtype)
        opt.params = net.params
        _restore_optimizer(opt, ckpt, cfg, run)
    return _Job(run, data, net, opt, teacher_acc)


def _open(cfg, resume, log):
    """A new run: checks that create nothing (its folder is claimed once the job starts); a resume: the run
    folder, its checkpoint, the progress and the keys this resume changes. On rank 0 only."""
    if resume is None:  # fail early, before the data is loaded, on a folder that cannot become this run's
        if cfg.out:
            check_fresh(Path(cfg.out))
        check_can_create(Path(cfg.out or "runs"))
        return None, None, Progress(), None
    run, ckpt, prog = _open_run(resume)
    changed = changed_keys(cfg, recorded_config(run)) if (run / "config.toml").exists() else None
    if ckpt is None:
        log(f"{run} has no checkpoint yet (the run stopped before its first one): starting it again from "
            "the beginning")
    return run, ckpt, prog, changed


def _quiet(*args, **kwargs):
    """The log of ranks other than 0."""


def train(cfg: TrainConfig, *, resume: str | os.PathLike | None = None, log=None, max_batches=None,
          comm=None) -> RunResult:
    """Run (or resume) a training job described by ``cfg``; returns the history and final accuracies.

    ``max_batches`` stops after that many batches in total (a test hook that behaves like Ctrl-C).
    On resume, ``cfg`` may change ``epochs``, the learning rates and other settings; the
    parameters, momentum buffers, position and history come from RUN/latest.npz. A run folder without
    latest.npz (the run stopped before its first checkpoint) starts again from the beginning.
    The changes a resume makes to the run's recorded configuration (config.toml and the earlier
    resumes) are appended to RUN/resumes.toml once the resumed job has saved its first checkpoint;
    config.toml itself is never rewritten (:mod:`pyeqprop.train.runfolder`). ``log`` receives each
    progress line (default: the ``pyeqprop.train.loop`` logger at INFO; the CLI prints it).
    ``comm``: the :class:`~pyeqprop.train.comm.Comm` of a data-parallel job (default
    :func:`~pyeqprop.train.comm.world`: the MPI ranks under ``mpiexec -n N``, else this process);
    see :mod:`pyeqprop.train.parallel`.
    """
    from .comm import world

    log = log or logging.getLogger(__name__).info
    cfg.validate()
    dp = DataParallel(world() if comm is None else comm)
    dp.check_config(cfg, resume)
    if not dp.is_root:
        log = _quiet
    try:
        xp = get_namespace(cfg.backend)
    except BackendError as exc:
        raise TrainingError(str(exc)) from None
    run, ckpt, prog, changed = on_root(dp.comm, lambda: _open(cfg, resume, log))  # rank 0 reads, the others are told
    if dp.size > 1:
        ranks = dp.comm.describe()  # a collective: on every rank
        log(f"data-parallel over {ranks}; each takes its contiguous shard of every batch")
    job = _start(cfg, xp, run, ckpt, log, dp)
    if ckpt is not None and prog.epoch >= cfg.epochs and prog.batch == 0:  # checked like any resume; nothing left
        log(f"{job.run} is already complete ({prog.epoch} of {cfg.epochs} epochs); nothing to resume. To train "
            f"longer: pyeqprop train --resume {job.run} --epochs N with N > {prog.epoch}")
        done = prog.history[-1]["test_acc"] if prog.history else float("nan")
        return RunResult(job.run, prog.history, test_acc=done, teacher_test_acc=job.teacher_acc)
    if ckpt is not None:
        log(f"resumed from {job.run / 'latest.npz'} at epoch {prog.epoch + 1}, batch {prog.batch}")
    pending = (changed, prog.epoch, prog.batch) if changed else None
    prog.accum = dp.own_share(prog.accum)
    if dp.is_root:
        _write_metrics(job.run, prog.history)
    return _run_epochs(cfg, job, prog, log, max_batches, dp, pending)


def _epoch_end_saves(cfg, epochs_done: int) -> bool:
    """Whether latest.npz is saved at the end of the epoch that makes ``epochs_done``."""
    return epochs_done % cfg.checkpoint_every == 0 or epochs_done == cfg.epochs


def _run_epochs(cfg, job: _Job, prog: Progress, log, max_batches, dp, pending=None) -> RunResult:
    """The epochs of a started job, from ``prog`` on, with Ctrl-C and SIGTERM deferred to batch boundaries.

    ``pending``: (changed keys, epoch, batch) of this resume, recorded in resumes.toml after the first
    successful save of latest.npz."""
    from ..data.augment import augment, normalize
    from ..data.batches import iterate_batches

    run, data, net, opt = job.run, job.data, job.net, job.opt
    xp = net.xp
    n_batches = (data.x_train.shape[0] + cfg.batch_size - 1) // cfg.batch_size
    result = RunResult(run, prog.history, teacher_test_acc=job.teacher_acc)
    t_start = time.perf_counter()
    total_batches = 0

    saved = {"batches": 0, "at": time.monotonic()}  # batches and time since latest.npz was last saved
    resume_record = [pending]

    def save(path, epoch, batch, acc):
        acc = dp.epoch_sums(acc)  # every rank: the loss and correct counts added over ranks
        if path.name == "latest.npz":
            saved["batches"], saved["at"] = 0, time.monotonic()
        if not dp.is_root:
            return
        rec = Progress(epoch, batch, acc, prog.history, prog.best).record()
        try:
            save_checkpoint(path, params=net.params, optimizer_state=opt.state_dict(), epoch=epoch,
                            rng_state={"seed": cfg.seed, "epoch": epoch, "batch": batch}, config=cfg.to_dict(),
                            progress=rec)
            if path.name == "latest.npz":
                if resume_record[0] is not None:  # the resumed job has started cleanly: record what it changed
                    record_resume(run, *resume_record[0])
                    resume_record[0] = None
        except OSError as exc:  # disk full, quota, file-size limit: the write is atomic, the old file stays
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            raise TrainingError(f"cannot write checkpoint {path} ({exc.strerror or exc}); {kept}") from None

    def periodic_save_due(epoch, batch) -> bool:
        """checkpoint_batches / checkpoint_minutes since the last save of latest.npz, unless an epoch-end
        save follows at once."""
        if batch == n_batches and _epoch_end_saves(cfg, epoch + 1):
            return False
        due = ((cfg.checkpoint_batches > 0 and saved["batches"] >= cfg.checkpoint_batches)
               or (cfg.checkpoint_minutes > 0 and time.monotonic() - saved["at"] >= 60 * cfg.checkpoint_minutes))
        if cfg.checkpoint_minutes > 0 and dp.size > 1:  # the clocks of the ranks differ: rank 0's decides
            due = dp.comm.bcast(due)
        return due

    plot = {"ok": None}  # matplotlib found? (asked once, said once)

    def draw_curves():
        if not dp.is_root:
            return
        if plot["ok"] is None:
            plot["ok"] = have_matplotlib()
            if not plot["ok"]:
                log(MATPLOTLIB_MISSING.format(run=run))
        if plot["ok"]:
            plot_curves(run / "curves.png", prog.history, figure_title(run, cfg))

    def note_checkpoint():
        latest = run / "latest.npz"
        if not latest.exists():
            return (f"no checkpoint had been written yet (pyeqprop train --resume {run} starts the run again, "
                    "with any flags changed)")
        try:
            pos = load_checkpoint(latest).progress["position"]
            return f"the last good checkpoint {latest} ({_where(pos['epoch'], pos['batch'])}) is kept"
        except (CheckpointError, KeyError, TypeError):
            return f"{latest} is left as it was"

    # busy while the parameters, sums, history and position are being updated and disagree
    busy = False
    t0 = time.perf_counter()
    stop = _DeferredInterrupt(log)
    with stop:  # restores the SIGINT handler on the way out, after the final save
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # NaN/inf are reported by the step's checks
                while prog.epoch < cfg.epochs:
                    t0 = time.perf_counter()
                    if prog.accum is None:
                        prog.accum = _fresh_accum()
                    epoch, acc = prog.epoch, prog.accum
                    lr_now = _anneal(opt, net, cfg, epoch)
                    perm_rng = np.random.default_rng([cfg.seed, epoch])
                    bar = ProgressBar(n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                                      mode=cfg.progress if dp.is_root else "none")
                    batches = iterate_batches(data.x_train, data.y_train, cfg.batch_size, shuffle=True, rng=perm_rng,
                                              xp=xp)
                    for b, (xb, yb) in enumerate(itertools.islice(batches, prog.batch, None), start=prog.batch):
                        if dp.should_stop(stop.requested) or (max_batches is not None and total_batches >= max_batches):
                            raise _Stop
                        rng = np.random.default_rng([cfg.seed, epoch, b])
                        if cfg.augment:
                            xb = normalize(augment(xb, rng, **cfg.augment_options), data.mean, data.std)
                        # this rank's shard of the batch; the update of the whole batch (one collective)
                        upd, xb, yb = dp.train_step(net, xb, yb, cfg, rng, where=(epoch + 1, b + 1),
                                                    stop=stop.requested)
                        busy = True
                        skip = skips_update(upd.estimate, cfg.unconverged)  # the same on every rank
                        # Eq. 4.9: the response sums are the global batch's, so this too is the same everywhere
                        asym = (not skip and cfg.asymmetry_limit > 0
                                and too_asymmetric(upd.asymmetry(), cfg.asymmetry_limit))
                        if not (skip or asym):
                            opt.step(upd.grads)
                            check_params_finite(net, (epoch + 1, b + 1))
                        m = step_metrics(net, upd, xb, yb, skipped=skip or asym, asymmetric=asym)
                        _add_step(acc, m)
                        total_batches += 1
                        prog.batch = b + 1
                        busy = False
                        saved["batches"] += 1
                        if periodic_save_due(epoch, prog.batch):
                            now = time.perf_counter()
                            acc["time"] += now - t0
                            t0 = now
                            save(run / "latest.npz", prog.epoch, prog.batch, acc)
                        bar.update(b + 1, loss=acc["loss"] / acc["seen"], acc=acc["correct"] / acc["seen"],
                                   residual=m.residual_free)
                    bar.close()
                    if dp.should_stop(stop.requested):  # before the test evaluation, which can take a while
                        raise _Stop
                    acc["time"] += time.perf_counter() - t0
                    row = _evaluate_epoch(cfg, net, data, dp.epoch_sums(acc), epoch + 1, lr_now)
                    busy = True
                    prog.history.append(row)
                    prog.epoch, prog.batch, prog.accum = epoch + 1, 0, None  # the epoch is done: the position moves on
                    busy = False
                    if dp.is_root:
                        with open(run / "metrics.jsonl", "a") as fh:
                            fh.write(json.dumps(row) + "\n")
                    log(_epoch_line(row, cfg.epochs))
                    val = None if row["val_acc"] is None else (row["val_acc"], row["val_loss"])
                    if val is not None and val[0] > prog.best:  # chosen on validation, never on test
                        prog.best = val[0]
                        save(run / "best.npz", prog.epoch, 0, None)
                    if _epoch_end_saves(cfg, prog.epoch):
                        save(run / "latest.npz", prog.epoch, 0, None)
                    draw_curves()
        except (_Stop, KeyboardInterrupt) as exc:  # KeyboardInterrupt: a second Ctrl-C, or no handler installed
            if isinstance(exc, KeyboardInterrupt) and dp.size > 1:
                raise  # on one rank only: the job is aborted (run_on_ranks), the last checkpoint is kept
            stop.finishing = True  # further Ctrl-C must not break off the final save
            result.interrupted, result.signal = True, stop.signum
            if isinstance(exc, KeyboardInterrupt) and busy:  # a half-done update must not be saved
                hint = f" Resume with: pyeqprop train --resume {run}" if (run / "latest.npz").exists() else ""
                log(f"\naborted during an update without saving; {note_checkpoint()}.{hint}")
            else:
                if prog.accum is not None:
                    prog.accum["time"] += time.perf_counter() - t0
                save(run / "latest.npz", prog.epoch, prog.batch, prog.accum)
                log(f"\n{'terminated' if stop.signum == signal.SIGTERM else 'interrupted'} "
                    f"({_where(prog.epoch, prog.batch)}); checkpoint saved to {run / 'latest.npz'}. "
                    f"Resume with: pyeqprop train --resume {run}")
            result.seconds = time.perf_counter() - t_start
            return result
        except TrainingDiverged as exc:
            raise TrainingDiverged(f"{exc}; {note_checkpoint()}") from None
    result.seconds = time.perf_counter() - t_start
    result.test_acc = prog.history[-1]["test_acc"] if prog.history else float("nan")
    return result
