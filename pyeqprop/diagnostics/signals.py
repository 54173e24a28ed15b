"""Per-layer signal magnitudes of plain EP and of EP with intermediate signals (SPEC.md §6).

The question this answers: does the nudge of plain EP fade with depth before it reaches the
first layers, and how much do local errors and distillation (Eq. 6.1) change that?

For each setting (plain EP, EP + local errors, EP + distillation, EP + both; the four differ
only in ``local_layers`` / ``kd_layers``) the network is built by the same factory, so every
setting starts from the same network parameters, and one symmetric EP estimate (Eq. 4.2)
is formed from the same free state s^0 (the free phase, β = 0, does not depend on the cost
terms, so it is settled once and shared). Reported:

* per neuron layer l, the nudged displacement  D_l = mean |s^β_l − s̄^0_l|  over the batch and
  the layer's neurons, in the +β phase after T2 steps — how far the nudge moved layer l.
  s̄^0 is the free phase continued for the same T2 steps from s^0 with β = 0: when the free
  phase has converged, s̄^0 = s^0 and D_l = mean |s^β_l − s^0_l|; when it has not (a deep
  network with T1 = 30 is usually still moving), subtracting s^0 would measure the free
  dynamics' own drift, the same in every setting, and not the nudge. The drift
  mean |s̄^0_l − s^0_l| is reported beside it;
* per parameter tensor θ_k, the mean |g_k| of its symmetric EP estimate (Eq. 4.2).

In plain EP the nudge enters at the readout and reaches layer l only through the top-down
feedback T_l (Eq. 3.7), one layer per step and attenuated at each; local errors and
distillation nudge each selected layer directly by −β ∂C/∂s_l.

The heads and maps start from random parameters here (``init="uniform"``): a zero head, as
training starts it (SPEC §6, Eq. 3.10), exerts no force until it has learned to read its
layer, and would show nothing about how far its nudge reaches.

Nothing here is needed to train; the CLI's ``pyeqprop diagnose`` uses :func:`run_diagnose_cli`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ._figure import new_figure

from ..backend import DTYPES, to_numpy
from ..learning.signals import KD_NORMALISATIONS, LOCAL_LOSSES, SIGNAL_INITS, SignalConfig, attach_signals
from ..model.params import DEFAULT_RADIUS, NETWORK_INITS
from ..model.readout import READOUTS
from ..ops.activations import ACTIVATIONS

__all__ = ["SETTINGS", "DiagnoseRow", "ablation_settings", "diagnose", "format_diagnose_table", "plot_diagnose",
           "add_diagnose_arguments", "run_diagnose_cli"]

SETTINGS = ("EP", "EP+local", "EP+KD", "EP+local+KD")
"""The four settings, in the order of the table and the plot."""


def ablation_settings(base: SignalConfig | None = None, names=SETTINGS) -> dict:
    """The settings ``names`` (a subset of :data:`SETTINGS`) derived from ``base`` by changing only
    ``local_layers`` and ``kd_layers``: a setting without local errors gets ``local_layers="none"``,
    one without distillation ``kd_layers="none"``; every other field is ``base``'s.

    ``base`` (default: local errors and distillation on every conv layer with the weights of
    ``pyeqprop train``, λ = 0.5, γ = 1) must select layers for both signals and have
    ``output_kd_weight = 0``, so that "EP" is plain EP.
    """
    if base is None:
        base = SignalConfig(local_layers="all", local_weight=0.5, kd_layers="all", kd_weight=1.0, init="uniform")
    for what, layers in (("local_layers", base.local_layers), ("kd_layers", base.kd_layers)):
        if layers is None or (isinstance(layers, str) and layers.strip().lower() in ("none", "")) or (
                not isinstance(layers, str) and len(list(layers)) == 0):
            raise ValueError(f"the base setting must select {what} (it is {layers!r}); the ablations switch it off")
    if base.output_kd_weight != 0.0:
        raise ValueError("the base setting must have output_kd_weight = 0: the ablations change only local_layers "
                         f"and kd_layers, so plain EP would keep output distillation (got {base.output_kd_weight})")
    table = {"EP": replace(base, local_layers="none", kd_layers="none"),
             "EP+local": replace(base, kd_layers="none"),
             "EP+KD": replace(base, local_layers="none"),
             "EP+local+KD": replace(base)}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; valid: {', '.join(SETTINGS)}")
    return {n: table[n] for n in names}


@dataclass
class DiagnoseRow:
    """One setting: per-layer nudged displacement and per-tensor mean |EP gradient|."""

    setting: str
    layers: list  # neuron layer names, s_1 … s_L
    shapes: list  # their per-sample shapes
    displacement: list  # mean |s^β_l − s̄^0_l| per layer, +β phase (module docstring)
    drift: list  # mean |s̄^0_l − s^0_l| per layer: the free phase's own motion over T2 more steps
    grad: dict  # parameter name -> mean |g| (every parameter, heads and maps included)
    beta: float
    free_residual: float  # r_T1 of the shared free phase (Eq. 3.11)
    nudged_residual: float  # r_T2 of the +β phase
    network_params: list = field(default_factory=list)  # the parameters every setting shares, in order
    cosine_exact: dict = field(default_factory=dict)  # layer weight -> cos(g_EP, g*) with g* of Eq. 5.7


def _mean_abs(a) -> float:
    return float(np.mean(np.abs(np.asarray(to_numpy(a), dtype=np.float64))))


def _host_params(net) -> dict:
    return {k: np.asarray(to_numpy(v)) for k, v in net.params.items()}


def diagnose(net_factory, x, y, *, settings=SETTINGS, beta, T1, T2, teacher=None) -> list:
    """Nudged displacement per layer and mean |EP gradient| per tensor, for each setting.

    Parameters
    ----------
    net_factory : callable () -> CRNN, returning a fresh network with the same parameters on
        every call (e.g. a fixed ``seed``); signals are attached to each fresh copy.
    x : (n, c, h, w), y : (n,) on the network's backend and dtype.
    settings : names from :data:`SETTINGS` (built by :func:`ablation_settings`), or a mapping
        name -> :class:`~pyeqprop.learning.signals.SignalConfig`.
    beta, T1, T2 : nudge, free and nudged steps of one symmetric EP estimate (Eq. 4.2).
    teacher : a :class:`~pyeqprop.model.teacher.Teacher`; needed by the distillation settings.

    Returns
    -------
    list of :class:`DiagnoseRow`, one per setting, in the given order.
    """
    from ..learning.estimators import ep_estimate
    from ..learning.compare import cosine_and_ratio
    from ..learning.implicit import equilibrium_gradient
    from ..learning.settle import settle

    configs = dict(settings) if isinstance(settings, dict) else ablation_settings(names=tuple(settings))
    base = net_factory()
    base_params = _host_params(base)
    free = settle(base, x, T1)  # β = 0: independent of the cost terms, shared by every setting
    cont = settle(base, x, T2, state=free.state)  # s̄^0: the free phase continued for T2 steps
    drift = [_mean_abs(a - b) for a, b in zip(cont.state, free.state)]
    names = [layer.name for layer in base.layers]
    rows = []
    for name, cfg in configs.items():
        if cfg.needs_teacher() and teacher is None:
            raise ValueError(f"setting {name!r} uses distillation and needs a teacher")
        net = net_factory()
        for k, v in _host_params(net).items():
            if not np.array_equal(v, base_params[k]):
                raise ValueError(f"net_factory returned different parameters ({k}) on a second call; the settings "
                                 "must start from the same network (fix its seed)")
        attach_signals(net, cfg, teacher if cfg.needs_teacher() else None)
        res = ep_estimate(net, x, y, beta=beta, T1=T1, T2=T2, estimator="symmetric", free_state=free.state)
        plus = res.nudged[0]  # the +β phase
        disp = [_mean_abs(a - b) for a, b in zip(plus.state, cont.state)]
        exact = equilibrium_gradient(net, x, y, T1=T1, free_state=free.state).grads  # Eq. 5.7 at this s^0
        cosine = {layer.weight: cosine_and_ratio(res.grads[layer.weight], exact[layer.weight])[0]
                  for layer in net.layers}
        rows.append(DiagnoseRow(name, names, list(base.arch.state_shapes), disp, drift,
                                {k: _mean_abs(v) for k, v in res.grads.items()}, float(beta), free.residual,
                                plus.residual, list(base_params), cosine))
    return rows


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3e}"


def _block(title, head, body):
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths)))
    out = [title, line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(b, widths))) for b in body]
    return out


def format_diagnose_table(rows) -> str:
    """Two plain-text blocks: displacement per layer and mean |g| per network parameter tensor
    (one column per setting), then a line per setting with the residuals. Head and map
    parameters, which exist only in some settings, are in ``DiagnoseRow.grad`` but not shown."""
    rows = list(rows)
    if not rows:
        return "(no settings)"
    r0 = rows[0]
    settings = [r.setting for r in rows]
    body = [[name, "×".join(map(str, shp))] + [_fmt(r.displacement[l]) for r in rows] + [_fmt(r0.drift[l])]
            for l, (name, shp) in enumerate(zip(r0.layers, r0.shapes))]
    ratio = ["s_1 / s_L", ""] + [_fmt(r.displacement[0] / r.displacement[-1]) if r.displacement[-1] > 0 else "—"
                                 for r in rows] + [""]
    out = _block(f"nudged displacement mean|s^β − s̄^0| per neuron (+β phase, β = {r0.beta:g}; s̄^0: free phase "
                 "continued T2 steps, its drift from s^0 in the last column)",
                 ["layer", "shape"] + settings + ["free drift"], body + [ratio])
    shown = r0.network_params or [k for k in r0.grad if all(k in r.grad for r in rows)]
    body = [[k, ""] + [_fmt(r.grad.get(k)) for r in rows] for k in shown]
    out += [""] + _block("mean |EP gradient| per parameter tensor (symmetric EP)", ["tensor", ""] + settings, body)
    body = [[k, ""] + [_fmt(r.cosine_exact.get(k)) for r in rows] for k in shown if k in r0.cosine_exact]
    out += [""] + _block("cosine of the EP gradient with the equilibrium gradient (Eq. 5.7) of the same cost, at "
                         "the same free state (1: exact; meaningful only where the free phase has converged)",
                         ["tensor", ""] + settings, body)
    out += [""] + [f"{r.setting}: free residual {r.free_residual:.2e}, +β nudged residual {r.nudged_residual:.2e}"
                   for r in rows]
    return "\n".join(out)


def plot_diagnose(rows, path) -> str:
    """Two panels, layers on the x axis and a log y axis, one line per setting: the nudged
    displacement per layer, and the mean |g| of each layer's weight tensor. Writes a PNG to
    ``path``; returns ``str(path)``. Zero values are left out (they have no logarithm)."""
    rows = list(rows)
    fig, axes = new_figure('the diagnosis', 1, 2, figsize=(10.0, 3.8))
    r0 = rows[0] if rows else None
    layers = r0.layers if r0 else []
    xs = np.arange(1, len(layers) + 1)
    for r in rows:
        d = np.array(r.displacement, dtype=np.float64)
        axes[0].plot(xs, np.where(d > 0, d, np.nan), marker="o", label=r.setting)
        g = np.array([r.grad.get(f"{name}.weight", np.nan) for name in layers], dtype=np.float64)
        axes[1].plot(xs, np.where(g > 0, g, np.nan), marker="o", label=r.setting)
    titles = (f"nudged displacement mean|s^β − s̄^0| (β = {r0.beta:g})" if r0 else "nudged displacement",
              "mean |EP gradient| of the layer's weights")
    for ax, title in zip(axes, titles):
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels(layers, rotation=45, fontsize="small")
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize="medium")
    if rows:
        axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=90)
    return str(path)


# --------------------------------------------------------------------------- command line
def add_diagnose_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``diagnose`` options to ``parser`` and return it."""
    parser.add_argument("--arch", default="vgg11/8", help="spec string or preset (default: vgg11/8)")
    parser.add_argument("--dataset", default="mnist5k",
                        help="data set of the batch and of the teacher's training (default mnist5k, 28×28; "
                             "falls back to synthetic when its package is missing). Deep VGG presets need "
                             "large inputs: digits (8×8) leaves room for only three pools")
    parser.add_argument("--input-shape", default="1,32,32", help="c,h,w of the synthetic data set (default 1,32,32)")
    parser.add_argument("--num-classes", type=int, default=10, help="classes of the synthetic data set")
    parser.add_argument("--batch", type=int, default=32, help="samples in the diagnosed batch (default 32)")
    parser.add_argument("--beta", type=float, default=0.5, help="nudge β (default 0.5)")
    parser.add_argument("--T1", type=int, default=30, help="free steps (default 30)")
    parser.add_argument("--T2", type=int, default=10, help="nudged steps (default 10)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the network, teacher and data split")
    parser.add_argument("--readout", choices=tuple(READOUTS), default="softmax")
    parser.add_argument("--activation", choices=tuple(ACTIVATIONS), default="hard_sigmoid")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--backend", default=None, help="array backend (default: $PYEQPROP_BACKEND, else numpy)")
    parser.add_argument("--weight-scale", type=float, default=1.0, help="init uniform: the weight range factor "
                                                                         "(Eq. 3.10)")
    parser.add_argument("--init", choices=NETWORK_INITS, default="uniform",
                        help="the network's initialisation (Eqs. 3.10, 3.16; default uniform)")
    parser.add_argument("--radius", type=float, default=DEFAULT_RADIUS,
                        help=f"with an orthogonal init: the spectral radius it is calibrated to (Eq. 3.16; default "
                             f"{DEFAULT_RADIUS})")
    parser.add_argument("--feedback", type=float, default=1.0,
                        help="feedback gain ω of the top-down term (Eq. 3.18; default 1, the plain network)")
    parser.add_argument("--spectrum", action="store_true",
                        help="instead of the signal table: the spectral radius of the linearised settling step "
                             "(Eq. 3.17) at the free phase of one batch, per network")
    parser.add_argument("--run", default=None, metavar="RUN_OR_CHECKPOINT",
                        help="with --spectrum: the networks of a run (its initialisation, best.npz, latest.npz) "
                             "on its own data set and settling, instead of the network the flags describe")
    parser.add_argument("--local-weight", type=float, default=0.5, help="λ of the local errors (default 0.5)")
    parser.add_argument("--kd-weight", type=float, default=1.0, help="γ of the distillation (default 1)")
    parser.add_argument("--local-grid", type=int, default=2)
    parser.add_argument("--local-loss", choices=LOCAL_LOSSES, default="ce")
    parser.add_argument("--kd-normalisation", choices=KD_NORMALISATIONS, default="mean")
    parser.add_argument("--signal-init", choices=SIGNAL_INITS, default="uniform",
                        help="how the heads and maps start (default uniform: random heads show how far a signal "
                             "reaches; training starts them at zero, where they are silent until they have learned)")
    parser.add_argument("--teacher-epochs", type=int, default=2,
                        help="backprop epochs of the teacher on the training split before distilling (default 2; "
                             "0 keeps its random initialisation)")
    parser.add_argument("--teacher-samples", type=int, default=1000,
                        help="training samples the teacher sees per epoch (default 1000; 0: all)")
    parser.add_argument("--teacher-lr", type=float, default=0.05)
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help=f"comma list of settings (default: {','.join(SETTINGS)})")
    parser.add_argument("--plot", default=None, metavar="PATH", help="write the per-layer plot (PNG)")
    return parser


def load_diagnose_data(ns):
    """The data set of ``diagnose``'s flags (``--dataset``; synthetic when asked for or when its package is missing)."""
    from ..data import load_dataset

    name = str(ns.dataset)
    if name.lower().replace("-", "").replace("_", "") == "synthetic":
        return _synthetic(ns)
    try:
        return load_dataset(name, seed=ns.seed)
    except ImportError as exc:
        print(f"note: data set {name!r} is not available ({exc}); using synthetic data instead")
        return _synthetic(ns)


def _synthetic(ns):
    from ..data import load_dataset

    try:
        shape = tuple(int(v) for v in str(ns.input_shape).split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3:
        raise ValueError(f"--input-shape must be three integers c,h,w, got {ns.input_shape!r}")
    return load_dataset("synthetic", seed=ns.seed, input_shape=shape, num_classes=ns.num_classes,
                        size=max(4 * ns.batch, 512))


def run_diagnose_cli(ns) -> int:
    """``pyeqprop diagnose``: train the teacher briefly, run :func:`diagnose` on one training batch,
    print the table (and write the plot). Returns 0."""
    from ..backend import asarray, default_backend_name, get_namespace
    from ..data.augment import normalize
    from ..model.crnn import CRNN
    from ..model.teacher import Teacher

    if getattr(ns, "spectrum", False):
        from .spectrum import run_spectrum_cli

        return run_spectrum_cli(ns)
    if getattr(ns, "run", None):
        raise ValueError(f"--run {ns.run!r} needs --spectrum (the signal table diagnoses the network the flags "
                         "describe)")
    names = tuple(s.strip() for s in str(ns.settings).split(",") if s.strip())
    base = SignalConfig(local_layers="all", local_weight=ns.local_weight, local_grid=ns.local_grid,
                        local_loss=ns.local_loss, kd_layers="all", kd_weight=ns.kd_weight,
                        kd_normalisation=ns.kd_normalisation, init=ns.signal_init)
    configs = ablation_settings(base, names)  # a ValueError naming the unknown settings: exit 2 in the CLI
    t0 = time.perf_counter()
    xp = get_namespace(ns.backend or default_backend_name())
    data = load_diagnose_data(ns)
    shape, K = data.input_shape, data.num_classes

    def on_device(a, dtype=None):
        return asarray(a, xp=xp, dtype=dtype)

    x_train = normalize(on_device(data.x_train, ns.dtype), data.mean, data.std)
    y_train = on_device(data.y_train)

    def make():
        return CRNN(ns.arch, shape, num_classes=K, readout=ns.readout, activation=ns.activation, dtype=ns.dtype,
                    xp=xp, seed=ns.seed, weight_scale=ns.weight_scale, init=ns.init,
                    radius=None if ns.init == "uniform" else ns.radius, feedback=ns.feedback)

    probe = make()
    teacher = None
    teacher_note = "not needed"
    if any(c.needs_teacher() for c in configs.values()):
        from ..train.teacher import train_teacher

        teacher = Teacher(ns.arch, shape, num_classes=K, activation=ns.activation, dtype=ns.dtype, xp=xp,
                          seed=ns.seed + 1)
        m = data.n_train if ns.teacher_samples <= 0 else min(ns.teacher_samples, data.n_train)
        if ns.teacher_epochs > 0:
            train_teacher(teacher, x_train[:m, ...], y_train[:m], epochs=ns.teacher_epochs, lr=ns.teacher_lr,
                          batch_size=32, seed=ns.seed, log=None)
        x_test = normalize(on_device(data.x_test[:1000], ns.dtype), data.mean, data.std)
        acc = teacher.accuracy(x_test, on_device(data.y_test[:1000]))
        teacher_note = (f"trained {ns.teacher_epochs} epoch(s) on {m} samples, test accuracy {100 * acc:.1f}%"
                        if ns.teacher_epochs > 0 else f"random initialisation, test accuracy {100 * acc:.1f}%")
        if acc < 1.5 / K:
            teacher_note += (" — near chance: the distillation targets carry little class information "
                             "(raise --teacher-epochs / --teacher-samples)")
    n = min(ns.batch, data.n_train)
    x, y = x_train[:n, ...], y_train[:n]
    print(f"diagnose: arch {ns.arch!r} = {probe.arch.spec} on {data.name} {shape} ({len(probe.layers)} neuron layers), "
          f"readout {ns.readout}, {ns.activation}, {ns.dtype}, batch {n}, beta {ns.beta:g}, T1 {ns.T1}, T2 {ns.T2}")
    print(f"signals: local λ = {ns.local_weight:g} ({ns.local_loss}, grid {ns.local_grid}) and distillation "
          f"γ = {ns.kd_weight:g} ({ns.kd_normalisation}) on every conv layer; teacher: {teacher_note}")
    rows = diagnose(make, x, y, settings=configs, beta=ns.beta, T1=ns.T1, T2=ns.T2, teacher=teacher)
    print(format_diagnose_table(rows))
    if ns.plot:
        print(f"plot written to {plot_diagnose(rows, ns.plot)}")
    print(f"({time.perf_counter() - t0:.1f}s)")
    return 0
