"""pyeqprop: a reference implementation of Equilibrium Propagation for convolutional CRNNs."""
__version__ = "0.1.0"
