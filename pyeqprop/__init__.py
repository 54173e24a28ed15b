"""pyeqprop: a reference implementation of Equilibrium Propagation for convolutional CRNNs.

See SPEC.md for the equations; every public function cites the equation it implements.
"""
from . import backend, ops
from .backend import set_backend, to_numpy
from .model import CRNN, bptt, bptt_gradients, ep_estimate, ep_gradients, settle

__version__ = "0.1.0"
__all__ = ["CRNN", "settle", "ep_gradients", "ep_estimate", "bptt_gradients", "bptt", "set_backend", "to_numpy",
           "backend", "ops"]
