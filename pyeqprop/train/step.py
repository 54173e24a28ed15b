"""One training step: a batch's update (the gradient estimate, checked finite) and the batch's metrics.

The loop (:mod:`pyeqprop.train.loop`) owns epochs, checkpoints and resume; a batch is

    upd = train_step(net, xb, yb, cfg, rng)      # pure: the parameters are not touched
    opt.step(upd.grads)                          # the update (Eq. 8.1)
    check_params_finite(net, where)
    m = step_metrics(net, upd, xb, yb)           # one host transfer

:func:`step_metrics` reads the readout at the free state *after* the update, as
``metrics.jsonl``'s ``train_loss``/``train_acc`` always have; the per-layer |g| are taken
from the estimate, before it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..backend import to_numpy
from ..learning.estimators import Estimate, draw_sign, estimate
from ..learning.response import asymmetry, has_response_pair, response_sums
from ..model.saturation import saturated_counts
from .errors import TrainingDiverged

__all__ = ["Update", "StepMetrics", "train_step", "step_metrics", "batch_estimate", "check_params_finite",
           "UNCONVERGED_POLICIES", "skips_update"]

UNCONVERGED_POLICIES = ("apply", "skip")
"""What a batch does with an update one of whose phases stopped unconverged (SPEC 3.14, "Unconverged updates")."""


def skips_update(est: Estimate, policy: str) -> bool:
    """Whether the batch's update is skipped: ``policy`` "skip" and a phase of ``est`` stopped at its cap
    above the tolerance (``converged is False``; fixed step counts, ``None``, never skip), Eq. 3.14, or
    the implicit estimator's solve stopped above its tolerance (``info["solved"] is False``), Eq. 5.7."""
    if policy not in UNCONVERGED_POLICIES:
        raise ValueError(f"unconverged policy must be one of {', '.join(UNCONVERGED_POLICIES)}, got {policy!r}")
    return policy == "skip" and (any(ph.converged is False for ph in est.phases()) or est.info.get("solved") is False)


@dataclass
class Update:
    """One batch's update: the estimate (``grads`` is what the optimizer applies) and, on the device,
    the mean |g| of each neuron layer's weight estimate and, for the symmetric estimator, the (L, 2)
    sums of squares of its responses (:func:`~pyeqprop.learning.response.response_sums`, Eq. 4.9;
    None for the other estimators)."""

    estimate: Estimate
    grad_mean_abs: dict
    response: object = None

    def asymmetry(self) -> list[float] | None:
        """a_l per neuron layer (Eq. 4.9), one host transfer; None without two nudged phases."""
        return None if self.response is None else asymmetry(self.response)

    @property
    def grads(self) -> dict:
        return self.estimate.grads


@dataclass
class StepMetrics:
    """What one batch reports, as host numbers.

    loss_sum : Σ over the batch of the readout cost at the free state (after the update).
    correct : number of samples whose readout argmax equals the label.
    seen : batch size.
    residual_free, residual_nudged : last-step residuals r_T (Eq. 3.11) of the free phase and
        the largest over the nudged phases (NaN-free 0.0 when there is no nudged phase).
    grad_mean_abs : mean |g| of each neuron layer's weight estimate, before the update.
    steps_free, steps_nudged : steps each phase took (Eq. 3.14); one entry per nudged phase.
    unconverged_free, unconverged_nudged : phases that stopped at their cap above the tolerance
        (0 when settling fixed step counts: there is no tolerance to miss).
    saturated_free : {neuron layer name: (n_lo, n_hi, size)}: the free state's entries at ρ's lower and
        upper values and the layer's entry count over the batch (Eq. 3.19).
    skipped : 1 when the batch's update was not applied (``unconverged = "skip"``, Eq. 3.14, or
        ``asymmetry_limit``, Eq. 4.9), else 0.
    asymmetric : 1 when it was not applied for its response asymmetry (Eq. 4.9), else 0.
    asymmetry : {neuron layer name: a_l} (Eq. 4.9); empty without two nudged phases.
    steps_solve : the conjugate-gradient iterations of the implicit estimator's solve (Eq. 5.7), one
        entry; empty for the other estimators.
    unsolved : 1 when that solve stopped above its tolerance, else 0.
    """

    loss_sum: float
    correct: int
    seen: int
    residual_free: float
    residual_nudged: float
    grad_mean_abs: dict = field(default_factory=dict)
    steps_free: int = 0
    steps_nudged: list = field(default_factory=list)
    unconverged_free: int = 0
    unconverged_nudged: int = 0
    saturated_free: dict = field(default_factory=dict)
    skipped: int = 0
    asymmetric: int = 0
    asymmetry: dict = field(default_factory=dict)
    steps_solve: list = field(default_factory=list)
    unsolved: int = 0


def _all_finite(xp, arrays) -> bool:
    """One host transfer for the whole list (the per-array answers stay on the device)."""
    return bool(to_numpy(xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in arrays]))))


def _check_finite(net, states, where, phase):
    xp = net.xp
    if _all_finite(xp, states):
        return
    epoch, batch = where
    for l, s in enumerate(states):
        if not bool(to_numpy(xp.all(xp.isfinite(s)))):
            raise TrainingDiverged(f"training diverged at epoch {epoch}, batch {batch}: the {phase} state of layer "
                                   f"{l + 1} ({net.layers[l].name}) holds NaN or inf")


def check_phases_finite(net, est: Estimate, where):
    """The free and nudged states of one estimate, with one host transfer when all are finite."""
    if _all_finite(net.xp, [s for ph in est.phases() for s in ph.state]):
        return
    _check_finite(net, est.free.state, where, "free")
    for ph in est.nudged:
        _check_finite(net, ph.state, where, "nudged")


def check_params_finite(net, where):
    """Every parameter after the update, with one host transfer when all are finite."""
    xp = net.xp
    if _all_finite(xp, list(net.params.values())):
        return
    epoch, batch = where
    for k, v in net.params.items():
        if not bool(to_numpy(xp.all(xp.isfinite(v)))):
            raise TrainingDiverged(f"training diverged at epoch {epoch}, batch {batch}: parameter {k} holds NaN or inf "
                                   "after the update (lower the learning rate or beta)")


def batch_estimate(net, xb, yb, cfg, rng) -> Estimate:
    """The gradient estimate of one batch by ``cfg.estimator`` (Eqs. 4.1-4.3, 5.4).

    The random sign of Eq. 4.3 is drawn from ``rng`` (the batch's generator, after augmentation);
    ``cfg.shards`` sub-batches settle in parallel threads (Eq. 4.7), at most one per sample.
    """
    sign = draw_sign(rng) if cfg.estimator == "random-sign" else None
    return estimate(cfg.estimator, net, xb, yb, beta=cfg.beta, T1=cfg.T1, T2=cfg.T2, sign=sign,
                    settling=cfg.settling, shards=min(cfg.shards, xb.shape[0]))


def train_step(net, xb, yb, cfg, rng, *, where=(0, 0)) -> Update:
    """The update of one batch: its gradient estimate, checked finite, and its per-layer |g|; pure.

    Parameters
    ----------
    net : CRNN.
    xb : (n, c, h, w) the batch, normalised (and augmented) on the net's backend; yb : (n,) labels.
    cfg : :class:`~pyeqprop.train.config.TrainConfig` (estimator, beta, T1, T2).
    rng : the batch's generator (the random sign).
    where : (epoch, batch), 1-based, named by a divergence error.

    Returns
    -------
    :class:`Update`. Raises :class:`~pyeqprop.train.errors.TrainingDiverged` naming the layer
    when a phase state is not finite. ``net.params`` is left as it was.
    """
    xp = net.xp
    est = batch_estimate(net, xb, yb, cfg, rng)
    check_phases_finite(net, est, where)
    mags = {layer.weight: xp.mean(xp.abs(est.grads[layer.weight])) for layer in net.layers}  # on device
    return Update(est, mags, response_sums(est) if has_response_pair(est) else None)


def step_metrics(net, upd: Update, xb, yb, *, skipped: bool = False, asymmetric: bool = False) -> StepMetrics:
    """The batch's loss, correct count, |g|, saturated counts (Eq. 3.19) and response asymmetry (Eq. 4.9)
    at the current parameters, in one host transfer (float64: exact for the float32 values and for the
    counts). ``skipped``: the update was not applied (Eq. 3.14 or 4.9); ``asymmetric``: for Eq. 4.9."""
    xp = net.xp
    est = upd.estimate
    term = net.readout_term
    st = est.free.state
    loss = xp.sum(term.value(net.params, st, term.prepare(net.params, xb, yb)))
    correct = xp.sum(xp.astype(xp.argmax(net.logits(st), axis=1) == yb, loss.dtype))
    keys = list(upd.grad_mean_abs)
    sat = [c for pair in saturated_counts(net, st) for c in pair]
    resp = [] if upd.response is None else [xp.reshape(upd.response, (-1,))]  # (L, 2) -> (2L,)
    host = to_numpy(xp.concat([xp.stack([xp.astype(v, xp.float64) for v in (loss, correct,
                                                                              *upd.grad_mean_abs.values(), *sat)]),
                               *[xp.astype(r, xp.float64) for r in resp]]))
    host = host.tolist()
    k = 2 + len(keys)
    sizes = [math.prod(s.shape) for s in st]
    saturated = {layer.name: (int(host[k + 2 * l]), int(host[k + 2 * l + 1]), sizes[l])
                 for l, layer in enumerate(net.layers)}
    tail = host[k + len(sat):]
    pairs = [tail[2 * l:2 * l + 2] for l in range(len(tail) // 2)]  # (2L,) -> L pairs of (4.9)'s sums
    asym = dict(zip([layer.name for layer in net.layers], asymmetry(pairs))) if pairs else {}
    return StepMetrics(host[0], int(host[1]), int(xb.shape[0]), est.free.residual,
                       max([0.0] + [ph.residual for ph in est.nudged]), dict(zip(keys, host[2:k])),
                       est.free.steps, [ph.steps for ph in est.nudged], int(est.free.converged is False),
                       sum(int(ph.converged is False) for ph in est.nudged), saturated, int(skipped),
                       int(asymmetric), asym, [int(est.info["cg_iterations"])] if "cg_iterations" in est.info else [],
                       int(est.info.get("solved") is False))
