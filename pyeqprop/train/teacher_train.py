"""Training the backprop teacher (Eqs. 7.1-7.3, 8.1-8.2) and the ``pyeqprop teacher`` command."""
from __future__ import annotations

import time

import numpy as np


__all__ = ["train_teacher", "run_teacher_cli"]


def train_teacher(teacher, x, y, *, epochs, lr, momentum=0.9, batch_size=32, seed=0, weight_decay=0.0,
                  augment=None, mean=None, std=None, lr_min=1e-5, log=print):
    """Train ``teacher`` in place by hand-derived backprop (Eq. 7.3) with SGD + momentum (Eq. 8.1).

    x, y : the training split on the teacher's backend (x normalised unless ``augment``, a dict
    of :func:`pyeqprop.data.augment.augment` options, in which case each batch is augmented,
    then normalised with ``mean``/``std``). The learning
    rate follows the cosine schedule (Eq. 8.2) over ``epochs``. Batch order: epoch e uses
    ``default_rng([seed, 10_000 + e])``. Returns the per-epoch mean training loss.
    """
    from ..data.augment import augment as augment_batch
    from ..data.augment import normalize
    from ..data.batches import iterate_batches
    from .optim import SGD

    opt = SGD(teacher.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    losses = []
    for epoch in range(int(epochs)):
        opt.anneal(epoch, lr_min=lr_min, epochs_cos=int(epochs))
        rng = np.random.default_rng([seed, 10_000 + epoch])
        total, seen = 0.0, 0
        t0 = time.perf_counter()
        for xb, yb in iterate_batches(x, y, batch_size, shuffle=True, rng=rng, xp=teacher.xp):
            if augment:
                xb = normalize(augment_batch(xb, rng, **augment), mean, std)
            loss, grads = teacher.loss_and_grads(xb, yb)
            opt.step(grads)
            total += float(loss) * xb.shape[0]
            seen += xb.shape[0]
        losses.append(total / max(seen, 1))
        if log is not None and (epoch + 1 == epochs or (epoch + 1) % max(1, epochs // 5) == 0):
            log(f"teacher epoch {epoch + 1}/{epochs}: train loss {losses[-1]:.4f} ({time.perf_counter() - t0:.1f}s)")
    return losses


def run_teacher_cli(cfg, save_path) -> int:
    """``pyeqprop teacher``: train the teacher of ``cfg`` and save it to ``save_path``."""
    from ..backend import get_namespace
    from ..model.teacher import Teacher
    from .checkpoint import save_teacher
    from .loop import prepare_data

    xp = get_namespace(cfg.backend)
    data = prepare_data(cfg, xp)
    teacher = Teacher(cfg.arch, data.input_shape, num_classes=data.num_classes, activation=cfg.activation,
                      dtype=cfg.dtype, xp=xp, seed=cfg.seed, weight_scale=cfg.teacher_weight_scale)
    train_teacher(teacher, data.x_train, data.y_train, epochs=max(cfg.teacher_epochs, 1), lr=cfg.teacher_lr,
                  momentum=cfg.momentum, batch_size=cfg.teacher_batch_size, seed=cfg.seed,
                  augment=cfg.augment_options if cfg.augment else None,
                  mean=data.mean, std=data.std)
    acc = teacher.accuracy(data.x_test, data.y_test)
    save_teacher(save_path, teacher, {"arch": cfg.arch, "input_shape": list(data.input_shape),
                                      "num_classes": data.num_classes, "activation": cfg.activation,
                                      "seed": cfg.seed})
    print(f"teacher test accuracy {100 * acc:.2f}%; saved to {save_path}")
    return 0
