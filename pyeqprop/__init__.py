"""pyeqprop: a reference implementation of Equilibrium Propagation for convolutional CRNNs.

See SPEC.md for the equations; every public function cites the equation it implements.
Layers: ``backend`` → ``ops`` (primitives and adjoints) → ``model`` (layers, the CRNN's
energy, the teacher) → ``learning`` (settling, estimators, BPTT, signals) → the application
(``data``, ``train``, ``diagnostics``, ``study``, ``bench``, ``conformance``, ``cli``).
"""
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version

from . import backend, ops
from .backend import set_backend, to_numpy
from .learning import Estimate, bptt, bptt_gradients, ep_estimate, ep_gradients, estimate, settle
from .model import CRNN, Nudge

try:  # one version: pyproject.toml's, as installed (``pyeqprop --version`` prints the same)
    __version__ = _distribution_version("pyeqprop")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
__all__ = ["CRNN", "Nudge", "settle", "ep_gradients", "ep_estimate", "estimate", "Estimate", "bptt_gradients",
           "bptt", "set_backend", "to_numpy", "backend", "ops"]
