"""``pyeqprop study depth``: does plain EP fail on a deep CRNN, and do intermediate signals fix it?

For a shallow and a deep architecture, and for each seed, it trains with the same data and
budget: EP (symmetric), EP + local errors, EP + distillation, EP + both, BPTT (the exact
gradient of the same dynamics, Eqs. 5.1-5.4) and the backprop teacher (a feed-forward network
of the same architecture, Eq. 7.3). Three more settings try other distillation designs against
EP + distillation on every conv layer: ``ep+kd-lower`` (the lower half of the conv layers only,
Eq. 6.1), ``ep+kd-cosine`` (γ decayed over the run, Eq. 6.8) and ``ep+kd-std`` (standardised
targets, Eq. 6.9). It writes, into the study folder:

    results.json / results.md   final train loss, validation loss and accuracy, test accuracy, epochs, wall time
                                (per seed, and mean ± sample std over the seeds), and each
                                setting's paired difference to the exact gradient (same seed)
    curves.png                  training loss per epoch, every setting, depth and seed
    layer_grads.png             mean |gradient| per conv layer in the first epoch, per setting
    layer_grads_epochs.png      mean |gradient| of each conv layer against the epoch, per setting
    runs/<depth>-s<seed>-<setting>/   each run's own folder (config, metrics, checkpoints)

The per-layer gradient magnitudes are those of every batch's estimate, averaged over the
batches of the first epoch and over the seeds: how far down each setting's learning signal
reaches at the start of training. A batch whose update was skipped (Eqs. 3.14, 4.9) counts
too, so a skipped jump shows as a spike: EP + distillation, seed 0, epoch 3 of
``docs/results/depth-b005-asym`` has conv1's mean at 7.1 against 0.045 and 0.031 in epochs 2
and 4 (an applied update of that size would have wrecked a run that ended at 96.4 %). (Not at
the very first batch: heads and maps start at zero, SPEC §6, and carry no signal until they have
learned to read their layer.)

SIGTERM or Ctrl-C stops a study cleanly: every running run stops at its next batch and saves its
latest.npz, and no further run starts (:mod:`pyeqprop.study.workers`; the exit status is 128 + the
signal's number). The same command with ``--resume`` continues it: teachers and finished runs are
read back, stopped runs go on from their checkpoint, and a run started with other flags is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import time
from pathlib import Path

import numpy as np

from ..learning.signals import SIGNAL_INITS

__all__ = ["SETTINGS", "run_depth_study", "run_study_cli", "build_study_parser", "conv_gradient_curve", "summarise"]

# setting -> overrides of TrainConfig
SETTINGS = {
    "ep": {"local_layers": "none", "kd_layers": "none"},
    "ep+local": {"local_layers": "all", "kd_layers": "none"},
    "ep+kd": {"local_layers": "none", "kd_layers": "all"},
    "ep+local+kd": {"local_layers": "all", "kd_layers": "all"},
    # the distillation designs of SPEC (6.1), (6.8), (6.9), each against ep+kd
    "ep+kd-lower": {"local_layers": "none", "kd_layers": "lower"},
    "ep+kd-cosine": {"local_layers": "none", "kd_layers": "all", "kd_schedule": "cosine"},
    "ep+kd-std": {"local_layers": "none", "kd_layers": "all", "kd_targets": "standardised"},
    "implicit": {"local_layers": "none", "kd_layers": "none", "estimator": "implicit", "asymmetry_limit": 0.0},
    "bptt": {"local_layers": "none", "kd_layers": "none", "estimator": "bptt", "settle_tol": 0.0,
             "asymmetry_limit": 0.0},
}  # the exact gradients have no nudged phase to compare (Eq. 4.9)
EXACT = ("implicit", "bptt")
"""The settings that apply an exact gradient (Eqs. 5.7, 5.4): the reference of the paired differences."""
DEFAULT_SETTINGS = ("ep", "ep+local", "ep+kd", "ep+local+kd", "implicit")

DEFAULT_ARCHS = {
    "digits": {"shallow": "c16m-c32m", "deep": "c8-c8-c16m-c16-c16-c32m-c32-c32"},
    "mnist5k": {"shallow": "c32m-c64m", "deep": "c16-c16m-c32-c32m-c64-c64-c64-c64"},
}


def conv_gradient_curve(history, conv_names, epoch: int = 0):
    """Mean |∂/∂W_l| of each conv layer, averaged over the batches of epoch ``epoch`` (0-based).

    ``history`` is a run's per-epoch rows (``grad_mean_abs``, recorded by the training loop
    from every batch's estimate, applied or skipped: Eq. 4.2 for EP, Eq. 5.4 for BPTT).
    """
    mags = history[epoch]["grad_mean_abs"]
    return [mags[f"{k}.weight"] for k in conv_names]


def _cos_ratio(net, g_a, g_b):
    """Per conv layer weight: the cosine and norm ratio ‖g_a‖/‖g_b‖ of two gradients (host float64); the
    cosine is 0 where an estimate is exactly zero (the GDU delay of Eq. 4.5)."""
    from ..learning.compare import cosine_and_ratio

    pairs = [cosine_and_ratio(g_a[layer.weight], g_b[layer.weight], undefined=0.0)
             for layer in net.layers if layer.kind == "conv"]
    return [c for c, _ in pairs], [r for _, r in pairs]


def ep_bptt_agreement(cfg, data, xp, *, batch=64):
    """Plain EP's estimate (Eq. 4.2) against BPTT's gradient (Eq. 5.4) and the equilibrium gradient
    (Eq. 5.7), per conv layer, at initialisation.

    On the first ``batch`` training samples, for each conv layer's weight W_l: the cosine
    ⟨g_EP, g_ref⟩/(‖g_EP‖‖g_ref‖) and the norm ratio ‖g_EP‖/‖g_ref‖. As β → 0 at a fixed
    point both tend to 1 (Eq. 4.4); a ratio ≪ 1 at the bottom layers is the vanishing signal,
    a cosine well below 1 the estimate's error where the free phase has not converged. BPTT runs
    T1 steps of the run's own schedule (Eq. 5.6 for Gauss–Seidel): a deep net can have several
    fixed points, and the synchronous schedule from zero may settle at another one than the run's.
    The equilibrium gradient is taken at the free phase settled to 1e-5 (at most 1000 steps of the
    run's schedule); ``exact_converged`` says whether it got there (else it is no fixed point's).
    """
    from ..learning.bptt import bptt
    from ..learning.estimators import ep_estimate
    from ..learning.implicit import equilibrium_gradient
    from ..learning.settle import Settling
    from ..train.student import build_student

    c = dataclasses.replace(cfg, **SETTINGS["ep"])
    net = build_student(c, data.input_shape, data.num_classes, xp)
    xb, yb = data.x_train[:batch, ...], data.y_train[:batch]
    g_bptt = bptt(net, xb, yb, T=c.T1, schedule=c.schedule).grads
    g_ep = ep_estimate(net, xb, yb, beta=c.beta, T1=c.T1, T2=c.T2, estimator=c.estimator,
                       settling=c.settling).grads
    exact = equilibrium_gradient(net, xb, yb, T1=1000, settling=Settling(c.schedule, tol=1e-5))
    cos, ratio = _cos_ratio(net, g_ep, g_bptt)
    cos_x, ratio_x = _cos_ratio(net, g_ep, exact.grads)
    return {"cos": cos, "ratio": ratio, "cos_exact": cos_x, "ratio_exact": ratio_x,
            "exact_converged": bool(exact.free.converged and exact.solved)}


def _mean_std(values):
    v = np.asarray(values, dtype=float)
    return float(np.mean(v)), float(np.std(v, ddof=1)) if v.size > 1 else 0.0


def summarise(rows):
    """One line per (depth, setting): mean and sample standard deviation over the seeds."""
    out, order = {}, []
    for r in rows:
        key = (r["depth"], r["setting"])
        if key not in out:
            out[key] = []
            order.append(key)
        out[key].append(r)
    summary = []
    for key in order:
        group = out[key]
        loss_m, loss_s = _mean_std([r["train_loss"] for r in group])
        acc_m, acc_s = _mean_std([r["test_acc"] for r in group])
        val_m, val_s = _mean_std([r.get("val_acc", float("nan")) for r in group])
        vloss_m, vloss_s = _mean_std([r.get("val_loss", float("nan")) for r in group])
        summary.append({"depth": key[0], "arch": group[0]["arch"], "setting": key[1], "seeds": len(group),
                        "train_loss": loss_m, "train_loss_std": loss_s, "test_acc": acc_m, "test_acc_std": acc_s,
                        "val_acc": val_m, "val_acc_std": val_s, "val_loss": vloss_m, "val_loss_std": vloss_s,
                        "epochs": group[0]["epochs"], "seconds": float(np.mean([r["seconds"] for r in group]))})
    return summary


def paired_differences(rows):
    """Per (depth, setting): the mean and sample std over seeds of (setting − exact) in test accuracy and
    final train loss, each seed against the exact-gradient run of the same seed (the first of
    :data:`EXACT` the study ran); seeds without both runs are left out."""
    by = {(r["depth"], r["setting"], r["seed"]): r for r in rows}
    out = []
    for depth in dict.fromkeys(r["depth"] for r in rows):
        names = list(dict.fromkeys(r["setting"] for r in rows if r["depth"] == depth))
        ref = next((e for e in EXACT if e in names), None)
        if ref is None:
            continue
        for name in names:
            if name == ref:
                continue
            pairs = [(r, by[(depth, ref, r["seed"])]) for r in rows
                     if (r["depth"], r["setting"]) == (depth, name) and (depth, ref, r["seed"]) in by]
            if not pairs:
                continue
            acc_m, acc_s = _mean_std([a["test_acc"] - b["test_acc"] for a, b in pairs])
            loss = [a["train_loss"] - b["train_loss"] for a, b in pairs]
            loss_m, loss_s = _mean_std(loss)
            out.append({"depth": depth, "setting": name, "reference": ref, "seeds": len(pairs),
                        "test_acc_diff": acc_m, "test_acc_diff_std": acc_s,
                        "train_loss_diff": loss_m, "train_loss_diff_std": loss_s,
                        "train_loss_higher": sum(v > 0 for v in loss)})
    return out


def _markdown(head, body) -> str:
    """A markdown table: the header cells, then one list of cells per row."""
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])


def _paired_table(paired) -> str:
    head = ["depth", "setting", "minus", "seeds", "Δ test accuracy (points)", "Δ final train loss",
            "train loss higher on"]
    return _markdown(head, [[r["depth"], r["setting"], r["reference"], str(r["seeds"]),
                             _pm(100 * r["test_acc_diff"], 100 * r["test_acc_diff_std"], r["seeds"], "{:+.1f}"),
                             _pm(r["train_loss_diff"], r["train_loss_diff_std"], r["seeds"], "{:+.3f}"),
                             f"{r.get('train_loss_higher', '–')} of {r['seeds']} seeds"] for r in paired])


def _plot_layer_epochs(study: Path, rows):
    """layer_grads_epochs.png: one row per depth, one panel per setting: mean |∂/∂W_l| of each conv layer
    against the epoch (mean over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys((r["depth"], r["setting"]) for r in rows if r.get("layer_grads")))
    if not keys:
        return
    depths = list(dict.fromkeys(d for d, _ in keys))
    names = list(dict.fromkeys(n for _, n in keys))
    fig = Figure(figsize=(3.2 * len(names), 2.8 * len(depths)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(depths), len(names), squeeze=False)
    for i, depth in enumerate(depths):
        for j, name in enumerate(names):
            ax = axes[i][j]
            runs = [np.asarray(r["layer_grads"]) for r in rows
                    if (r["depth"], r["setting"]) == (depth, name) and r.get("layer_grads")]
            if not runs:
                ax.set_visible(False)
                continue
            mean = np.mean(np.stack(runs), axis=0)  # (epochs, conv layers)
            for l in range(mean.shape[1]):
                ax.plot(range(1, mean.shape[0] + 1), mean[:, l], color=f"C{l}", label=f"conv{l + 1}")
            ax.set_yscale("log")
            ax.set_title(f"{depth}: {name}", fontsize=9)
            if i == len(depths) - 1:
                ax.set_xlabel("epoch")
        axes[i][0].set_ylabel("mean |gradient|")
        axes[i][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(study / "layer_grads_epochs.png", dpi=90)


def _plot(study: Path, rows, grads):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return

    def subplots(n):
        fig = Figure(figsize=(5 * n, 3.6))
        FigureCanvasAgg(fig)
        return fig, fig.subplots(1, n, squeeze=False)

    depths = sorted({r["depth"] for r in rows}, key=lambda d: d != "shallow")
    fig, axes = subplots(len(depths))
    for ax, depth in zip(axes[0], depths):
        for i, name in enumerate(dict.fromkeys(r["setting"] for r in rows if r["depth"] == depth and r["curve"])):
            curves = [r["curve"] for r in rows if r["depth"] == depth and r["setting"] == name]
            for j, c in enumerate(curves):  # one line per seed, one colour per setting
                ax.plot(range(1, len(c) + 1), c, color=f"C{i}", alpha=0.8, label=name if j == 0 else None)
        ax.set_title(f"{depth}: training loss per epoch (one line per seed)")
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(study / "curves.png", dpi=100)
    fig, axes = subplots(len(depths))
    for ax, depth in zip(axes[0], depths):
        for name, mags in grads[depth].items():
            ax.plot(range(1, len(mags) + 1), mags, marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("conv layer")
        ax.set_ylabel("mean |gradient|, first epoch")
        ax.set_title(depth)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(study / "layer_grads.png", dpi=100)
    _plot_layer_epochs(study, rows)


def _pm(mean, std, seeds, fmt):
    if math.isnan(mean):
        return "–"
    return fmt.format(mean) + (" ± " + fmt.replace("+", "").format(abs(std)) if seeds > 1 else "")


def _table(summary) -> str:
    head = ["depth", "arch", "setting", "seeds", "final train loss", "val loss", "val accuracy (%)",
            "test accuracy (%)", "epochs", "wall time (s)"]
    return _markdown(head, [[r["depth"], f"`{r['arch']}`", r["setting"], str(r["seeds"]),
                             _pm(r["train_loss"], r["train_loss_std"], r["seeds"], "{:.3f}"),
                             _pm(r.get("val_loss", float("nan")), r.get("val_loss_std", 0.0), r["seeds"], "{:.3f}"),
                             _pm(100 * r["val_acc"], 100 * r["val_acc_std"], r["seeds"], "{:.1f}"),
                             _pm(100 * r["test_acc"], 100 * r["test_acc_std"], r["seeds"], "{:.1f}"),
                             str(r["epochs"]), f"{r['seconds']:.0f}"] for r in summary])


def _number(v) -> float:
    """A metrics value as a float; NaN for None (no validation split)."""
    return float("nan") if v is None else float(v)


def _train_setting(job, log=print):
    """Train one (depth, seed, setting) run; returns its table row (``layer_grads``: the conv gradients of every
    epoch), or a :class:`~pyeqprop.study.workers.Stopped` when a signal stopped it. Each epoch's line of the
    run goes to ``log``, tagged with the run (in a worker: printed, to the study's own stdout).

    ``job`` is (config, depth, setting, resume). With ``resume`` a run folder that holds a run goes on
    from its latest.npz (a finished one is only read back; :func:`_check_resumable` has checked it was
    started with this configuration). The row's ``seconds`` is then the sum of its epochs' training
    times, over every invocation that trained it (``resumed``: true); otherwise this invocation's wall time.
    """
    import signal

    from ..train.loop import train
    from ..train.runfolder import has_run
    from .workers import Stopped

    cfg, depth, name, resume = job
    run = Path(cfg.out)
    again = resume and has_run(run)
    tag = f"[{depth}, seed {cfg.seed}] {name}:"

    def epoch_line(msg):  # the loop's per-epoch line (train.loop._epoch_line); its other messages are dropped
        if msg.lstrip().startswith("epoch"):
            log(f"{tag} {msg.strip()}")

    res = train(cfg, resume=run if again else None, log=epoch_line)
    if res.interrupted:
        return Stopped(str(run), int(res.signal or signal.SIGINT))
    hist = res.history
    convs = [k[:-len(".weight")] for k in hist[0]["grad_mean_abs"] if k.startswith("conv")]
    row = {"depth": depth, "arch": cfg.arch, "seed": cfg.seed, "setting": name,
           "train_loss": hist[-1]["train_loss"] if hist else float("nan"), "test_acc": res.test_acc,
           "val_acc": _number(hist[-1].get("val_acc")) if hist else float("nan"),
           "val_loss": _number(hist[-1].get("val_loss")) if hist else float("nan"),
           "epochs": len(hist), "seconds": sum(h["seconds"] for h in hist) if again else res.seconds,
           "resumed": bool(again), "curve": [h["train_loss"] for h in hist],
           "layer_grads": [conv_gradient_curve(hist, convs, e) for e in range(len(hist))]}
    return row


def _check_resumable(job) -> None:
    """:class:`~pyeqprop.train.errors.TrainingError` when ``job`` resumes a run folder started with another
    configuration (a study resumed with other flags would mix two studies in one table)."""
    from ..train.errors import TrainingError
    from ..train.runfolder import changed_keys, recorded_config

    cfg, _, _, resume = job
    run = Path(cfg.out)
    if not (resume and (run / "config.toml").exists()):
        return
    was = recorded_config(run)
    changed = changed_keys(cfg, was)
    if changed:
        raise TrainingError(f"cannot resume the study: {run} was started with "
                            + ", ".join(f"{k} = {getattr(was, k)!r}" for k in changed) + ", the study now asks for "
                            + ", ".join(f"{k} = {v!r}" for k, v in changed.items())
                            + "; resume with the flags it was started with, or choose another --out")


def _run_jobs(todo, jobs, log):
    """Train every job of ``todo`` (config, depth, setting, resume) with :func:`_train_setting`, ``jobs`` at a
    time (:func:`~pyeqprop.study.workers.run_jobs`: a signal stops every run cleanly); rows in ``todo``'s order.
    Every resumed run is checked first (:func:`_check_resumable`), so a mismatch starts nothing."""
    from .workers import run_jobs

    for job in todo:
        _check_resumable(job)

    def done(row):
        log(f"[{row['depth']}, seed {row['seed']}] {row['setting']}: train loss {row['train_loss']:.4f}, "
            f"test {100 * row['test_acc']:.2f}%, {row['seconds']:.0f}s; first-epoch mean |grad| per conv layer "
            + " ".join(f"{v:.1e}" for v in row["layer_grads"][0]))

    def begin(job):
        cfg, depth, name, _ = job
        log(f"[{depth}, seed {cfg.seed}] {name}: training {cfg.arch} for {cfg.epochs} epochs")

    fn = _train_setting if jobs > 1 else functools.partial(_train_setting, log=log)  # workers print
    return run_jobs(fn, todo, jobs, begin=begin, done=done, log=log)


def choose_rates(tuning):
    """Per (depth, setting), the (rate, bottom factor) of the tuning run with the best final validation
    accuracy (ties: the lower final training loss, then the smaller rate, then the smaller factor).
    ``tuning``: rows with ``lr`` and ``lr_bottom``."""
    best = {}
    for r in tuning:
        key = (r["depth"], r["setting"])
        rank = (-r["val_acc"], r["train_loss"], r["lr"], r.get("lr_bottom", 1.0))
        if key not in best or rank < best[key][0]:
            best[key] = (rank, (r["lr"], r.get("lr_bottom", 1.0)))
    return {key: choice for key, (_, choice) in best.items()}


def layer_rates(cfg, input_shape, num_classes, rate: float, bottom: float, bottom_layers: int) -> list[float]:
    """One rate per layer (Eq. 8.3: the neuron layers, then a softmax readout): ``rate`` everywhere, times
    ``bottom`` on the first ``bottom_layers`` conv layers; [rate] when ``bottom`` is 1."""
    from ..model.arch import ConvLayer, parse_arch

    if bottom == 1.0:
        return [float(rate)]
    arch = parse_arch(cfg.arch, input_shape, num_classes, cfg.readout)
    rates, convs = [], 0
    for layer in arch.layers:
        convs += isinstance(layer, ConvLayer)
        rates.append(float(rate) * (bottom if isinstance(layer, ConvLayer) and convs <= bottom_layers else 1.0))
    return rates + ([float(rate)] if arch.readout is not None else [])


def run_depth_study(base, *, out, depths, settings=tuple(SETTINGS), seeds=(0,), jobs=1, lr_grid=None,
                    lr_bottom=(1.0,), bottom_layers=2, resume=False, log=print):
    """Train every (depth, seed, setting) of the study from TrainConfig ``base``; returns the summary.

    Teachers are trained first, in this process; the student runs then go to ``jobs`` worker
    processes (1: in this process). With ``lr_grid`` (rates), each (depth, setting) first trains on
    the first seed once per rate and per factor of ``lr_bottom`` (applied to the rates of the first
    ``bottom_layers`` conv layers, :func:`layer_rates`), and every seed then uses the pair with the
    best validation accuracy (:func:`choose_rates`; the first seed's run at that pair is the tuning
    run itself): the test split is never looked at to choose. Rows keep the order depth, seed, setting whatever the
    order the runs finish in. Writes results.json (per-seed ``rows``, the per-setting ``summary``
    over seeds, the ``paired`` differences to the exact gradient, first-epoch ``layer_grads``
    averaged over seeds, the ``tuning`` runs and ``chosen_lr``, the configuration and the
    :func:`environment`), results.md,
    curves.png, layer_grads.png and layer_grads_epochs.png into ``out``.

    A signal stops it cleanly (:mod:`pyeqprop.study.workers`, :class:`~pyeqprop.study.workers.StudyStopped`);
    ``resume`` then continues it in the same ``out``: each teacher saved there is loaded, each finished run
    read back, each stopped one continued from its latest.npz. Without ``resume`` an ``out`` that already
    holds runs is refused before anything is trained (a teacher found there would otherwise be reused
    silently, and the first run would fail on its folder mid-study).
    """
    from ..backend import get_namespace
    from ..train.data import prepare_data
    from ..train.teacher import get_teacher

    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    study = Path(out)
    if not resume:
        _check_fresh_study(study)
    (study / "runs").mkdir(parents=True, exist_ok=True)
    xp = get_namespace(base.backend)
    rows, plan, agreement, shapes = [], [], {}, {}
    for depth, arch in depths.items():
        per_seed = []
        for seed in seeds:
            cfg = dataclasses.replace(base, arch=arch, seed=seed)
            data = prepare_data(cfg, xp)
            shapes[depth] = (data.input_shape, data.num_classes)  # for the per-layer rates
            tag = f"{depth}-s{seed}"
            tdir = study / "runs" / f"{tag}-teacher"
            tdir.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            teacher = get_teacher(cfg, data, xp, tdir, log)
            rows.append({"depth": depth, "arch": arch, "seed": seed, "setting": "teacher (backprop, feed-forward)",
                         "train_loss": float(teacher.loss(data.x_train, data.y_train)),
                         "test_acc": float(teacher.accuracy(data.x_test, data.y_test)),
                         "epochs": cfg.teacher_epochs, "seconds": time.perf_counter() - t0, "curve": []})
            per_seed.append(ep_bptt_agreement(cfg, data, xp))
            for name in settings:
                plan.append((len(rows), dataclasses.replace(cfg, out=str(study / "runs" / f"{tag}-{name}"),
                                                            teacher=str(tdir / "teacher.npz"), **SETTINGS[name]),
                             depth, name))
                rows.append(None)  # filled in when the run is done
        agreement[depth] = {k: np.mean([a[k] for a in per_seed], axis=0).tolist()
                            for k in ("cos", "ratio", "cos_exact", "ratio_exact")}
        agreement[depth]["exact_converged"] = all(a["exact_converged"] for a in per_seed)
        log(f"[{depth}] plain EP against BPTT at init, per conv layer (mean over seeds): cosine "
            + " ".join(f"{v:+.2f}" for v in agreement[depth]["cos"]) + "; norm ratio "
            + " ".join(f"{v:.2f}" for v in agreement[depth]["ratio"]))
        log(f"[{depth}] against the equilibrium gradient (Eq. 5.7"
            + ("" if agreement[depth]["exact_converged"] else "; free phase NOT converged to 1e-5") + "): cosine "
            + " ".join(f"{v:+.2f}" for v in agreement[depth]["cos_exact"]) + "; norm ratio "
            + " ".join(f"{v:.2f}" for v in agreement[depth]["ratio_exact"]))
    tuning, chosen, done = [], {}, {}

    def rated(cfg, depth, rate, bottom):
        return dataclasses.replace(cfg, lr=layer_rates(cfg, *shapes[depth], rate, bottom, bottom_layers))

    if lr_grid:
        first = [(cfg, depth, name) for _, cfg, depth, name in plan if cfg.seed == seeds[0]]
        def tune_dir(cfg, lr, f):
            tag = f"{Path(cfg.out).name}-lr{lr:g}" + ("" if f == 1.0 else f"-bottom{f:g}")
            return str(Path(cfg.out).parent / "tune" / tag)

        jobs_t = [(dataclasses.replace(rated(cfg, depth, lr, f), out=tune_dir(cfg, lr, f)), depth, name, lr, f)
                  for cfg, depth, name in first for lr in lr_grid for f in lr_bottom]
        log(f"choosing the learning rate of each setting from {', '.join(f'{v:g}' for v in lr_grid)}"
            + (f" × bottom {bottom_layers} conv layers' factor {', '.join(f'{v:g}' for v in lr_bottom)}"
               if tuple(lr_bottom) != (1.0,) else "")
            + f" on the validation split of seed {seeds[0]} ({len(jobs_t)} runs)")
        for (_, _, _, lr, f), row in zip(jobs_t, _run_jobs([(*j[:3], resume) for j in jobs_t], jobs, log)):
            row["lr"], row["lr_bottom"] = lr, f
            tuning.append(row)
            done[(row["depth"], row["setting"], lr, f)] = row
        chosen = choose_rates(tuning)
        for (depth, name), (lr, f) in chosen.items():
            log(f"[{depth}] {name}: learning rate {lr:g}" + ("" if f == 1.0 else f", bottom factor {f:g}")
                + " (validation accuracy "
                + ", ".join(f"{r['lr']:g}" + ("" if r["lr_bottom"] == 1.0 else f"×{r['lr_bottom']:g}")
                            + f": {100 * r['val_acc']:.1f}%" for r in tuning
                            if (r["depth"], r["setting"]) == (depth, name)) + ")")
    todo, slots, results = [], [], {}
    for slot, cfg, depth, name in plan:
        if (depth, name) in chosen:
            lr, f = chosen[(depth, name)]
            cfg = rated(cfg, depth, lr, f)
            if cfg.seed == seeds[0]:
                results[slot] = done[(depth, name, lr, f)]
                continue
        todo.append((cfg, depth, name, resume))
        slots.append(slot)
    results.update(zip(slots, _run_jobs(todo, jobs, log)))
    per_setting = {}
    for slot, cfg, depth, name in plan:  # in slot order
        row = results[slot]
        lr, f = chosen.get((depth, name), (cfg.lr[0] if len(cfg.lr) == 1 else list(cfg.lr), 1.0))
        row["lr"], row["lr_bottom"] = lr, f
        rows[slot] = row
        per_setting.setdefault(depth, {}).setdefault(name, []).append(row["layer_grads"][0])
    grads = {depth: {name: np.mean(np.asarray(v), axis=0).tolist() for name, v in by.items()}
             for depth, by in per_setting.items()}
    summary = summarise(rows)
    paired = paired_differences(rows)
    (study / "results.json").write_text(json.dumps({"rows": rows, "summary": summary, "paired": paired,
                                                    "layer_grads": grads, "tuning": tuning,
                                                    "chosen_lr": [{"depth": d, "setting": n, "lr": v[0],
                                                                   "lr_bottom": v[1], "bottom_layers": bottom_layers}
                                                                  for (d, n), v in chosen.items()],
                                                    "ep_vs_bptt_at_init": agreement, "seeds": list(seeds),
                                                    "config": base.to_dict(), "depths": depths,
                                                    "environment": environment(jobs)}, indent=1))
    (study / "results.md").write_text(_table(summary) + "\n\n" + _paired_table(paired) + "\n")
    _plot(study, rows, grads)
    log(_table(summary))
    log(_paired_table(paired))
    return summary


def _check_fresh_study(study: Path) -> None:
    """:class:`~pyeqprop.train.errors.TrainingError` when ``study/runs`` holds a run or a teacher."""
    from ..train.errors import TrainingError
    from ..train.runfolder import has_run

    runs = study / "runs"
    held = sorted(str(d) for d in runs.glob("**/") if d != runs and (has_run(d) or (d / "teacher.npz").exists())) \
        if runs.is_dir() else []
    if held:
        raise TrainingError(f"study folder {str(study)!r} already holds {len(held)} run or teacher folder(s) ({held[0]}"
                            + (", …" if len(held) > 1 else "") + "); continue that study with --resume (the flags "
                            "it was started with) or choose another --out")


def environment(jobs: int = 1) -> dict:
    """What a float32 study's numbers depend on besides the code: training is chaotic, so another NumPy,
    BLAS or BLAS thread count rounds differently and ends elsewhere (measured: seed 0's implicit run of
    depth-b005-asym's command ends at train loss 0.0158 / test 96.11 % with one BLAS thread and at
    0.0127 / 96.39 % with two; three one-thread runs, two of them at different commits, agreed to
    every printed digit). ``blas_threads``: the threads each
    student run's BLAS got (in worker processes :func:`~pyeqprop.study.workers.worker_threads`, in this
    process $OPENBLAS_NUM_THREADS or every core); ``teacher_blas_threads``: the teachers', which train in
    this process before the runs start."""
    import os
    import platform

    from .workers import worker_threads

    cpus = os.cpu_count() or 1
    here = os.environ.get("OPENBLAS_NUM_THREADS") or f"all ({cpus})"
    threads = here if jobs == 1 else worker_threads(jobs)
    return {"python": platform.python_version(), "numpy": np.__version__, "machine": platform.machine(),
            "blas": _blas_name(), "cpus": cpus, "blas_threads": threads, "teacher_blas_threads": here}


def _blas_name() -> str:
    """NumPy's BLAS library and version as ``numpy.show_config`` reports it; "unknown" if it does not."""
    try:
        info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{info.get('name', '?')} {info.get('version', '?')}"
    except (TypeError, KeyError, AttributeError):
        return "unknown"


def _boolean(text) -> bool:
    """A boolean flag's value as ``pyeqprop train`` reads it (true/false, 1/0, yes/no); argparse's error otherwise."""
    from ..train.config import ConfigError, parse_bool

    try:
        return parse_bool(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_study_parser() -> argparse.ArgumentParser:
    """The flags of ``pyeqprop study depth``."""
    p = argparse.ArgumentParser(prog="pyeqprop study depth")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--arch", default=None, help="one architecture (paper scale, e.g. vgg11) instead of shallow+deep")
    p.add_argument("--shallow", default=None)
    p.add_argument("--deep", default=None)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--weight-scale", type=float, default=4.0,
                   help="student weight scale (Eq. 3.10; default 4, the teacher's: forward gain near 1 per layer)")
    p.add_argument("--feedback", type=float, default=0.1,
                   help="feedback gain ω of the student (Eq. 3.18; default 0.1: the deep net passes its input "
                        "and still settles; 1 is the plain network)")
    p.add_argument("--teacher-epochs", type=int, default=20)
    p.add_argument("--teacher-weight-scale", type=float, default=4.0,
                   help="teacher weight scale (SPEC §7.1; default 4)")
    p.add_argument("--schedule", default="gauss-seidel", help="settling schedule (Eqs. 3.8, 3.13)")
    p.add_argument("--settle-tol", type=float, default=1e-5,
                   help="settle every phase to this residual (Eq. 3.14; 0: exactly T1/T2 steps)")
    p.add_argument("--nudged-phase", default="difference", choices=("state", "difference"),
                   help="variables the nudged phases settle in (Eq. 4.8; default difference: δ = s − s⁰, whose "
                        "float32 estimate is not rounded away at the bottom layers)")
    p.add_argument("--unconverged", default="skip", choices=("apply", "skip"),
                   help="a batch whose phase stopped unconverged (Eq. 3.14): skip its update (default: one such "
                        "estimate, far from the gradient, can wreck a deep net in one step) or apply it")
    p.add_argument("--asymmetry-limit", type=float, default=0.5,
                   help="skip a batch's update when some layer's response asymmetry ‖δ⁺ + δ⁻‖ / ‖δ⁺ − δ⁻‖ exceeds "
                        "this (Eq. 4.9; default 0.5: O(β) where the response is smooth, near 1 where a nudged phase "
                        "left for another fixed point; the exact-gradient settings have no nudged phase); 0: off")
    p.add_argument("--T1", type=int, default=100, help="most free-phase steps (the count when --settle-tol 0)")
    p.add_argument("--T2", type=int, default=60, help="most nudged-phase steps")
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--dtype", default="float32", help="float32 or float64")
    p.add_argument("--lr", default="0.05", help="learning rate (or one per layer, Eq. 8.3) when no --lr-grid")
    p.add_argument("--lr-grid", default="0.02,0.05",
                   help="comma list of rates: each setting trains on the first seed at each, and every seed then "
                        "uses the one with the best validation accuracy; 'none': use --lr for every setting")
    p.add_argument("--lr-bottom", default="1,0.1",
                   help="with --lr-grid: comma list of factors on the rates of the bottom --bottom-layers conv layers, "
                        "each tried with every rate (default 1,0.1: as they are, and a tenth on conv1-2; 1: the same "
                        "rate everywhere)")
    p.add_argument("--bottom-layers", type=int, default=2, help="conv layers --lr-bottom applies to (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", default=None, help="array backend (default: $PYEQPROP_BACKEND, else numpy)")
    # booleans as in `pyeqprop train`: --augment alone is true, --augment true / --augment false say it
    p.add_argument("--augment", nargs="?", const=True, default=False, type=_boolean, metavar="BOOL",
                   help="augment training batches (random crop and flip)")
    p.add_argument("--download", nargs="?", const=True, default=False, type=_boolean, metavar="BOOL",
                   help="CIFAR: fetch the archive when it is not found")
    p.add_argument("--data-root", default="", help="CIFAR folder or archive location (else $PYEQPROP_DATA)")
    p.add_argument("--settings", default=",".join(DEFAULT_SETTINGS), help=f"comma list of {', '.join(SETTINGS)}")
    p.add_argument("--seeds", default="0,1,2,3,4", help="comma list of seeds; the table gives mean ± std over them")
    p.add_argument("--local-weight", type=float, default=None, help="λ of every local head (default: train's)")
    p.add_argument("--kd-weight", type=float, default=None, help="γ of every distillation map (default: train's)")
    p.add_argument("--signal-init", choices=SIGNAL_INITS, default="zeros",
                   help="how heads and maps start (Eq. 6.7; default zeros)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, in worker processes (default 1)")
    p.add_argument("--out", default="study-depth")
    p.add_argument("--resume", action="store_true",
                   help="continue a stopped study in --out, with the flags it was started with: its teachers are "
                        "loaded, finished runs read back and stopped ones continued from their latest.npz")
    return p


def _positive_list(text: str, flag: str, what: str) -> list[float]:
    """The distinct numbers > 0 of a comma list, or a ``ValueError`` naming ``flag`` and the text."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be a comma list of {what}, got {text!r}") from None
    if not values or any(not v > 0 for v in values) or len(set(values)) != len(values):
        raise ValueError(f"{flag} must name one or more distinct {what} > 0, got {text!r}")
    return values


def run_study_cli(ns) -> int:
    from ..train.config import TrainConfig, config_from_mapping

    a = build_study_parser().parse_args(ns.rest)
    archs = DEFAULT_ARCHS.get(a.dataset.lower(), DEFAULT_ARCHS["digits"])
    if a.arch:
        depths = {"deep": a.arch}
    else:
        depths = {"shallow": a.shallow or archs["shallow"], "deep": a.deep or archs["deep"]}
    settings = [s.strip() for s in a.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"unknown study setting {bad[0]!r}; settings are {', '.join(SETTINGS)}")
    try:
        seeds = [int(v) for v in a.seeds.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be a comma list of integers, got {a.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must name one or more distinct seeds, got {a.seeds!r}")
    signals = {"signal_init": a.signal_init}
    if a.local_weight is not None:
        signals["local_weight"] = a.local_weight
    if a.kd_weight is not None:
        signals["kd_weight"] = a.kd_weight
    base = config_from_mapping({**signals, "dataset": a.dataset, "epochs": a.epochs, "teacher_epochs": a.teacher_epochs,
                                "T1": a.T1, "T2": a.T2, "beta": a.beta, "lr": a.lr, "batch_size": a.batch_size,
                                "feedback": a.feedback, "schedule": a.schedule, "settle_tol": a.settle_tol,
                                "nudged_phase": a.nudged_phase, "unconverged": a.unconverged, "dtype": a.dtype,
                                "asymmetry_limit": a.asymmetry_limit,
                                **({"backend": a.backend} if a.backend else {}), "augment": a.augment,
                                "progress": "none",
                                "download": a.download, "data_root": a.data_root,
                                "weight_scale": a.weight_scale, "teacher_weight_scale": a.teacher_weight_scale},
                               TrainConfig())
    if a.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {a.jobs}")
    grid = None if a.lr_grid.strip().lower() == "none" else _positive_list(a.lr_grid, "--lr-grid", "rates")
    bottom = _positive_list(a.lr_bottom, "--lr-bottom", "factors")
    if a.bottom_layers < 1:
        raise ValueError(f"--bottom-layers must be >= 1, got {a.bottom_layers}")
    run_depth_study(base, out=a.out, depths=depths, settings=settings, seeds=seeds, jobs=a.jobs, lr_grid=grid,
                    lr_bottom=bottom, bottom_layers=a.bottom_layers, resume=a.resume)
    return 0
