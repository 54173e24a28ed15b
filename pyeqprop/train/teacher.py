"""The backprop teacher of a job: training it (Eqs. 7.1-7.3, 8.1-8.2), loading or caching it, and the
``pyeqprop teacher`` command."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from ..model.teacher import Teacher
from .checkpoint import CheckpointError, check_compatible, load_teacher, save_teacher
from .data import prepare_data
from .errors import TrainingError

__all__ = ["train_teacher", "build_teacher", "get_teacher", "rebuild_teacher", "run_teacher_cli"]

_log = logging.getLogger(__name__)


def train_teacher(teacher, x, y, *, epochs, lr, momentum=0.9, batch_size=32, seed=0, weight_decay=0.0,
                  augment=None, mean=None, std=None, lr_min=1e-5, log=_log.info, progress="none"):
    """Train ``teacher`` in place by hand-derived backprop (Eq. 7.3) with SGD + momentum (Eq. 8.1).

    x, y : the training split on the teacher's backend (x normalised unless ``augment``, a dict
    of :func:`pyeqprop.data.augment.augment` options, in which case each batch is augmented,
    then normalised with ``mean``/``std``). The learning
    rate follows the cosine schedule (Eq. 8.2) over ``epochs``. Batch order: epoch e uses
    ``default_rng([seed, 10_000 + e])``. Returns the per-epoch mean training loss.

    ``log``: receives about five progress lines (None: silent); ``progress``: a
    :class:`~pyeqprop.train.progress.ProgressBar` mode for a bar per epoch on stderr.
    """
    from ..data.augment import augment as augment_batch
    from ..data.augment import normalize
    from ..data.batches import iterate_batches
    from .optim import SGD
    from .progress import ProgressBar

    opt = SGD(teacher.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for epoch in range(int(epochs)):
        opt.anneal(epoch, lr_min=lr_min, epochs_cos=int(epochs))
        rng = np.random.default_rng([seed, 10_000 + epoch])
        total, seen = 0.0, 0
        t0 = time.perf_counter()
        bar = ProgressBar(-(-x.shape[0] // batch_size), desc=f"teacher epoch {epoch + 1}/{epochs}", mode=progress)
        for b, (xb, yb) in enumerate(iterate_batches(x, y, batch_size, shuffle=True, rng=rng, xp=teacher.xp)):
            if augment:
                xb = normalize(augment_batch(xb, rng, **augment), mean, std)
            loss, grads = teacher.loss_and_grads(xb, yb)
            opt.step(grads)
            total += float(loss) * xb.shape[0]
            seen += xb.shape[0]
            bar.update(b + 1, loss=total / seen)
        bar.close()
        losses.append(total / max(seen, 1))
        if log is not None and (epoch + 1 == epochs or (epoch + 1) % max(1, epochs // 5) == 0):
            log(f"teacher epoch {epoch + 1}/{epochs}: train loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f}s)")
    return losses


def build_teacher(cfg, data, xp) -> Teacher:
    """The untrained teacher of ``cfg``: the student's architecture, feed-forward (Eq. 7.1); refused before
    any allocation when it cannot fit in memory (:func:`~pyeqprop.train.student.check_memory`)."""
    from .student import check_memory

    check_memory(cfg, data.input_shape, data.num_classes, xp)
    return Teacher(cfg.arch, data.input_shape, num_classes=data.num_classes, activation=cfg.activation,
                   dtype=cfg.dtype, xp=xp, seed=cfg.seed, weight_scale=cfg.teacher_weight_scale)


def _teacher_record(cfg, data) -> dict:
    return {"arch": cfg.arch, "input_shape": list(data.input_shape), "num_classes": data.num_classes,
            "activation": cfg.activation, "seed": cfg.seed}


def get_teacher(cfg, data, xp, run: Path, log=None) -> Teacher:
    """The job's teacher: ``cfg.teacher`` or ``run/teacher.npz`` when it exists, else trained and saved there.

    A saved teacher must fit the data (input shape, classes) and ``cfg.arch``; otherwise a
    :class:`~pyeqprop.train.errors.TrainingError` names the file and what to do.
    """
    log = log or _log.info
    path = Path(cfg.teacher) if cfg.teacher else Path(run) / "teacher.npz"
    teacher = build_teacher(cfg, data, xp)
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
                  augment=cfg.augment_options if cfg.augment else None, mean=data.mean, std=data.std, log=log,
                  progress=cfg.progress)
    save_teacher(path, teacher, _teacher_record(cfg, data))
    log(f"teacher: trained by backprop in {time.perf_counter() - t0:.1f}s, saved to {path}")
    return teacher


def run_teacher_cli(cfg, save_path) -> int:
    """``pyeqprop teacher``: train the teacher of ``cfg`` and save it to ``save_path``."""
    from ..backend import get_namespace

    xp = get_namespace(cfg.backend)
    data = prepare_data(cfg, xp)
    teacher = build_teacher(cfg, data, xp)
    train_teacher(teacher, data.x_train, data.y_train, epochs=max(cfg.teacher_epochs, 1), lr=cfg.teacher_lr,
                  momentum=cfg.momentum, batch_size=cfg.teacher_batch_size, seed=cfg.seed,
                  augment=cfg.augment_options if cfg.augment else None,
                  mean=data.mean, std=data.std, progress=cfg.progress)
    acc = teacher.accuracy(data.x_test, data.y_test)
    save_teacher(save_path, teacher, _teacher_record(cfg, data))
    print(f"teacher test accuracy {100 * acc:.2f}%; saved to {save_path}")
    return 0


def rebuild_teacher(spec: dict, xp) -> Teacher:
    """An untrained teacher of ``spec`` (:meth:`~pyeqprop.model.teacher.Teacher.spec`) on ``xp``, to receive the
    parameters a data-parallel job's rank 0 broadcasts."""
    spec = dict(spec)
    return Teacher(spec.pop("arch"), tuple(spec.pop("input_shape")), xp=xp, **spec)
