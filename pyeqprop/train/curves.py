"""The run's figure, ``curves.png``: loss (log scale) and accuracy per epoch, from metrics.jsonl.

Drawn with an object-oriented ``Figure`` on an Agg canvas, so matplotlib's global backend (a
notebook's inline one) is left alone. matplotlib is optional (``pip install 'pyeqprop[plot]'``):
during training a missing matplotlib skips the figure with one message; ``pyeqprop plot RUN`` draws
it afterwards from the run folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import TrainingError

__all__ = ["MATPLOTLIB_MISSING", "have_matplotlib", "figure_title", "curves_figure", "plot_curves", "read_metrics",
           "plot_run"]

MATPLOTLIB_MISSING = ("curves.png skipped: matplotlib is not installed; pip install 'pyeqprop[plot]' (or "
                      "matplotlib), then draw it with: pyeqprop plot {run}")
"""The message a run prints (once) when it cannot draw its figure; ``{run}`` is the run folder."""


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def figure_title(run: Path, cfg) -> str:
    """The figure's title: the run's name, then its setting (data, architecture, estimator, signals)."""
    signals = []
    if cfg.local_layers != "none" and cfg.local_weight > 0:
        signals.append(f"local errors λ={cfg.local_weight:g} ({cfg.local_layers})")
    if cfg.kd_layers != "none" and cfg.kd_weight > 0:
        signals.append(f"distillation γ={cfg.kd_weight:g} ({cfg.kd_layers})")
    if cfg.output_kd_weight > 0:
        signals.append(f"output distillation κ={cfg.output_kd_weight:g}")
    setting = (f"{cfg.dataset}, {cfg.arch}, {cfg.estimator} β={cfg.beta:g}, T1={cfg.T1} T2={cfg.T2}, "
               f"{' + '.join(signals) if signals else 'no intermediate signals'}")
    return f"{Path(run).resolve().name}\n{setting}"


def curves_figure(history: list, title: str = ""):
    """The figure of ``history`` (metrics.jsonl's rows): loss per epoch on a log scale (left) and accuracy
    (right), for the train, validation and test splits; ``title`` above. ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ep = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.8))
    FigureCanvasAgg(fig)
    a1, a2 = fig.subplots(1, 2)
    splits = [("train", "train"), ("val", "validation"), ("test", "test")]
    for key, label in splits:
        loss = [h.get(f"{key}_loss") for h in history]
        if any(v is not None for v in loss):
            a1.plot(ep, [float("nan") if v is None else v for v in loss], label=label)
        acc = [h.get(f"{key}_acc") for h in history]
        if any(v is not None for v in acc):
            a2.plot(ep, [float("nan") if v is None else 100 * v for v in acc], label=label)
    a1.set_yscale("log")
    a1.set_xlabel("epoch")
    a1.set_ylabel("readout cost at the free state (log)")
    a1.legend()
    a2.set_xlabel("epoch")
    a2.set_ylabel("accuracy (%)")
    a2.legend()
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(path: str | os.PathLike, history: list, title: str = "") -> Path:
    """Write :func:`curves_figure` of ``history`` to the PNG ``path``, atomically (a temporary file renamed
    over it). Returns the path."""
    path = Path(path)
    fig = curves_figure(history, title)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)
    return path


def read_metrics(run: str | os.PathLike) -> list:
    """The rows of ``run/metrics.jsonl``; :class:`TrainingError` when there is none or it holds no epoch."""
    path = Path(run) / "metrics.jsonl"
    if not Path(run).is_dir():
        raise TrainingError(f"{str(run)!r} is not a run folder (no such folder)")
    if not path.exists():
        raise TrainingError(f"{str(run)!r} is not a run folder: {path} does not exist")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise TrainingError(f"{path} line {n} is not JSON: {line[:60]!r}") from None
        if not isinstance(row, dict) or not all(k in row for k in ("epoch", "train_loss", "train_acc")):
            raise TrainingError(f"{path} line {n} is not a metrics row (expected epoch, train_loss, train_acc, …)")
        rows.append(row)
    if not rows:
        raise TrainingError(f"{path} holds no finished epoch yet: nothing to plot")
    return rows


def plot_run(run: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """``pyeqprop plot RUN``: draw ``run``'s curves.png (or ``out``) from its metrics.jsonl; the title
    names the run and, from its config.toml, its setting. Returns the PNG's path."""
    from .runfolder import recorded_config

    rows = read_metrics(run)
    if not have_matplotlib():
        raise ImportError("pyeqprop plot needs matplotlib: pip install 'pyeqprop[plot]' (or matplotlib)")
    has_config = (Path(run) / "config.toml").exists()
    title = figure_title(Path(run), recorded_config(run)) if has_config else Path(run).resolve().name
    return plot_curves(Path(out) if out else Path(run) / "curves.png", rows, title)
