"""The readouts: the cost terms of the output, Eqs. (3.3)-(3.4) (SPEC.md §3.3).

Every cost term — these readouts and the intermediate signals of :mod:`pyeqprop.learning.signals`
— is a small object with this protocol (all per sample, batch first; SPEC.md §3.3):

``layer``                                the 0-based neuron layer whose state it reads
``param_specs()``                       names, shapes and fan-in of the parameters it owns
``prepare(params, x, y)``              per-batch context (one-hot targets, teacher features), once per batch
``value(params, states, ctx)``         C_k(s) of shape (n,)
``state_grads(params, states, ctx)``   {l: ∂C_k/∂s_l}, each the shape of s_l
``param_grads(params, states, ctx)``   {name: Σ_batch ∂C_k/∂θ}

The network's total cost is C = Σ_k w_k C_k (Eq. 3.5); the nudged primitive function is
Φ^β = Φ − β C (Eq. 3.6). Parameters that live only in a cost term get their EP estimate
from the same estimator formula (Eq. 4.1-4.3 reduce to ∂C/∂θ at the nudged states).
"""
from __future__ import annotations

from ..backend import namespace_of
from ..ops.linear import linear, linear_transpose, linear_weight_grad
from ..ops.softmax import log_softmax, onehot
from .params import ParamSpec

__all__ = ["READOUTS", "MSEOutput", "SoftmaxReadout", "make_readout"]


class MSEOutput:
    """Cost of the dynamical output layer, Eq. (3.3): C = ½‖s_L − onehot(y)‖² per sample.

    No parameters; ∂C/∂s_L = s_L − onehot(y). Prediction: argmax of s_L.
    """

    kind = "mse"

    def __init__(self, layer: int, num_classes: int):
        self.layer = layer
        self.num_classes = num_classes

    def param_specs(self):
        return []

    def prepare(self, params, x, y):
        return None if y is None else onehot(y, self.num_classes, x.dtype)

    def value(self, params, states, ctx):
        xp = namespace_of(states[self.layer])
        d = states[self.layer] - ctx
        return 0.5 * xp.sum(d * d, axis=1)

    def state_grads(self, params, states, ctx):
        return {self.layer: states[self.layer] - ctx}

    def param_grads(self, params, states, ctx):
        return {}

    def logits(self, params, states):
        return states[self.layer]


class SoftmaxReadout:
    """Softmax readout, Eq. (3.4): C = −log softmax(W_out vec(s_{L}) + b_out)[y] per sample.

    The readout is not a dynamical layer: its logits are a function of the last neuron layer.
    ∂C/∂s_L = reshape((p − onehot(y)) W_out); ∂C/∂W_out = (p − onehot(y))ᵀ vec(s_L);
    ∂C/∂b_out = Σ_n (p − onehot(y)), with p = softmax(logits).
    """

    kind = "softmax"

    def __init__(self, layer: int, name: str, in_features: int, num_classes: int):
        self.layer = layer
        self.name = name
        self.in_features = in_features
        self.num_classes = num_classes

    def param_specs(self):
        return [ParamSpec(f"{self.name}.weight", (self.num_classes, self.in_features), self.in_features),
                ParamSpec(f"{self.name}.bias", (self.num_classes,), self.in_features)]

    def prepare(self, params, x, y):
        return None if y is None else onehot(y, self.num_classes, x.dtype)

    def _flat(self, states):
        xp = namespace_of(states[self.layer])
        s = states[self.layer]
        return xp.reshape(s, (s.shape[0], -1))  # (n, c, h, w) -> (n, c·h·w)

    def logits(self, params, states):
        return linear(self._flat(states), params[f"{self.name}.weight"], params[f"{self.name}.bias"])

    def value(self, params, states, ctx):
        xp = namespace_of(states[self.layer])
        return -xp.sum(log_softmax(self.logits(params, states)) * ctx, axis=1)

    def _delta(self, params, states, ctx):
        xp = namespace_of(states[self.layer])
        return xp.exp(log_softmax(self.logits(params, states))) - ctx  # (n, K): p − onehot

    def state_grads(self, params, states, ctx):
        xp = namespace_of(states[self.layer])
        g = linear_transpose(self._delta(params, states, ctx), params[f"{self.name}.weight"])  # (n, c·h·w)
        return {self.layer: xp.reshape(g, states[self.layer].shape)}

    def param_grads(self, params, states, ctx):
        xp = namespace_of(states[self.layer])
        d = self._delta(params, states, ctx)
        return {f"{self.name}.weight": linear_weight_grad(self._flat(states), d),
                f"{self.name}.bias": xp.sum(d, axis=0)}


READOUTS = {"mse": MSEOutput, "softmax": SoftmaxReadout}
"""The readout kinds by name: ``mse`` (Eq. 3.3) and ``softmax`` (Eq. 3.4)."""


def make_readout(kind: str, arch, num_classes: int):
    """The readout cost term of a resolved architecture: on s_L (mse) or through the readout layer (softmax)."""
    last = len(arch.layers) - 1
    if kind == "mse":
        return MSEOutput(last, num_classes)
    if kind == "softmax":
        ro = arch.readout
        return SoftmaxReadout(last, ro.name, ro.in_features, num_classes)
    raise ValueError(f"readout must be one of {', '.join(READOUTS)}, got {kind!r}")
