"""Diagnostics built on the library (nothing here is needed to train).

``gdu``: the GDU check (SPEC.md Eq. 4.5) behind ``pyeqprop gdu-check`` (:func:`run_gdu_cli`), and the
contraction bounds used to pick a weight scale under which the free phase converges.
"""
from .gdu import (
    GDUCurve,
    GDUReport,
    GDURow,
    activation_slope,
    add_gdu_arguments,
    block_norm_bounds,
    contracting_weight_scale,
    format_table,
    gdu_check,
    lipschitz_bound,
    plot_gdu,
    run_gdu_cli,
    tridiagonal_norm,
)

__all__ = ["gdu_check", "GDUReport", "GDURow", "GDUCurve", "format_table", "plot_gdu", "add_gdu_arguments",
           "run_gdu_cli", "block_norm_bounds", "tridiagonal_norm", "lipschitz_bound", "activation_slope",
           "contracting_weight_scale"]
