"""Evaluating a student: accuracy and readout cost after T free steps, and ``pyeqprop evaluate``."""
from __future__ import annotations

from pathlib import Path

from ..backend import BackendError, get_namespace, to_numpy
from ..learning.settle import FIXED, settle
from .data import prepare_data
from .errors import TrainingError
from .student import build_network

__all__ = ["accuracy_and_loss", "evaluate_run"]


def accuracy_and_loss(net, x, y, T, batch_size=256, *, settling=FIXED):
    """Accuracy and mean readout cost (Eqs. 3.3-3.4) after settling the free phase from zero, in batches.

    T is the step count, or the most steps when ``settling.tol > 0`` (Eq. 3.14). Host floats.
    """
    xp = net.xp
    n = x.shape[0]
    correct, loss = 0, 0.0
    term = net.readout_term
    for lo in range(0, n, batch_size):
        xb, yb = x[lo:lo + batch_size, ...], y[lo:lo + batch_size]
        st = settle(net, xb, T, settling=settling).state
        pred = xp.argmax(net.logits(st), axis=1)
        correct += int(to_numpy(xp.sum(xp.astype(pred == yb, xp.int64))))
        loss += float(to_numpy(xp.sum(term.value(net.params, st, term.prepare(net.params, xb, yb)))))
    return correct / max(n, 1), loss / max(n, 1)


def evaluate_run(path, *, dataset=None, log=print):
    """Test accuracy of a run folder's best.npz (chosen on the validation split), else its latest.npz,
    or of a checkpoint file; the log line names the checkpoint, its epoch and the split it scores."""
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
    net = build_network(cfg, data.input_shape, data.num_classes, xp)
    sub = {k: ckpt.params[k] for k in net.params if k in ckpt.params}
    check_compatible(sub, net.params)
    for k in net.params:
        net.params[k] = xp.asarray(ckpt.params[k], dtype=net.dtype)
    acc, loss = accuracy_and_loss(net, data.x_test, data.y_test, cfg.eval_steps, settling=cfg.settling)
    which = {"best.npz": "best on the validation split", "latest.npz": "the latest"}.get(p.name, "checkpoint")
    log(f"{p} ({which}, epoch {ckpt.epoch}): {data.name} test accuracy {100 * acc:.2f}% on the test split "
        f"(readout cost {loss:.4f}, T={cfg.eval_steps})")
    return acc
