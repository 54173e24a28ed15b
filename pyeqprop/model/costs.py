"""Cost terms C of the nudged phase: readouts here, intermediate signals in ``signals.py`` (SPEC.md §3.3).

A cost term is a small object with this protocol (all per sample, batch first):

``param_specs(dtype)``                 names, shapes and fan-in of the parameters it owns
``prepare(params, x, y)``              per-batch context (one-hot targets, teacher features), once per batch
``value(params, states, ctx)``         C_k(s) of shape (n,)
``state_grads(params, states, ctx)``   {l: ∂C_k/∂s_l}, each the shape of s_l
``param_grads(params, states, ctx)``   {name: Σ_batch ∂C_k/∂θ}

The network's total cost is C = Σ_k w_k C_k (Eq. 3.5); the nudged primitive function is
Φ^β = Φ − β C (Eq. 3.6). Parameters that live only in a cost term get their EP estimate
from the same estimator formula (Eq. 4.1-4.3 reduce to ∂C/∂θ at the nudged states).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..backend import device_of, namespace_of
from ..ops.linear import linear, linear_transpose, linear_weight_grad

__all__ = ["onehot", "log_softmax", "MSEOutput", "SoftmaxReadout", "ParamSpec"]


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a model or cost term owns: PyTorch name, shape, fan-in and initialisation (Eq. 3.10).

    ``init``: "uniform" (±1/√fan_in, weights × weight_scale) or "zeros".
    """

    name: str
    shape: tuple[int, ...]
    fan_in: int
    init: str = "uniform"


def onehot(y, num_classes: int, dtype):
    """One-hot rows: y (n,) integer labels -> (n, K) of ``dtype``, Eq. (3.4)."""
    xp = namespace_of(y)
    classes = xp.arange(num_classes, dtype=y.dtype, device=device_of(y))
    return xp.astype(xp.reshape(y, (-1, 1)) == xp.reshape(classes, (1, -1)), dtype)  # (n, 1) == (1, K) -> (n, K)


def log_softmax(z):
    """Row-wise log-softmax of z (n, K), stabilised by the row maximum."""
    xp = namespace_of(z)
    zmax = xp.max(z, axis=1, keepdims=True)
    zs = z - zmax
    return zs - xp.log(xp.sum(xp.exp(zs), axis=1, keepdims=True))


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
