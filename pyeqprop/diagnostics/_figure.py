"""Figures for the diagnostics, drawn without touching matplotlib's global backend.

``matplotlib.use("Agg")`` would switch a notebook's inline backend off; an object-oriented
``Figure`` with an Agg canvas writes PNGs and leaves the session's backend as it was.
"""
from __future__ import annotations


def new_figure(what: str, nrows: int, ncols: int, *, figsize, squeeze: bool = True):
    """A (Figure, axes) pair on an Agg canvas; a clear ImportError naming ``what`` without matplotlib."""
    try:
        import matplotlib  # noqa: F401  (first, so a missing matplotlib fails here, not mid-way)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"plotting {what} needs matplotlib: pip install matplotlib "
                          "(or pip install 'pyeqprop[plot]')") from exc
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=squeeze)


def colour_cycle() -> list:
    import matplotlib

    return matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
