"""Hand-derived primitives with their adjoints (SPEC.md §2). Each infers its namespace from its inputs."""
from .activations import (
    ACTIVATIONS,
    Activation,
    get_activation,
    half_hard_sigmoid,
    half_hard_sigmoid_grad,
    hard_sigmoid,
    hard_sigmoid_grad,
)
from .conv import conv2d, conv2d_bias_grad, conv2d_transpose, conv2d_weight_grad, conv_weight_matrix
from .linear import linear, linear_transpose, linear_weight_grad
from .pool import avg_pool2d, avg_unpool2d, max_pool2d, max_pool2d_select, max_unpool2d
from .softmax import log_softmax, onehot

__all__ = [
    "conv2d", "conv2d_transpose", "conv2d_weight_grad", "conv2d_bias_grad", "conv_weight_matrix",
    "max_pool2d", "max_pool2d_select", "max_unpool2d", "avg_pool2d", "avg_unpool2d",
    "linear", "linear_transpose", "linear_weight_grad",
    "hard_sigmoid", "hard_sigmoid_grad", "half_hard_sigmoid", "half_hard_sigmoid_grad",
    "Activation", "get_activation", "ACTIVATIONS", "onehot", "log_softmax",
]
