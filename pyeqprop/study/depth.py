"""``pyeqprop study depth``: does plain EP fail on a deep CRNN, and do intermediate signals fix it?

For a shallow and a deep architecture it trains, with the same seed, data and budget:
EP (symmetric), EP + local errors, EP + distillation, EP + both, BPTT (the exact gradient
of the same dynamics, Eqs. 5.1-5.4) and the backprop teacher (a feed-forward network of the
same architecture, Eq. 7.3). It writes, into the study folder:

    results.json / results.md   final train loss, test accuracy, epochs, wall time per run
    curves.png                  training loss per epoch for every setting and depth
    layer_grads.png             mean |gradient| per conv layer at initialisation, per setting
    runs/<depth>-<setting>/     each run's own folder (config, metrics, checkpoints)

The per-layer gradient magnitudes are measured at initialisation on one training batch, so
they show how far down each setting's learning signal reaches before any training.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

__all__ = ["SETTINGS", "run_depth_study", "run_study_cli", "layer_gradient_magnitudes"]

# setting -> overrides of TrainConfig
SETTINGS = {
    "ep": {"local_layers": "none", "kd_layers": "none"},
    "ep+local": {"local_layers": "all", "kd_layers": "none"},
    "ep+kd": {"local_layers": "none", "kd_layers": "all"},
    "ep+local+kd": {"local_layers": "all", "kd_layers": "all"},
    "bptt": {"local_layers": "none", "kd_layers": "none", "estimator": "bptt"},
}

DEFAULT_ARCHS = {
    "digits": {"shallow": "c16m-c32m", "deep": "c8-c8-c16m-c16-c16-c32m-c32-c32"},
    "mnist5k": {"shallow": "c32m-c64m", "deep": "c16-c16m-c32-c32m-c64-c64-c64-c64"},
}


def layer_gradient_magnitudes(cfg, data, teacher, xp, *, batch=64):
    """Mean |g| of each conv layer's weight gradient at initialisation, for one training batch.

    Returns {setting: [mean |∂/∂W_l| for l = 1 … L_conv]} for the EP settings (Eq. 4.2) and BPTT (Eq. 5.4).
    """
    from ..backend import to_numpy
    from ..model.bptt import bptt_gradients
    from ..model.ep import ep_estimate
    from ..train.loop import build_student

    xb, yb = data.x_train[:batch, ...], data.y_train[:batch]
    out = {}
    for name, over in SETTINGS.items():
        c = dataclasses.replace(cfg, **over)
        net = build_student(c, data.input_shape, data.num_classes, xp, teacher)
        if c.estimator == "bptt":
            g = bptt_gradients(net, xb, yb, T=c.T1)
        else:
            g = ep_estimate(net, xb, yb, beta=c.beta, T1=c.T1, T2=c.T2, estimator=c.estimator).grads
        convs = [layer.name for layer in net.layers if layer.name.startswith("conv")]
        out[name] = [float(np.mean(np.abs(to_numpy(g[f"{k}.weight"])))) for k in convs]
    return out


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
        for r in rows:
            if r["depth"] == depth and r["curve"]:
                ax.plot(range(1, len(r["curve"]) + 1), r["curve"], label=r["setting"])
        ax.set_title(f"{depth}: training loss per epoch")
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
        ax.set_ylabel("mean |gradient| at init")
        ax.set_title(depth)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(study / "layer_grads.png", dpi=100)


def _table(rows) -> str:
    lines = ["| depth | arch | setting | final train loss | test accuracy | epochs | wall time (s) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        acc = f"{100 * r['test_acc']:.2f}%" if r["test_acc"] == r["test_acc"] else "—"
        loss = f"{r['train_loss']:.4f}" if r["train_loss"] == r["train_loss"] else "—"
        lines.append(f"| {r['depth']} | `{r['arch']}` | {r['setting']} | {loss} | {acc} | {r['epochs']} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines)


def run_depth_study(base, *, out, depths, settings=tuple(SETTINGS), log=print):
    """Train every (depth, setting) pair of the study from TrainConfig ``base``; returns the rows."""
    from ..backend import get_namespace
    from ..train.loop import _get_teacher, prepare_data, train

    study = Path(out)
    (study / "runs").mkdir(parents=True, exist_ok=True)
    xp = get_namespace(base.backend)
    rows, grads = [], {}
    for depth, arch in depths.items():
        cfg = dataclasses.replace(base, arch=arch)
        data = prepare_data(cfg, xp)
        tdir = study / "runs" / f"{depth}-teacher"
        tdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        teacher = _get_teacher(cfg, data, xp, tdir, log)
        t_teacher = time.perf_counter() - t0
        t_loss = teacher.loss(data.x_train, data.y_train)
        rows.append({"depth": depth, "arch": arch, "setting": "teacher (backprop, feed-forward)",
                     "train_loss": float(t_loss), "test_acc": float(teacher.accuracy(data.x_test, data.y_test)),
                     "epochs": cfg.teacher_epochs, "seconds": t_teacher, "curve": []})
        grads[depth] = layer_gradient_magnitudes(cfg, data, teacher, xp)
        log(f"[{depth}] mean |grad| per conv layer at init: " +
            "; ".join(f"{k}: " + " ".join(f"{v:.1e}" for v in mags) for k, mags in grads[depth].items()))
        for name in settings:
            over = dict(SETTINGS[name])
            c = dataclasses.replace(cfg, out=str(study / "runs" / f"{depth}-{name}"),
                                    teacher=str(tdir / "teacher.npz"), **over)
            log(f"[{depth}] {name}: training {arch} for {c.epochs} epochs")
            res = train(c, log=lambda m: None)
            hist = res.history
            rows.append({"depth": depth, "arch": arch, "setting": name,
                         "train_loss": hist[-1]["train_loss"] if hist else float("nan"),
                         "test_acc": res.test_acc, "epochs": len(hist), "seconds": res.seconds,
                         "curve": [h["train_loss"] for h in hist]})
            log(f"[{depth}] {name}: train loss {rows[-1]['train_loss']:.4f}, test {100 * res.test_acc:.2f}%, "
                f"{res.seconds:.0f}s")
    (study / "results.json").write_text(json.dumps({"rows": rows, "layer_grads": grads,
                                                    "config": base.to_dict(), "depths": depths}, indent=1))
    (study / "results.md").write_text(_table(rows) + "\n")
    _plot(study, rows, grads)
    log(_table(rows))
    return rows


def run_study_cli(ns) -> int:
    from ..train.config import TrainConfig, config_from_mapping

    p = argparse.ArgumentParser(prog="pyeqprop study depth")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--arch", default=None, help="one architecture (paper scale, e.g. vgg11) instead of shallow+deep")
    p.add_argument("--shallow", default=None)
    p.add_argument("--deep", default=None)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--weight-scale", type=float, default=1.0, help="student weight scale (Eq. 3.10)")
    p.add_argument("--teacher-epochs", type=int, default=10)
    p.add_argument("--teacher-weight-scale", type=float, default=2.0, help="teacher weight scale (SPEC §7.1)")
    p.add_argument("--T1", type=int, default=30)
    p.add_argument("--T2", type=int, default=10)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--lr", default="0.05")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--backend", default="numpy")
    p.add_argument("--augment", action="store_true")
    p.add_argument("--download", action="store_true", help="CIFAR: fetch the archive when it is not found")
    p.add_argument("--data-root", default="", help="CIFAR folder or archive location (else $PYEQPROP_DATA)")
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="study-depth")
    a = p.parse_args(ns.rest)
    archs = DEFAULT_ARCHS.get(a.dataset.lower(), DEFAULT_ARCHS["digits"])
    if a.arch:
        depths = {"deep": a.arch}
    else:
        depths = {"shallow": a.shallow or archs["shallow"], "deep": a.deep or archs["deep"]}
    settings = [s.strip() for s in a.settings.split(",") if s.strip()]
    bad = [s for s in settings if s not in SETTINGS]
    if bad:
        raise ValueError(f"unknown study setting {bad[0]!r}; settings are {', '.join(SETTINGS)}")
    base = config_from_mapping({"dataset": a.dataset, "epochs": a.epochs, "teacher_epochs": a.teacher_epochs,
                                "T1": a.T1, "T2": a.T2, "beta": a.beta, "lr": a.lr, "batch_size": a.batch_size,
                                "backend": a.backend, "augment": a.augment, "seed": a.seed, "progress": "none",
                                "download": a.download, "data_root": a.data_root,
                                "weight_scale": a.weight_scale, "teacher_weight_scale": a.teacher_weight_scale},
                               TrainConfig())
    run_depth_study(base, out=a.out, depths=depths, settings=settings)
    return 0
