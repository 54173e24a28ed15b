"""Conformance vectors for ports of pyeqprop (PyTorch, JAX, hardware).

``pyeqprop/conformance/vectors/`` (package data, :func:`default_vectors_dir`) holds one
``.npz`` per case and ``manifest.json``: deterministic float64 inputs, parameters under their
PyTorch names, pyeqprop's outputs, and a tolerance per output derived from a rounding-error
model (:mod:`.tolerances`). A port implements some of the methods of the adapter protocol
(:mod:`.adapter`) and runs::

    pyeqprop conformance --adapter mypackage.port:ADAPTER [--vectors DIR]
    python -m pyeqprop.conformance regenerate [--out DIR]     # rewrite the vectors

See ``docs/conformance.md``. Nothing here imports PyTorch.
"""
from .adapter import (
    DEFAULT_ADAPTER,
    PROTOCOL,
    PYEQPROP,
    PyeqpropAdapter,
    Result,
    format_result,
    load_adapter,
    run_conformance,
    run_conformance_cli,
)
from ..testing.rounding import GAMMA
from .cases import build_cases
from .format import Case, default_vectors_dir, load_case, load_manifest, write_vectors

__all__ = ["run_conformance", "run_conformance_cli", "Result", "format_result", "load_adapter", "PROTOCOL",
           "PYEQPROP", "PyeqpropAdapter", "DEFAULT_ADAPTER", "build_cases", "write_vectors", "load_manifest",
           "load_case", "default_vectors_dir", "Case", "GAMMA", "regenerate"]


def regenerate(out_dir=None):
    """Rebuild every case and write the vectors to ``out_dir`` (default: the package's vectors)."""
    return write_vectors(default_vectors_dir() if out_dir is None else out_dir)
