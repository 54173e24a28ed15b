"""Evaluating a student: accuracy and readout cost after T free steps, and ``pyeqprop evaluate``."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..backend import BackendError, get_namespace, to_numpy
from ..learning.settle import FIXED, settle
from .data import prepare_data
from .errors import TrainingError
from .student import build_network

__all__ = ["accuracy_and_loss", "evaluate_run", "gradient_agreement"]

_log = logging.getLogger(__name__)


def _namespace(cfg, backend):
    """The namespace to evaluate on: ``backend`` when given, else the run's own (``cfg.backend``)."""
    name = backend or cfg.backend
    try:
        return get_namespace(name)
    except BackendError as exc:
        hint = "" if backend else "; evaluate on another with --backend (e.g. --backend numpy)"
        raise TrainingError(f"{exc}{hint}") from None


def _load_into(net, ckpt, cfg, data, dataset, path):
    """Copy the checkpoint's parameters into ``net`` (built for ``data``), naming the data set when another
    one than the run's does not fit them."""
    from .checkpoint import CheckpointError, check_compatible

    xp = net.xp
    try:
        check_compatible({k: ckpt.params[k] for k in net.params if k in ckpt.params}, net.params)
    except CheckpointError:
        if dataset is None or dataset == cfg.dataset:
            raise
        detail = next((f"; parameter {k!r} is {tuple(ckpt.params[k].shape)} in the checkpoint, "
                       f"{tuple(net.params[k].shape)} for {data.name!r}" for k in net.params
                       if k in ckpt.params and tuple(ckpt.params[k].shape) != tuple(net.params[k].shape)), "")
        raise CheckpointError(f"{path} was trained on {cfg.dataset!r}; data set {data.name!r} (input "
                              f"{tuple(data.input_shape)}, {data.num_classes} classes) does not fit its parameters"
                              f"{detail}; evaluate it on a data set with the run's input shape and classes") from None
    for k in net.params:
        net.params[k] = xp.asarray(ckpt.params[k], dtype=net.dtype)


def accuracy_and_loss(net, x, y, T, batch_size=256, *, settling=FIXED):
    """Accuracy and mean readout cost (Eqs. 3.3-3.4) after settling the free phase from zero, in batches.

    T is the step count, or the most steps when ``settling.tol > 0`` (Eq. 3.14). Host floats.
    """
    xp = net.xp
    n = x.shape[0]
    correct, loss = 0, 0.0
    term = net.readout_term
    for lo in range(0, n, batch_size):
        hi = min(lo + batch_size, n)  # the standard leaves an out-of-range slice stop unspecified
        xb, yb = x[lo:hi, ...], y[lo:hi]
        st = settle(net, xb, T, settling=settling).state
        pred = xp.argmax(net.logits(st), axis=1)
        correct += int(to_numpy(xp.sum(xp.astype(pred == yb, xp.int64))))
        loss += float(to_numpy(xp.sum(term.value(net.params, st, term.prepare(net.params, xb, yb)))))
    return correct / max(n, 1), loss / max(n, 1)


def run_checkpoints(path) -> list[Path]:
    """A run folder's best.npz and latest.npz that exist, in that order, or [path] for a checkpoint file."""
    p = Path(path)
    if not p.is_dir():
        return [p]
    found = [c for c in (p / "best.npz", p / "latest.npz") if c.exists()]
    if not found:
        raise TrainingError(f"{p} holds no best.npz or latest.npz checkpoint")
    return found


def student_checkpoint(path):
    """(checkpoint, its TrainConfig) of an EP student's checkpoint file; a clear error for a teacher's or
    for one without a training configuration."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .config import config_from_mapping

    ckpt = load_checkpoint(path)
    if isinstance(ckpt.extra, dict) and ckpt.extra.get("kind") == "teacher":
        raise CheckpointError(f"{path} holds a backprop teacher, not an EP student; give a run folder or its "
                              "best.npz / latest.npz")
    if not ckpt.config:
        raise CheckpointError(f"{path} has no training configuration; it is not a student checkpoint")
    return ckpt, config_from_mapping(dict(ckpt.config))


def evaluate_run(path, *, dataset: str | None = None, backend: str | None = None, log=None) -> float:
    """Test accuracy of a run folder's best.npz (chosen on the validation split), else its latest.npz,
    or of a checkpoint file; the log line names the checkpoint, its epoch and the split it scores.

    ``dataset``: score on another data set of the same input shape and classes; ``backend``: evaluate
    on another backend than the run's (checkpoints hold host arrays). ``log``: where the line goes
    (default: this module's logger, at INFO).
    """
    log = log or _log.info
    p = run_checkpoints(path)[0]
    ckpt, cfg = student_checkpoint(p)
    xp = _namespace(cfg, backend)
    data = prepare_data(cfg, xp, dataset, training=False)
    net = build_network(dataclasses.replace(cfg, backend=backend or cfg.backend), data.input_shape,
                        data.num_classes, xp)
    _load_into(net, ckpt, cfg, data, dataset, p)
    acc, loss = accuracy_and_loss(net, data.x_test, data.y_test, cfg.eval_steps, settling=cfg.settling)
    which = {"best.npz": "best on the validation split", "latest.npz": "the latest"}.get(p.name, "checkpoint")
    log(f"{p} ({which}, epoch {ckpt.epoch}): {data.name} test accuracy {100 * acc:.2f}% on the test split "
        f"(readout cost {loss:.4f}, T={cfg.eval_steps})")
    return acc


def gradient_agreement(path, *, batches: int = 5, dataset: str | None = None, backend: str | None = None,
                       log=None) -> list[dict]:
    """The run's own gradient estimate against the equilibrium gradient (Eq. 5.7) of the same cost.

    At the parameters of ``path`` (a run folder's latest.npz, or a checkpoint), for each of the first
    ``batches`` training batches of epoch 1's order: the estimate the run trains with (its
    estimator, β, T1, T2, settling and dtype, signals included) and the equilibrium gradient of the
    same total cost computed in float64 at the free phase settled to 1e-9 (at most 3000 steps of the
    run's schedule). Returns one dict per batch: ``layers``, per layer weight the cosine and norm
    ratio; ``converged``, whether the reference's free phase and solve converged; ``estimate_converged``,
    whether every phase of the estimate reached the run's tolerance (Eq. 3.14; True for fixed step
    counts); ``asymmetry``, for the symmetric estimator each neuron layer's response asymmetry a_l
    (Eq. 4.9; empty otherwise), the per-layer sign that a bad cosine comes from a nudged phase that
    settled at another fixed point. ``dataset``, ``backend`` and ``log`` as in :func:`evaluate_run`.
    """
    import numpy as np

    from ..learning.compare import cosine_and_ratio
    from ..learning.implicit import equilibrium_gradient
    from ..learning.response import asymmetry, has_response_pair, response_sums
    from ..learning.settle import Settling
    from ..learning.signals import attach_signals, kd_schedule_factor, set_kd_weights
    from .checkpoint import load_checkpoint
    from .config import config_from_mapping
    from .step import batch_estimate, skips_update
    from .student import make_signal_config, prepare_targets
    from .teacher import get_teacher

    p = Path(path)
    run = p if p.is_dir() else p.parent
    ckpt = load_checkpoint(p / "latest.npz" if p.is_dir() else p)
    log = log or _log.info
    cfg = config_from_mapping(dict(ckpt.config))
    xp = _namespace(cfg, backend)
    data = prepare_data(cfg, xp, dataset, training=False)
    signals = make_signal_config(cfg)
    teacher = get_teacher(cfg, data, xp, run, log=lambda *a: None) if signals.needs_teacher() else None
    nets = {}
    for dtype in (cfg.dtype, "float64"):
        net = build_network(dataclasses.replace(cfg, dtype=dtype), data.input_shape, data.num_classes, xp)
        attach_signals(net, signals, None if teacher is None else _teacher_as(teacher, dtype, xp))
        prepare_targets(net, cfg, xp.astype(data.x_train, getattr(xp, dtype)))  # the run's targets (Eq. 6.9)
        # the distillation weights of the epoch the checkpoint's parameters were training in (Eq. 6.8)
        set_kd_weights(net, kd_schedule_factor(cfg.kd_schedule, min(int(ckpt.epoch), cfg.epochs - 1), cfg.epochs))
        for k in net.params:
            net.params[k] = xp.asarray(ckpt.params[k], dtype=net.dtype)
        nets[dtype] = net
    order = np.random.default_rng([cfg.seed, 0]).permutation(data.x_train.shape[0])
    out = []
    for b in range(int(batches)):
        idx = xp.asarray(order[b * cfg.batch_size:(b + 1) * cfg.batch_size])
        xb, yb = xp.take(data.x_train, idx, axis=0), xp.take(data.y_train, idx, axis=0)
        est = batch_estimate(nets[cfg.dtype], xb, yb, cfg, np.random.default_rng([cfg.seed, 0, b]))
        ref = equilibrium_gradient(nets["float64"], xp.astype(xb, xp.float64), yb, T1=3000,
                                   settling=Settling(cfg.schedule, tol=1e-9))
        layers = nets["float64"].layers
        asym = asymmetry(response_sums(est)) if has_response_pair(est) else []
        row = {"batch": b, "converged": bool(ref.free.converged and ref.solved),
               "estimate_converged": not skips_update(est, "skip"),  # no phase stopped unconverged (3.14)
               "layers": {layer.weight: cosine_and_ratio(est.grads[layer.weight], ref.grads[layer.weight])
                          for layer in layers},
               "asymmetry": {layer.name: a for layer, a in zip(layers, asym)}}
        out.append(row)
        worst = max(row["asymmetry"].items(), key=lambda kv: kv[1], default=None)
        log(f"batch {b}: " + "  ".join(f"{k} cos {c:.4f} ratio {r:.3f}" for k, (c, r) in row["layers"].items())
            + ("" if worst is None else f"  asymmetry max {worst[1]:.3f} ({worst[0]}, Eq. 4.9)")
            + ("" if row["estimate_converged"] else "  (estimate's phase NOT converged)")
            + ("" if row["converged"] else "  (reference NOT converged)"))
    return out


def _teacher_as(teacher, dtype, xp):
    """The teacher with its parameters in ``dtype`` (distillation targets for a float64 reference)."""
    if teacher.dtype_name == dtype:
        return teacher
    from ..model.teacher import Teacher

    t = Teacher(teacher.arch_name, teacher.input_shape, num_classes=teacher.num_classes,
                activation=teacher.activation, dtype=dtype, xp=xp, seed=teacher.seed)
    for k in t.params:
        t.params[k] = xp.astype(teacher.params[k], getattr(xp, dtype))
    return t
