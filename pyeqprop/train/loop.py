"""The training application: data → model → settle → EP estimate → optimizer → metrics.

``train(cfg)`` runs one job into a run folder::

    RUN/config.toml        the effective configuration
    RUN/metrics.jsonl      one JSON object per epoch (keys: METRIC_KEYS)
    RUN/latest.npz         checkpoint after the last epoch (or at Ctrl-C, mid-epoch)
    RUN/best.npz           checkpoint with the best test accuracy
    RUN/teacher.npz        the backprop teacher (trained once, then reused)
    RUN/curves.png         loss and accuracy per epoch (when matplotlib is installed)

metrics.jsonl keys: ``epoch`` (1-based), ``train_loss``/``train_acc`` (running mean over the
epoch's batches at the free state), ``test_loss``/``test_acc`` (after the epoch, T_eval
steps), ``residual_free``/``residual_nudged`` (largest settling residual of the epoch),
``lr`` (largest rate of the epoch), ``seconds`` (training time of the epoch). The file is
rewritten from the checkpoint's history on resume, so it always matches latest.npz.

Randomness is derived, not carried: the permutation of epoch e comes from
``default_rng([seed, e])`` and everything drawn for batch b (augmentation, the random sign)
from ``default_rng([seed, e, b])``. A checkpoint therefore only needs (epoch, batch) to
resume exactly where an uninterrupted run would be.

Ctrl-C (SIGINT, in the main thread) is deferred to the next batch boundary, where the
position (epoch, batch) and the parameters agree; latest.npz is saved there. A second
Ctrl-C stops at once: latest.npz is saved too, unless it arrived while the parameters and
the position were being updated (then the previous checkpoint is kept, as a mixed state
would not resume exactly).
"""
from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..backend import BackendError, get_namespace, to_numpy
from ..model.crnn import CRNN
from ..model.ep import ep_estimate
from ..model.settle import settle_ctx
from ..model.signals import SignalConfig, attach_signals
from .config import TrainConfig, dump_toml
from .progress import ProgressBar

__all__ = ["train", "evaluate_run", "TrainingError", "TrainingDiverged", "RunResult", "build_student",
           "make_signal_config", "prepare_data", "METRIC_KEYS"]

METRIC_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "residual_free", "residual_nudged",
               "lr", "seconds", "grad_mean_abs")  # grad_mean_abs: {layer weight: epoch mean of mean |g|}


class TrainingError(RuntimeError):
    """A training job cannot start or continue; the message says why and what to do."""


class TrainingDiverged(TrainingError):
    """NaN or inf appeared; names the epoch, batch and layer."""


@dataclass
class RunResult:
    run_dir: Path
    history: list = field(default_factory=list)
    test_acc: float = float("nan")
    teacher_test_acc: float | None = None
    interrupted: bool = False
    seconds: float = 0.0


def make_signal_config(cfg: TrainConfig) -> SignalConfig:
    return SignalConfig(local_layers=cfg.local_layers, local_weight=cfg.local_weight, local_grid=cfg.local_grid,
                        local_loss=cfg.local_loss, kd_layers=cfg.kd_layers, kd_weight=cfg.kd_weight,
                        kd_normalisation=cfg.kd_normalisation, output_kd_weight=cfg.output_kd_weight,
                        temperature=cfg.temperature, init=cfg.signal_init)


def build_student(cfg: TrainConfig, input_shape, num_classes, xp, teacher=None) -> CRNN:
    net = CRNN(cfg.arch, input_shape, num_classes=num_classes, readout=cfg.readout, activation=cfg.activation,
               dtype=cfg.dtype, xp=xp, seed=cfg.seed, weight_scale=cfg.weight_scale)
    attach_signals(net, make_signal_config(cfg), teacher)
    return net


@dataclass
class Data:
    x_train: object
    y_train: object
    x_test: object
    y_test: object
    input_shape: tuple
    num_classes: int
    mean: tuple
    std: tuple
    name: str


def prepare_data(cfg: TrainConfig, xp, dataset=None) -> Data:
    """Load the data set, normalise on host (unless augmenting), and move it to the device once."""
    from ..data import load_dataset
    from ..data.augment import normalize

    name = dataset or cfg.dataset
    official = name.lower().replace("-", "").replace("_", "") in ("cifar10", "cifar100")
    ds = load_dataset(name, root=cfg.data_root or None, download=cfg.download, seed=cfg.seed,
                      test_fraction=None if official else cfg.test_fraction)
    dtype = getattr(xp, cfg.dtype)
    x_tr = xp.asarray(ds.x_train, dtype=dtype)
    x_te = normalize(xp.asarray(ds.x_test, dtype=dtype), ds.mean, ds.std)
    if not cfg.augment:
        x_tr = normalize(x_tr, ds.mean, ds.std)
    return Data(x_tr, xp.asarray(ds.y_train), x_te, xp.asarray(ds.y_test), ds.input_shape, ds.num_classes,
                ds.mean, ds.std, ds.name)


def _accuracy_and_loss(net, x, y, T, batch_size=256):
    """Test accuracy and mean readout cost after T free steps, in batches (host floats)."""
    xp = net.xp
    n = x.shape[0]
    correct, loss = 0, 0.0
    term = net.readout_term
    for lo in range(0, n, batch_size):
        xb, yb = x[lo:lo + batch_size, ...], y[lo:lo + batch_size]
        st = settle_ctx(net, xb, T, None).state
        pred = xp.argmax(net.logits(st), axis=1)
        correct += int(to_numpy(xp.sum(xp.astype(pred == yb, xp.int64))))
        loss += float(to_numpy(xp.sum(term.value(net.params, st, term.prepare(net.params, xb, yb)))))
    return correct / max(n, 1), loss / max(n, 1)


def _all_finite(xp, arrays) -> bool:
    """One host transfer for the whole list (the per-array answers stay on the device)."""
    return bool(to_numpy(xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in arrays]))))


def _check_finite(net, states, epoch, batch, phase):
    xp = net.xp
    if _all_finite(xp, states):
        return
    for l, s in enumerate(states):
        if not bool(to_numpy(xp.all(xp.isfinite(s)))):
            raise TrainingDiverged(f"training diverged at epoch {epoch}, batch {batch}: the {phase} state of layer "
                                   f"{l + 1} ({net.layers[l].name}) holds NaN or inf")


def _check_phases_finite(net, res, epoch, batch):
    """The free and nudged states of one estimate, with one host transfer when all are finite."""
    if _all_finite(net.xp, list(res.free.state) + [s for ph in res.nudged for s in ph.state]):
        return
    _check_finite(net, res.free.state, epoch, batch, "free")
    for ph in res.nudged:
        _check_finite(net, ph.state, epoch, batch, "nudged")


def _check_finite_params(net, epoch, batch):
    xp = net.xp
    if _all_finite(xp, list(net.params.values())):
        return
    for k, v in net.params.items():
        if not bool(to_numpy(xp.all(xp.isfinite(v)))):
            raise TrainingDiverged(f"training diverged at epoch {epoch}, batch {batch}: parameter {k} holds NaN or inf "
                                   "after the update (lower the learning rate or beta)")


def _lr_map(net, cfg):
    """Per-parameter base learning rates (Eq. 8.3): one rate for all, or one per layer in order.

    Layers are the neuron layers then the softmax readout; a local head or distillation map
    uses the rate of the layer it reads.
    """
    layer_names = [layer.name for layer in net.layers]
    if net.arch.readout is not None:
        layer_names.append(net.arch.readout.name)
    if len(cfg.lr) == 1:
        return {k: cfg.lr[0] for k in net.params}
    if len(cfg.lr) != len(layer_names):
        raise TrainingError(f"lr has {len(cfg.lr)} values but the network has {len(layer_names)} layers "
                            f"({', '.join(layer_names)}): give one rate or one per layer")
    rate = dict(zip(layer_names, cfg.lr))
    out = {k: rate[k.split(".")[0]] for k in net.network_param_names()}
    for _, term in net.cost_terms:  # the readout has its own rate; a head or map takes its layer's
        for spec in term.param_specs():
            out[spec.name] = rate.get(spec.name.split(".")[0], rate[layer_names[term.layer]])
    return out


def _anneal(opt, cfg, epoch):
    """Set this epoch's learning rates by the cosine schedule (Eq. 8.2); returns the largest."""
    if cfg.cosine_epochs >= 0:
        opt.anneal(epoch, lr_min=cfg.lr_min, epochs_cos=cfg.cosine_epochs or cfg.epochs)
    return max(opt.lrs.values())


def _run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    return Path("runs") / f"{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}"


def _ensure_writable(run: Path):
    try:
        run.mkdir(parents=True, exist_ok=True)
        probe = run / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"output folder {str(run)!r} is not writable ({exc.strerror or exc}); "
                            "choose another with --out") from None


def _get_teacher(cfg, data, xp, run: Path, log):
    from ..model.teacher import Teacher
    from .checkpoint import CheckpointError, check_compatible, load_teacher, save_teacher
    from .teacher_train import train_teacher

    path = Path(cfg.teacher) if cfg.teacher else run / "teacher.npz"
    teacher = Teacher(cfg.arch, data.input_shape, num_classes=data.num_classes, activation=cfg.activation,
                      dtype=cfg.dtype, xp=xp, seed=cfg.seed, weight_scale=cfg.teacher_weight_scale)
    if path.exists():
        loaded = load_teacher(path, xp=xp, dtype=cfg.dtype)
        if loaded.input_shape != tuple(data.input_shape) or loaded.num_classes != data.num_classes:
            raise TrainingError(f"teacher {str(path)!r} was trained for inputs {loaded.input_shape} and "
                                f"{loaded.num_classes} classes, but {data.name} has {tuple(data.input_shape)} and "
                                f"{data.num_classes}; delete it or pass another --teacher")
        try:
            check_compatible(loaded.params, teacher.params)
        except CheckpointError as exc:
            raise TrainingError(f"teacher {str(path)!r} does not fit arch {cfg.arch!r}: {exc}; "
                                "delete it or pass another --teacher") from None
        log(f"teacher: loaded {path}")
        return loaded
    if cfg.teacher:
        raise TrainingError(f"teacher file {str(path)!r} does not exist")
    t0 = time.perf_counter()
    train_teacher(teacher, data.x_train, data.y_train, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr,
                  momentum=cfg.momentum, batch_size=cfg.teacher_batch_size, seed=cfg.seed,
                  augment=cfg.augment_options if cfg.augment else None, mean=data.mean, std=data.std, log=log)
    save_teacher(path, teacher, {"arch": cfg.arch, "input_shape": list(data.input_shape),
                                 "num_classes": data.num_classes, "activation": cfg.activation, "seed": cfg.seed})
    log(f"teacher: trained by backprop in {time.perf_counter() - t0:.1f}s, saved to {path}")
    return teacher


def _plot_curves(run: Path, history):
    """Draw curves.png with an object-oriented Figure: the global matplotlib backend is left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.4))
    FigureCanvasAgg(fig)
    a1, a2 = fig.subplots(1, 2)
    a1.plot(ep, [h["train_loss"] for h in history], label="train")
    a1.plot(ep, [h["test_loss"] for h in history], label="test")
    a1.set_xlabel("epoch")
    a1.set_ylabel("readout cost at the free state")
    a1.legend()
    a2.plot(ep, [100 * h["train_acc"] for h in history], label="train")
    a2.plot(ep, [100 * h["test_acc"] for h in history], label="test")
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.legend()
    fig.tight_layout()
    tmp = run / ".curves.png.tmp"
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, run / "curves.png")
    return True


def _estimate(net, xb, yb, cfg, rng):
    """The gradient estimate of one batch: EP (Eqs. 4.1-4.3) or, for reference runs, BPTT (Eq. 5.4)."""
    if cfg.estimator == "bptt":
        from ..model.bptt import bptt
        from ..model.ep import EPResult
        from ..model.settle import Settled

        r = bptt(net, xb, yb, T=cfg.T1)
        return EPResult(r.grads, Settled(r.final_state, r.residual, [], cfg.T1), [], [])
    return ep_estimate(net, xb, yb, beta=cfg.beta, T1=cfg.T1, T2=cfg.T2, estimator=cfg.estimator, rng=rng)


class _Stop(Exception):
    """Raised at a batch boundary to stop the run (Ctrl-C deferred there, or ``max_batches``)."""


class _DeferredInterrupt:
    """While active, the first SIGINT only sets ``requested``; a second one raises KeyboardInterrupt at once.

    Installed only in the main thread and only over Python's default SIGINT handler, so an
    embedding application that handles SIGINT itself keeps its handler.
    """

    def __init__(self, log):
        self.log = log
        self.requested = False
        self.finishing = False  # set while the final checkpoint is written: SIGINT is then ignored
        self._previous = None

    def _handler(self, signum, frame):
        if self.finishing:
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("\ninterrupt: stopping after the current batch and saving latest.npz (Ctrl-C again to stop "
                 "at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
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


def _check_fresh(run: Path):
    """A new run must not mix its files with an earlier run's."""
    for name in ("latest.npz", "metrics.jsonl"):
        if (run / name).exists():
            raise TrainingError(f"output folder {str(run)!r} already holds a run ({name}); continue it with "
                                f"--resume {run} or choose another --out")


def train(cfg: TrainConfig, *, resume: str | os.PathLike | None = None, log=print, max_batches=None) -> RunResult:
    """Run (or resume) a training job described by ``cfg``; returns the history and final accuracies.

    ``max_batches`` stops after that many batches in total (a test hook that behaves like Ctrl-C).
    On resume, ``cfg`` may change ``epochs``, the learning rates and other settings; the
    parameters, momentum buffers, position and history come from RUN/latest.npz.
    """
    from .checkpoint import CheckpointError, check_compatible, load_checkpoint, save_checkpoint
    from .optim import SGD

    cfg.validate()
    try:
        xp = get_namespace(cfg.backend)
    except BackendError as exc:
        raise TrainingError(str(exc)) from None
    start_epoch, start_batch, accum, history, best = 0, 0, None, [], -1.0
    run = Path(resume) if resume is not None else _run_dir(cfg)
    ckpt = None
    if resume is not None:
        latest = run / "latest.npz"
        if not latest.exists():
            raise TrainingError(f"cannot resume: {latest} does not exist")
        ckpt = load_checkpoint(latest)
        extra = ckpt.extra if isinstance(ckpt.extra, dict) else {}
        pos = extra.get("position", {})
        start_epoch, start_batch = int(pos.get("epoch", ckpt.epoch)), int(pos.get("batch", 0))
        accum = extra.get("accum")
        history = list(extra.get("history", []))
        best = float(extra.get("best_test_acc", -1.0))
    else:
        _check_fresh(run)
    _ensure_writable(run)
    data = prepare_data(cfg, xp)
    log(f"data: {data.name}, {data.x_train.shape[0]} train / {data.x_test.shape[0]} test, input {data.input_shape}, "
        f"{data.num_classes} classes; backend {cfg.backend}, {cfg.dtype}; run folder {run}")
    if ckpt is not None:  # the student's own layers first, so a wrong --arch is named as such
        bare = CRNN(cfg.arch, data.input_shape, num_classes=data.num_classes, readout=cfg.readout,
                    activation=cfg.activation, dtype=cfg.dtype, xp=xp, seed=cfg.seed)
        check_compatible({k: ckpt.params[k] for k in ckpt.params if k in bare.params}, bare.params)
        del bare
    teacher, teacher_acc = None, None
    needs_teacher = make_signal_config(cfg).needs_teacher()
    if needs_teacher or (cfg.teacher_epochs > 0 and resume is None) or (run / "teacher.npz").exists():
        if needs_teacher or cfg.teacher_epochs > 0 or cfg.teacher:
            teacher = _get_teacher(cfg, data, xp, run, log)
            teacher_acc = teacher.accuracy(data.x_test, data.y_test)
            log(f"teacher: test accuracy {100 * teacher_acc:.2f}%")
    net = build_student(cfg, data.input_shape, data.num_classes, xp, teacher if needs_teacher else None)
    lr_map = _lr_map(net, cfg)
    opt = SGD(net.params, lr=max(cfg.lr), momentum=cfg.momentum, weight_decay=cfg.weight_decay, lr_per_param=lr_map)
    if ckpt is not None:
        check_compatible(ckpt.params, net.params)
        for k in net.params:
            net.params[k] = xp.asarray(ckpt.params[k], dtype=net.dtype)
        opt.params = net.params
        if ckpt.optimizer_state is not None:
            base_lrs = dict(opt.base_lrs)
            try:
                opt.load_state_dict(ckpt.optimizer_state)
            except ValueError as exc:
                raise CheckpointError(f"cannot resume from {run / 'latest.npz'}: {exc}") from None
            # the configuration's rates win (a flag like --lr on resume must not be ignored);
            # momentum buffers and the step count come from the checkpoint
            opt.base_lrs, opt.lrs = base_lrs, dict(base_lrs)
            opt.momentum, opt.weight_decay = cfg.momentum, cfg.weight_decay
        log(f"resumed from {run / 'latest.npz'} at epoch {start_epoch + 1}, batch {start_batch}")
    # the run folder is written only once the job is known to start: a failed resume leaves it as it was
    (run / "config.toml").write_text(dump_toml(cfg), encoding="utf-8")  # its comments use SPEC.md symbols
    _write_metrics(run, history)
    n_train = data.x_train.shape[0]
    n_batches = (n_train + cfg.batch_size - 1) // cfg.batch_size
    result = RunResult(run, history, teacher_test_acc=teacher_acc)
    t_start = time.perf_counter()
    total_batches = 0

    def fresh():
        return {"loss": 0.0, "correct": 0, "seen": 0, "res_free": 0.0, "res_nudged": 0.0, "time": 0.0,
                "grad": {}, "batches": 0}

    # per-layer learning signal: mean |g| of each neuron layer's weight estimate, averaged over the epoch
    grad_keys = [f"{layer.name}.weight" for layer in net.layers]

    def save(path, epoch, batch, acc):
        try:
            save_checkpoint(path, params=net.params, optimizer_state=opt.state_dict(), epoch=epoch,
                            rng_state={"seed": cfg.seed, "epoch": epoch, "batch": batch}, config=cfg.to_dict(),
                            extra={"position": {"epoch": epoch, "batch": batch}, "accum": acc, "history": history,
                                   "best_test_acc": best})
        except OSError as exc:  # disk full, quota, file-size limit: the write is atomic, the old file stays
            kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
            raise TrainingError(f"cannot write checkpoint {path} ({exc.strerror or exc}); {kept}") from None

    def note_checkpoint():
        latest = run / "latest.npz"
        if not latest.exists():
            return "no checkpoint had been written yet"
        try:
            pos = load_checkpoint(latest).extra["position"]
            return f"the last good checkpoint {latest} ({_where(pos['epoch'], pos['batch'])}) is kept"
        except (CheckpointError, KeyError, TypeError):
            return f"{latest} is left as it was"

    # position of the next batch to run, and the running sums of its epoch (None: not started);
    # busy while the parameters, sums, history and position are being updated and disagree
    epoch, batch, acc = start_epoch, start_batch, accum
    busy = False
    t0 = time.perf_counter()
    stop = _DeferredInterrupt(log)
    with stop:  # restores the SIGINT handler on the way out, after the final save
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # NaN/inf are reported by _check_finite*
                from ..data.augment import augment, normalize
                from ..data.batches import iterate_batches

                while epoch < cfg.epochs:
                    t0 = time.perf_counter()
                    if acc is None:
                        acc = fresh()
                    lr_now = _anneal(opt, cfg, epoch)
                    perm_rng = np.random.default_rng([cfg.seed, epoch])
                    bar = ProgressBar(n_batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", mode=cfg.progress)
                    batches = iterate_batches(data.x_train, data.y_train, cfg.batch_size, shuffle=True, rng=perm_rng,
                                              xp=xp)
                    for b, (xb, yb) in enumerate(itertools.islice(batches, batch, None), start=batch):
                        if stop.requested or (max_batches is not None and total_batches >= max_batches):
                            raise _Stop
                        rng = np.random.default_rng([cfg.seed, epoch, b])
                        if cfg.augment:
                            xb = normalize(augment(xb, rng, **cfg.augment_options), data.mean, data.std)
                        res = _estimate(net, xb, yb, cfg, rng)
                        _check_phases_finite(net, res, epoch + 1, b + 1)
                        mags = [xp.mean(xp.abs(res.grads[k])) for k in grad_keys]  # before the step; on device
                        busy = True
                        opt.step(res.grads)
                        _check_finite_params(net, epoch + 1, b + 1)
                        term = net.readout_term
                        st = res.free.state
                        loss = xp.sum(term.value(net.params, st, term.prepare(net.params, xb, yb)))
                        correct = xp.sum(xp.astype(xp.argmax(net.logits(st), axis=1) == yb, loss.dtype))
                        # one host transfer for the batch's loss, correct count and per-layer |g|
                        host = to_numpy(xp.stack([loss, correct, *mags])).tolist()
                        acc["loss"] += host[0]
                        acc["correct"] += int(host[1])
                        mags = host[2:]
                        acc["seen"] += int(xb.shape[0])
                        acc["res_free"] = max(acc["res_free"], res.free.residual)
                        acc["res_nudged"] = max([acc["res_nudged"]] + [ph.residual for ph in res.nudged])
                        grad_sums = acc.setdefault("grad", {})  # setdefault: a checkpoint from before this field
                        for k, v in zip(grad_keys, mags):
                            grad_sums[k] = grad_sums.get(k, 0.0) + v
                        acc["batches"] = acc.get("batches", 0) + 1
                        total_batches += 1
                        batch = b + 1
                        busy = False
                        bar.update(b + 1, loss=acc["loss"] / acc["seen"], acc=acc["correct"] / acc["seen"],
                                   residual=res.free.residual)
                    bar.close()
                    if stop.requested:  # before the test evaluation, which can take a while
                        raise _Stop
                    acc["time"] += time.perf_counter() - t0
                    test_acc, test_loss = _accuracy_and_loss(net, data.x_test, data.y_test, cfg.eval_steps)
                    row = {"epoch": epoch + 1, "train_loss": acc["loss"] / max(acc["seen"], 1),
                           "train_acc": acc["correct"] / max(acc["seen"], 1), "test_loss": test_loss,
                           "test_acc": test_acc, "residual_free": acc["res_free"], "residual_nudged": acc["res_nudged"],
                           "lr": lr_now, "seconds": acc["time"],
                           "grad_mean_abs": {k: v / max(acc.get("batches", 0), 1)
                                             for k, v in acc.get("grad", {}).items()}}
                    busy = True
                    history.append(row)
                    epoch, batch, acc = epoch + 1, 0, None  # the epoch is done: the position moves on
                    busy = False
                    with open(run / "metrics.jsonl", "a") as fh:
                        fh.write(json.dumps(row) + "\n")
                    log(f"epoch {epoch:3d}/{cfg.epochs}  train loss {row['train_loss']:.4f} "
                        f"acc {100 * row['train_acc']:6.2f}%  test loss {test_loss:.4f} acc {100 * test_acc:6.2f}%  "
                        f"residual free {row['residual_free']:.1e} nudged {row['residual_nudged']:.1e}  "
                        f"{row['seconds']:.1f}s")
                    if test_acc > best:
                        best = test_acc
                        save(run / "best.npz", epoch, 0, None)
                    if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                        save(run / "latest.npz", epoch, 0, None)
                    _plot_curves(run, history)
        except (_Stop, KeyboardInterrupt) as exc:  # KeyboardInterrupt: a second Ctrl-C, or no handler installed
            stop.finishing = True  # further Ctrl-C must not break off the final save
            result.interrupted = True
            if isinstance(exc, KeyboardInterrupt) and busy:  # a half-done update must not be saved
                hint = f" Resume with: pyeqprop train --resume {run}" if (run / "latest.npz").exists() else ""
                log(f"\naborted during an update without saving; {note_checkpoint()}.{hint}")
            else:
                if acc is not None:
                    acc["time"] += time.perf_counter() - t0
                save(run / "latest.npz", epoch, batch, acc)
                log(f"\ninterrupted ({_where(epoch, batch)}); checkpoint saved to {run / 'latest.npz'}. "
                    f"Resume with: pyeqprop train --resume {run}")
            result.seconds = time.perf_counter() - t_start
            return result
        except TrainingDiverged as exc:
            raise TrainingDiverged(f"{exc}; {note_checkpoint()}") from None
    result.seconds = time.perf_counter() - t_start
    result.test_acc = history[-1]["test_acc"] if history else float("nan")
    return result


def evaluate_run(path, *, dataset=None, log=print):
    """Test accuracy of a run folder (its best.npz, else latest.npz) or of a checkpoint file."""
    from .checkpoint import CheckpointError, check_compatible, load_checkpoint
    from .config import config_from_mapping

    p = Path(path)
    if p.is_dir():
        cand = [p / "best.npz", p / "latest.npz"]
        found = [c for c in cand if c.exists()]
        if not found:
            raise TrainingError(f"{p} holds no best.npz or latest.npz checkpoint")
        p = found[0]
    ckpt = load_checkpoint(p)
    if isinstance(ckpt.extra, dict) and ckpt.extra.get("kind") == "teacher":
        raise CheckpointError(f"{p} holds a backprop teacher, not an EP student; evaluate a run folder or its "
                              "best.npz / latest.npz")
    if not ckpt.config:
        raise CheckpointError(f"{p} has no training configuration; it is not a student checkpoint")
    cfg = config_from_mapping({k: v for k, v in ckpt.config.items()})
    try:
        xp = get_namespace(cfg.backend)
    except BackendError as exc:
        raise TrainingError(str(exc)) from None
    data = prepare_data(cfg, xp, dataset)
    net = CRNN(cfg.arch, data.input_shape, num_classes=data.num_classes, readout=cfg.readout,
               activation=cfg.activation, dtype=cfg.dtype, xp=xp, seed=cfg.seed)
    sub = {k: ckpt.params[k] for k in net.params if k in ckpt.params}
    check_compatible(sub, net.params)
    for k in net.params:
        net.params[k] = xp.asarray(ckpt.params[k], dtype=net.dtype)
    acc, loss = _accuracy_and_loss(net, data.x_test, data.y_test, cfg.eval_steps)
    log(f"{p}: {data.name} test accuracy {100 * acc:.2f}% (readout cost {loss:.4f}, T={cfg.eval_steps})")
    return acc
