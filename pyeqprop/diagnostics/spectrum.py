"""``pyeqprop diagnose --spectrum``: the spectral radius of the linearised settling step per network (Eq. 3.17).

For each network — the one the flags describe at its initialisation, or a run's initial
parameters (its config and seed) and its checkpoints — the free phase is settled on one
training batch, and ρ(J) of J = diag ρ'(u) · H at the settled state is estimated per sample by
:func:`pyeqprop.model.spectrum.step_radius`. Near 1 the settling slows (the residual shrinks
like ρ(J)^t) and EP, BPTT(T) and the equilibrium gradient part; far below 1 the input barely
reaches the top layers (SPEC Eq. 3.16). Nothing here is needed to train.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ._figure import new_figure

__all__ = ["SpectrumRow", "network_spectrum", "format_spectrum_table", "plot_spectrum", "run_spectrum_cli"]


@dataclass
class SpectrumRow:
    """One network: where it comes from, its epoch, the radius of Eq. (3.17) and how well it is known."""

    network: str
    epoch: int
    radius: float  # max over the batch's samples
    median: float
    iterations: int
    converged: bool
    free_residual: float  # r of the free phase the radius is taken at (Eq. 3.11)
    free_steps: int


def network_spectrum(net, x, *, T: int, settling=None, iterations: int = 500, tol: float = 1e-5,
                     name: str = "", epoch: int = 0) -> SpectrumRow:
    """ρ(J) of ``net`` at its free phase settled from zero on ``x`` (T steps, or to ``settling``'s tolerance)."""
    from ..learning.settle import FIXED, settle
    from ..model.spectrum import linearisation, step_radius

    free = settle(net, x, T, settling=settling or FIXED)
    slopes, idx = linearisation(net, x, free.state)
    est = step_radius(net, slopes, idx, iterations=iterations, tol=tol)
    return SpectrumRow(name, int(epoch), est.radius, est.median, est.iterations, est.converged,
                       float(free.residual), int(getattr(free, "steps", T)))


def format_spectrum_table(rows) -> str:
    """A plain-text table, one line per network."""
    head = ["network", "epoch", "ρ(J) max", "median", "power its", "free residual", "free steps"]
    body = [[r.network, str(r.epoch), f"{r.radius:.4f}", f"{r.median:.4f}",
             f"{r.iterations}{'' if r.converged else ' (not converged)'}", f"{r.free_residual:.1e}",
             str(r.free_steps)] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths)))
              for b in body]
    return "\n".join(lines)


def plot_spectrum(rows, path) -> str:
    """ρ(J) (max and median over the batch) against the epoch of each network; writes a PNG, returns ``str(path)``."""
    rows = sorted(rows, key=lambda r: r.epoch)
    fig, axes = new_figure("the spectrum", 1, 1, figsize=(5.5, 3.6))
    ax = axes[0] if isinstance(axes, (list, tuple, np.ndarray)) else axes
    ep = [r.epoch for r in rows]
    ax.plot(ep, [r.radius for r in rows], marker="o", label="max over the batch")
    ax.plot(ep, [r.median for r in rows], marker="s", label="median")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("epoch (0: initialisation)")
    ax.set_ylabel("spectral radius of J (Eq. 3.17)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    return str(path)


def _run_networks(path):
    """(config, [(name, epoch, params or None)]) of a run folder or checkpoint; None: the config's initial net."""
    from ..train.evaluate import run_checkpoints, student_checkpoint

    cfg, nets = None, []
    for f in run_checkpoints(path):
        ckpt, c = student_checkpoint(f)
        cfg = cfg or c
        nets.append((f.name, int(ckpt.epoch), ckpt.params))
    return cfg, [("initialisation", 0, None)] + nets


def run_spectrum_cli(ns) -> int:
    """``pyeqprop diagnose --spectrum [--run RUN]``: print the table of :func:`network_spectrum` (and plot it)."""
    from ..backend import asarray, default_backend_name, get_namespace

    rows = []
    if ns.run:
        from ..train.data import prepare_data
        from ..train.student import build_network

        cfg, nets = _run_networks(ns.run)
        xp = get_namespace(ns.backend or cfg.backend)
        cfg = dataclasses.replace(cfg, backend=ns.backend or cfg.backend)
        data = prepare_data(cfg, xp, training=False)
        n = min(ns.batch, data.x_train.shape[0])
        x = data.x_train[:n, ...]
        print(f"spectrum: run {ns.run} ({cfg.arch}, init {cfg.init}, feedback {cfg.feedback:g}), {data.name} "
              f"batch {n}, free phase T1 {cfg.T1}"
              + (f" to tolerance {cfg.settle_tol:g}" if cfg.settle_tol > 0 else ""))
        for name, epoch, params in nets:
            net = build_network(cfg, data.input_shape, data.num_classes, xp)
            if params is not None:
                for k in net.params:
                    net.params[k] = asarray(params[k], xp=xp, dtype=cfg.dtype)
            rows.append(network_spectrum(net, x, T=cfg.T1, settling=cfg.settling, name=name, epoch=epoch))
    else:
        from ..data.augment import normalize
        from ..model.crnn import CRNN
        from .signals import load_diagnose_data

        xp = get_namespace(ns.backend or default_backend_name())
        data = load_diagnose_data(ns)
        n = min(ns.batch, data.n_train)
        x = normalize(asarray(data.x_train[:n], xp=xp, dtype=ns.dtype), data.mean, data.std)
        radius = None if ns.init == "uniform" else ns.radius
        net = CRNN(ns.arch, data.input_shape, num_classes=data.num_classes, readout=ns.readout,
                   activation=ns.activation, dtype=ns.dtype, xp=xp, seed=ns.seed, weight_scale=ns.weight_scale,
                   init=ns.init, radius=radius, feedback=ns.feedback)
        print(f"spectrum: arch {ns.arch!r} = {net.arch.spec}, init {ns.init}"
              + (f" (radius {net.radius:g})" if radius is not None else f" (weight_scale {ns.weight_scale:g})")
              + (f", feedback {ns.feedback:g}" if ns.feedback != 1.0 else "")
              + f", {data.name} batch {n}, free phase T1 {ns.T1}")
        rows.append(network_spectrum(net, x, T=ns.T1, name="initialisation"))
    print(format_spectrum_table(rows))
    if ns.plot:
        print(f"plot written to {plot_spectrum(rows, ns.plot)}")
    return 0
