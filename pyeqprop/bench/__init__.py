"""Micro-benchmarks of pyeqprop's primitives (``pyeqprop bench ops``).

Not imported by the library; PyTorch, when present, is imported only inside the
benchmark functions as a point of comparison.
"""
from .ops import run_ops_bench

__all__ = ["run_ops_bench"]
