"""A feed-forward convolutional teacher, trained by hand-derived backpropagation (SPEC.md §7).

The teacher is built from the same architecture spec as the student CRNN, with the same
parameter names, shapes and initialisation, but it is an ordinary feed-forward network:
each layer is computed once from the layer below. Its per-layer activations a_l have the
shapes of the CRNN's states s_l and serve as distillation targets (Eq. 7.4).

Notation: n batch, x = a_0 the input (n, c, h, w), layers l = 1 … L as in the spec string,
ρ the activation, P_l the 2×2 pooling of conv layer l (max, average or identity), P*_l its
adjoint (max-unpooling at the forward argmax, average-unpooling, or identity), K classes.

Forward (Eq. 7.1)::

    z_l = conv(a_{l−1}; W_l, p_l) + b_l                 (n, o_l, h_conv, w_conv)   conv layer
    p_l = P_l(z_l)                                      (n, o_l, h_l, w_l)
    p_l = W_l vec(a_{l−1}) + b_l                        (n, m_l)                   fc layer
    a_l = ρ(p_l)                                        shape of p_l
    z   = W_out vec(a_L) + b_out                        (n, K)  the logits

Loss (Eq. 7.2):  L = −(1/n) Σ_i log softmax(z_i)[y_i].

Reverse pass (Eq. 7.3), with g_l = ∂L/∂a_l and μ_l = ∂L/∂p_l::

    δ        = (softmax(z) − onehot(y)) / n             (n, K) = ∂L/∂z
    ∂L/∂W_out = δᵀ vec(a_L),   ∂L/∂b_out = Σ_i δ_i
    g_L      = reshape(δ W_out)
    μ_l      = ρ'(p_l) ⊙ g_l
    conv:  ζ_l = P*_l(μ_l) = ∂L/∂z_l
           ∂L/∂W_l = conv2d_weight_grad(a_{l−1}, ζ_l),  ∂L/∂b_l = Σ_{i,u,v} ζ_l
           g_{l−1} = conv2d_transpose(ζ_l, W_l)
    fc:    ∂L/∂W_l = μ_lᵀ vec(a_{l−1}),  ∂L/∂b_l = Σ_i μ_l,  g_{l−1} = reshape(μ_l W_l)

ρ' is the activation's derivative with the convention of SPEC.md §2 (0 at the kinks); at
a max-pool tie the gradient goes to the first maximum (the forward argmax). Away from the
kinks and ties this is the exact gradient of L, which is what the reference tests check.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import asarray, backend_name, device_of, dtype_name, namespace_of, resolve, to_numpy
from ..ops.activations import get_activation
from ..ops.softmax import log_softmax, onehot
from .arch import parse_arch
from .layers import make_layer, make_layers, param_specs
from .params import init_params

__all__ = ["Teacher", "TeacherCache"]


@dataclass
class TeacherCache:
    """What the forward pass keeps for the reverse pass (Eq. 7.3).

    x : (n, c, h, w) the input a_0.
    pre : [p_1 … p_L], p_l the pre-activation after pooling, shape of a_l.
    acts : [a_1 … a_L], a_l = ρ(p_l).
    indices : max-pool argmax of each layer (None unless P_l is max pooling).
    logits : (n, K).
    """

    x: object
    pre: list
    acts: list
    indices: list
    logits: object


class Teacher:
    """Feed-forward CNN with the student's architecture, trained by backpropagation (SPEC.md §7).

    Parameters
    ----------
    arch : str
        A preset name or spec string (:mod:`pyeqprop.model.arch`), resolved with the
        softmax readout: every spec token is a hidden layer and the output layer
        ``fc{J}`` (J = number of fc tokens + 1) maps vec(a_L) to the K logits.
    input_shape : (c, h, w)
    num_classes : int
        K, the number of logits.
    activation : "hard_sigmoid" | "half_hard_sigmoid"
        ρ of Eqs. 2.9-2.10, applied after pooling (Eq. 7.1).
    dtype : "float32" | "float64"
    xp : namespace, backend name or None (process default).
    seed : int
        Initialisation seed: each weight and bias uniform in ±1/√fan_in drawn from
        ``numpy.random.default_rng(seed)`` in parameter order, fan_in = c·k·k (conv) or the
        input width (fc). This is the CRNN's scheme (Eq. 3.10), so ``Teacher(a, s, seed=k)``
        and ``CRNN(a, s, readout="softmax", seed=k)`` start from identical parameters.
    weight_scale : float
        Multiplies the weight range (not the biases), as in the CRNN. Deep teachers with
        clipped activations need > 1 to train (the signal shrinks ~0.5× per layer at 1).

    Attributes
    ----------
    params : dict[str, array]
        PyTorch names and layouts, in order: ``conv1.weight`` (o, c, k, k), ``conv1.bias``
        (o,), …, ``fc1.weight`` (out, in), ``fc1.bias`` (out,), …, the readout last.
    layers : tuple of :class:`~pyeqprop.model.layers.ConvMap` / ``DenseMap``
        The hidden layers 1 … L, the CRNN's layer objects. ``readout`` : ``DenseMap``, the output layer.
    """

    def __init__(self, arch, input_shape, *, num_classes=10, activation="hard_sigmoid", dtype="float32",
                 xp=None, seed=0, weight_scale=1.0):
        self.xp = resolve(xp)
        self.weight_scale = float(weight_scale)
        dtype = dtype_name(dtype, self.xp)
        self.dtype_name = dtype
        self.dtype = getattr(self.xp, dtype)
        self.arch = parse_arch(arch, input_shape, num_classes, "softmax")
        self.arch_name = arch
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = int(num_classes)
        self.activation = activation
        self.act = get_activation(activation)
        self.seed = seed
        self.layers = make_layers(self.arch.layers)
        self.readout = make_layer(self.arch.readout)
        self.params: dict = {}
        rng = np.random.default_rng(seed)
        probe = self.xp.zeros((1,), dtype=self.dtype)
        self.device = device_of(probe)
        self.params.update(init_params(param_specs(self.layers + (self.readout,)), rng, dtype=self.dtype_name,
                                       xp=self.xp, device=self.device, weight_scale=self.weight_scale))

    def spec(self) -> dict:
        """The constructor arguments (JSON-serialisable) that rebuild this architecture."""
        return {"arch": self.arch_name, "input_shape": list(self.input_shape), "num_classes": self.num_classes,
                "activation": self.activation, "dtype": self.dtype_name, "seed": self.seed}

    def feature_shapes(self, batch: int):
        """Shapes of a_1 … a_L for a batch: the CRNN's state shapes (n, *state_shape)."""
        return [(batch, *shape) for shape in self.arch.state_shapes]

    # ------------------------------------------------------------------ checks
    def _check_x(self, x):
        xp = namespace_of(x)
        if backend_name(xp) != backend_name(self.xp):
            raise TypeError(f"x lives in namespace {backend_name(xp)!r} but the teacher in {backend_name(self.xp)!r}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (n, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"x has dtype {x.dtype} but the teacher uses {self.dtype_name}")

    def _check_y(self, y, n):
        xp = namespace_of(y)
        if backend_name(xp) != backend_name(self.xp):
            raise TypeError(f"y lives in namespace {backend_name(xp)!r} but the teacher in {backend_name(self.xp)!r}")
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"y must have shape ({n},), got {tuple(y.shape)}")
        if not xp.isdtype(y.dtype, "integral"):
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if n and bool(xp.any((y < 0) | (y >= self.num_classes))):
            raise ValueError(f"labels y must lie in [0, {self.num_classes}), got values outside it")

    # ------------------------------------------------------------------ forward (Eq. 7.1)
    def forward(self, x):
        """Logits and the cache of the forward pass, Eq. (7.1).

        Parameters
        ----------
        x : (n, c, h, w), in the teacher's namespace and dtype.

        Returns
        -------
        logits : (n, K); cache : :class:`TeacherCache`.
        """
        self._check_x(x)
        a = x
        pre, acts, indices = [], [], []
        for layer in self.layers:
            p, idx = layer.bottom_up(self.params, a)  # p_l = P_l(conv(a; W_l) + b_l) or W_l vec(a) + b_l
            a = self.act.fn(p)
            pre.append(p)
            acts.append(a)
            indices.append(idx)
        logits = self.readout.bottom_up(self.params, a)[0]  # W_out vec(a_L) + b_out
        return logits, TeacherCache(x, pre, acts, indices, logits)

    def features(self, x):
        """Teacher features t_l(x) = a_l for l = 1 … L, Eq. (7.4).

        Returns a list of arrays of shapes ``feature_shapes(n)`` — those of the CRNN's
        states s_1 … s_L for the same architecture.
        """
        return self.forward(x)[1].acts

    def logits(self, x):
        """z = W_out vec(a_L) + b_out, (n, K) (Eq. 7.1)."""
        return self.forward(x)[0]

    # ------------------------------------------------------------------ loss and reverse pass
    def _ce(self, logits, y):
        """Batch-mean cross-entropy (Eq. 7.2) and log softmax(z)."""
        xp = self.xp
        n = logits.shape[0]
        logp = log_softmax(logits)  # (n, K)
        Y = onehot(y, self.num_classes, logits.dtype)  # (n, K)
        return float(-xp.sum(logp * Y)) / n, logp, Y

    def loss(self, x, y) -> float:
        """L = −(1/n) Σ_i log softmax(z_i)[y_i], Eq. (7.2), as a Python float."""
        logits, _ = self.forward(x)
        self._check_y(y, x.shape[0])
        return self._ce(logits, y)[0]

    def loss_and_grads(self, x, y):
        """Loss (Eq. 7.2) and its gradient by the hand-derived reverse pass, Eq. (7.3).

        Parameters
        ----------
        x : (n, c, h, w); y : (n,) integer labels in [0, K).

        Returns
        -------
        loss : float; grads : dict keyed and shaped like ``params`` (∂L/∂θ, batch mean).

        Adjoint
        -------
        Each backward step is the adjoint of its forward primitive: conv2d_transpose and
        conv2d_weight_grad for conv2d (Eqs. 2.3-2.4), max_unpool2d at the forward argmax
        for max_pool2d (Eq. 2.7), avg_unpool2d for avg_pool2d (Eq. 2.8),
        linear_transpose / linear_weight_grad for linear (Eq. 2.11), and ρ' ⊙ for ρ.
        """
        xp = self.xp
        logits, cache = self.forward(x)
        n = x.shape[0]
        self._check_y(y, n)
        loss, logp, Y = self._ce(logits, y)
        delta = (xp.exp(logp) - Y) * (1.0 / n)  # (n, K) = ∂L/∂z
        return loss, self.backward(cache, delta)

    def backward(self, cache: TeacherCache, delta) -> dict:
        """The reverse pass of Eq. (7.3) from a given δ = ∂L/∂z, for any loss of the logits.

        Parameters
        ----------
        cache : the :class:`TeacherCache` of :meth:`forward` at the current parameters.
        delta : (n, K) ∂L/∂z; for Eq. 7.2 it is (softmax(z) − onehot(y))/n.

        Returns
        -------
        grads : dict keyed and shaped like ``params``, ∂L/∂θ = (∂z/∂θ)ᵀ δ.
        """
        x = cache.x
        n = x.shape[0]
        if tuple(delta.shape) != (n, self.num_classes):
            raise ValueError(f"delta must have shape ({n}, {self.num_classes}), got {tuple(delta.shape)}")
        grads: dict = {}
        ro = self.readout
        a_last = cache.acts[-1]
        grads[ro.weight], grads[ro.bias] = ro.param_adjoint(a_last, delta)  # (K, in), (K,)
        g = ro.top_down(self.params, delta, None, a_last.shape)  # (n, in) -> shape of a_L
        for l in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[l]
            below = x if l == 0 else cache.acts[l - 1]
            mu = self.act.grad(cache.pre[l]) * g  # ∂L/∂p_l, shape of a_l
            # ∂L/∂W_l, ∂L/∂b_l through P*_l at the forward argmax (ζ_l = P*_l(μ_l) for conv, μ_l for fc)
            grads[layer.weight], grads[layer.bias] = layer.param_adjoint(below, mu, cache.indices[l])
            if l > 0:
                g = layer.top_down(self.params, mu, cache.indices[l], below.shape)  # g_{l−1}
        return {k: grads[k] for k in self.params}

    # ------------------------------------------------------------------ inference
    def predict(self, x):
        """argmax_k z_k, shape (n,)."""
        return self.xp.argmax(self.forward(x)[0], axis=1)

    def _to_backend(self, a, dtype):
        if backend_name(namespace_of(a)) != backend_name(self.xp):
            return asarray(to_numpy(a), xp=self.xp, dtype=dtype)
        return a

    def accuracy(self, x, y, batch_size=256) -> float:
        """Fraction of samples whose prediction equals the label, evaluated in batches.

        x (n, c, h, w) and y (n,) may be in the teacher's namespace or host NumPy arrays
        (moved batch by batch; x must then already have the teacher's dtype).
        """
        n = int(x.shape[0])
        if n == 0:
            raise ValueError("accuracy of an empty set is undefined")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        correct = 0
        for i in range(0, n, int(batch_size)):
            hi = min(i + int(batch_size), n)  # the standard leaves an out-of-range slice stop unspecified
            xb = self._to_backend(x[i:hi, ...], self.dtype_name)
            yb = self._to_backend(y[i:hi], "int64")
            pred = self.predict(xb)
            correct += int(self.xp.sum(self.xp.astype(pred == self.xp.astype(yb, pred.dtype), self.xp.int64)))
        return correct / n

    def __repr__(self):
        return (f"Teacher({self.arch_name!r}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"activation={self.activation!r}, dtype={self.dtype_name!r}, backend={backend_name(self.xp)!r})")
