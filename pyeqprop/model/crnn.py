"""The convolutional CRNN: parameters, primitive function Φ, its gradients and one dynamics step (SPEC.md §3).

Notation: s_0 = x is the input (never passed through ρ); s_1 … s_L are the neuron layers;
conv layer l has weights W_l (o, c, k, k), bias b_l (o,), padding p_l and pooling P_l;
fc layer l has W_l (out, in) and b_l (out,). For a batch of n samples every quantity below
is per sample; sums over the batch are explicit.

    B_l(s_{l−1}) = P_l(conv(s_{l−1}; W_l, p_l) + b_l)        conv layer      (Eq. 3.1)
                 = W_l vec(s_{l−1}) + b_l                     fc layer
    Φ(x, s; θ)   = Σ_l ⟨B_l(s_{l−1}), s_l⟩                                     (Eq. 3.2)
    Φ^β          = Φ − β C,  C = Σ_k w_k C_k                                   (Eqs. 3.5-3.6)
    ∂Φ^β/∂s_l    = B_l(s_{l−1}) + T_l(s_{l+1}) − β ∂C/∂s_l                     (Eq. 3.7)
    T_l(s_{l+1}) = conv_transpose(P*_{l+1}(s_{l+1}); W_{l+1})   (P* = unpool at the current argmax)
                 = reshape(W_{l+1}ᵀ s_{l+1})                    (fc above)
    s_l ← ρ(∂Φ^β/∂s_l) for all l at once                                       (Eq. 3.8)
    ∂Φ/∂W_l = conv2d_weight_grad(s_{l−1}, P*_l(s_l)),  ∂Φ/∂b_l = Σ P*_l(s_l)    (Eq. 3.9)
            = s_lᵀ vec(s_{l−1}),                      = Σ s_l              (fc)

Max pooling inside Φ is piecewise linear: with the argmax frozen, Φ is bilinear in
neighbouring layers, which makes its Hessian in s symmetric (used by BPTT, Eq. 5.2).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..backend import DTYPES, backend_name, device_of, namespace_of, resolve
from ..ops.activations import get_activation
from ..ops.conv import conv2d_bias_grad, conv2d_transpose, conv2d_weight_grad
from ..ops.linear import linear_transpose, linear_weight_grad
from ..ops.pool import avg_pool2d, max_pool2d_select
from . import layers as layers_mod
from .arch import ArchError, ConvLayer, parse_arch
from .costs import MSEOutput, SoftmaxReadout

__all__ = ["CRNN", "Drive", "READOUTS"]

READOUTS = ("mse", "softmax")  # a dynamical output layer (Eq. 3.3), or a softmax readout (Eq. 3.4)


@dataclass
class Drive:
    """Everything one evaluation of ∂Φ^β/∂s produces: the pre-activations u_l and the argmaxes."""

    u: list  # u_l = ∂Φ^β/∂s_l, shape of s_l
    indices: list  # max-pool indices of layer l (None unless P_l is max)
    bottom_up: list = field(default_factory=list)  # B_l(s_{l−1})


class CRNN:
    """A convolutional convergent recurrent network (SPEC.md §3).

    Parameters
    ----------
    arch : str
        A preset name or spec string (see :mod:`pyeqprop.model.arch`).
    input_shape : (c, h, w)
    num_classes : int
        Units of the output layer (mse) or of the softmax readout.
    readout : "mse" | "softmax"
        ``mse``: s_L is a dynamical output layer, C = ½‖s_L − onehot(y)‖² (Eq. 3.3);
        ``softmax``: C = CE(softmax(W_out vec(s_L) + b_out), y), not dynamical (Eq. 3.4).
    activation : "hard_sigmoid" | "half_hard_sigmoid"
    dtype : "float32" | "float64"
    xp : namespace, backend name or None (process default).
    seed : int
        Initialisation seed (Eq. 3.10): every weight and bias is drawn uniform in
        ±weight_scale/√fan_in from ``numpy.random.default_rng(seed)`` in parameter order,
        fan_in = c·k·k for conv and the input width for fc (PyTorch's default range);
        biases use ±1/√fan_in.
    weight_scale : float
        Multiplies the weight range (not the biases); < 1 makes the dynamics contract.

    Attributes
    ----------
    params : dict[str, array]
        PyTorch names and layouts: ``conv1.weight`` (o, c, k, k), ``conv1.bias`` (o,),
        ``fc1.weight`` (out, in), ``fc1.bias`` (out,), …, in a fixed order.
    cost_terms : list of (weight, term)
        The readout first, then any intermediate-signal terms (``add_cost_term``).
    """

    def __init__(self, arch, input_shape, *, num_classes=10, readout="mse", activation="hard_sigmoid",
                 dtype="float32", xp=None, seed=0, weight_scale=1.0):
        self.xp = resolve(xp)
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be {' or '.join(map(repr, DTYPES))}, got {dtype!r}")
        if readout not in READOUTS:
            raise ArchError(f"readout must be {' or '.join(map(repr, READOUTS))}, got {readout!r}")
        self.dtype_name = dtype
        self.dtype = getattr(self.xp, dtype)
        self.arch = parse_arch(arch, input_shape, num_classes, readout)
        self.arch_name = arch
        self.input_shape = tuple(int(v) for v in input_shape)
        self.num_classes = int(num_classes)
        self.readout = readout
        self.act = get_activation(activation)
        self.activation = activation
        self.seed = seed
        self.weight_scale = float(weight_scale)
        self.layers = self.arch.layers
        last = len(self.layers) - 1
        if readout == "mse":
            term = MSEOutput(last, self.num_classes)
        else:
            ro = self.arch.readout
            term = SoftmaxReadout(last, ro.name, ro.in_features, self.num_classes)
        self.readout_term = term
        self.cost_terms: list = [(1.0, term)]
        self.device = device_of(self.xp.zeros((1,), dtype=self.dtype))  # where states and parameters live
        self.params: dict = {}
        rng = np.random.default_rng(seed)
        self._init_params(self._layer_param_specs() + term.param_specs(), rng)

    # ------------------------------------------------------------------ parameters
    def _layer_param_specs(self):
        return layers_mod.param_specs(self.layers)

    def _init_params(self, specs, rng):
        taken = [spec.name for spec in specs if spec.name in self.params]
        if taken:
            raise ValueError(f"parameter {taken[0]!r} already exists")
        self.params.update(layers_mod.init_params(specs, rng, dtype=self.dtype_name, xp=self.xp, device=self.device,
                                                  weight_scale=self.weight_scale))

    def add_cost_term(self, term, weight: float, *, seed: int | None = None):
        """Add an intermediate cost term C_k with weight w_k (Eq. 3.5) and initialise its parameters."""
        rng = np.random.default_rng(self.seed + 1000 + len(self.cost_terms) if seed is None else seed)
        self._init_params(term.param_specs(), rng)
        self.cost_terms.append((float(weight), term))
        return term

    def network_param_names(self):
        """Names of the parameters that appear in Φ (not only in the cost)."""
        return [s.name for s in self._layer_param_specs()]

    def state_shapes(self, batch: int):
        return [(batch, *shape) for shape in self.arch.state_shapes]

    def init_state(self, batch: int):
        """Zero states s_1 … s_L for a batch (the start of every free phase, Eq. 3.8)."""
        return [self.xp.zeros(shape, dtype=self.dtype, device=self.device) for shape in self.state_shapes(batch)]

    # ------------------------------------------------------------------ checks
    def _check_x(self, x):
        xp = namespace_of(x)
        if backend_name(xp) != backend_name(self.xp):
            raise TypeError(f"x lives in namespace {backend_name(xp)!r} but the network in {backend_name(self.xp)!r}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (n, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"x has dtype {x.dtype} but the network uses {self.dtype_name}")

    def _check_state(self, state, n):
        shapes = self.state_shapes(n)
        if len(state) != len(shapes):
            raise ValueError(f"state must have {len(shapes)} layers, got {len(state)}")
        for l, (s, shape) in enumerate(zip(state, shapes)):
            if tuple(s.shape) != shape:
                raise ValueError(f"state layer {l + 1} must have shape {shape}, got {tuple(s.shape)}")

    def prepare(self, x, y):
        """Per-batch cost context: one entry per cost term (one-hot targets, teacher features)."""
        if y is not None:
            xp = namespace_of(y)
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(f"y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
            if not xp.isdtype(y.dtype, "integral"):
                raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        return [term.prepare(self.params, x, y) for _, term in self.cost_terms]

    # ------------------------------------------------------------------ Φ and its state gradient
    def _below(self, x, state, l):
        return x if l == 0 else state[l - 1]

    def _bottom_up(self, l, a):
        """B_l(a) and the max-pool indices (Eq. 3.1)."""
        return layers_mod.forward(self.layers[l], self.params, a)

    def _unpool(self, l, g, idx):
        """P*_l: the adjoint of layer l's pooling at its argmax (identity without pooling)."""
        return layers_mod.unpool(self.layers[l], g, idx)

    def _pool_linear(self, l, z, idx):
        """P_l as a linear map at frozen argmax (selection for max pooling)."""
        layer = self.layers[l]
        if layer.pool == "max":
            return max_pool2d_select(z, idx)
        if layer.pool == "avg":
            return avg_pool2d(z)
        return z

    def _top_down(self, l, s_above, idx_above, below_shape):
        """T_{l−1}(s_l): the feedback that layer l sends to the layer below (Eq. 3.7)."""
        xp = self.xp
        layer = self.layers[l]
        W = self.params[f"{layer.name}.weight"]
        if isinstance(layer, ConvLayer):
            g = self._unpool(l, s_above, idx_above)
            return conv2d_transpose(g, W, padding=layer.padding, output_size=below_shape[2:])
        return xp.reshape(linear_transpose(s_above, W), below_shape)  # (n, in) -> shape of s_{l−1}

    def input_drive(self, x):
        """B_1(x) and its argmax: constant while x is, so a phase computes it once (Eq. 3.1)."""
        return self._bottom_up(0, x)

    def drive(self, x, state, ctx=None, beta=0.0, x_drive=None) -> Drive:
        """u_l = ∂Φ^β/∂s_l for every layer (Eq. 3.7), with the argmaxes used.

        ``x_drive``: the result of :meth:`input_drive` for this x, to skip recomputing it.
        """
        L = len(self.layers)
        bu, idx = [], []
        for l in range(L):
            if l == 0 and x_drive is not None:
                b_l, i_l = x_drive
            else:
                b_l, i_l = self._bottom_up(l, self._below(x, state, l))
            bu.append(b_l)
            idx.append(i_l)
        u = list(bu)
        for l in range(1, L):
            u[l - 1] = u[l - 1] + self._top_down(l, state[l], idx[l], state[l - 1].shape)
        if beta != 0.0:
            for w_k, grads in self._weighted_cost_state_grads(state, ctx):
                for l, g in grads.items():
                    u[l] = u[l] - (beta * w_k) * g
        return Drive(u, idx, bu)

    def _weighted_cost_state_grads(self, state, ctx):
        if ctx is None:
            raise ValueError("a nudged evaluation (beta != 0) needs targets y")
        for (w_k, term), c in zip(self.cost_terms, ctx):
            if w_k != 0.0:
                yield w_k, term.state_grads(self.params, state, c)

    def dphi_ds(self, x, state, y=None, beta=0.0):
        """∂Φ^β/∂s_l for l = 1 … L, per sample (Eq. 3.7)."""
        self._check_x(x)
        self._check_state(state, x.shape[0])
        ctx = self._nudge_ctx(x, y, beta)
        return self.drive(x, state, ctx, beta).u

    def step_ctx(self, x, state, ctx, beta=0.0, x_drive=None):
        """One synchronous update s ← ρ(∂Φ^β/∂s) (Eq. 3.8) with a prepared cost context."""
        d = self.drive(x, state, ctx, beta, x_drive)
        return [self.act.fn(u) for u in d.u]

    def step(self, x, state, y=None, beta=0.0):
        """One synchronous update of every layer, s_l ← ρ(∂Φ^β/∂s_l) (Eq. 3.8)."""
        self._check_x(x)
        self._check_state(state, x.shape[0])
        ctx = self._nudge_ctx(x, y, beta)
        return self.step_ctx(x, state, ctx, beta)

    def _nudge_ctx(self, x, y, beta):
        """Cost context of a nudged evaluation (None when β = 0); β ≠ 0 needs targets y."""
        if beta == 0.0:
            return None
        if y is None:
            raise ValueError(f"a nudged evaluation (beta={beta}) needs targets y")
        return self.prepare(x, y)

    def cost(self, x, state, y, ctx=None):
        """Total cost C = Σ_k w_k C_k per sample, shape (n,) (Eq. 3.5)."""
        if ctx is None and y is None:
            raise ValueError("the cost needs targets y")
        ctx = self.prepare(x, y) if ctx is None else ctx
        total = None
        for (w_k, term), c in zip(self.cost_terms, ctx):
            if w_k == 0.0:
                continue
            v = w_k * term.value(self.params, state, c)
            total = v if total is None else total + v
        return total

    def phi(self, x, state, y=None, beta=0.0):
        """Φ^β(x, s; θ) per sample, shape (n,) (Eqs. 3.2, 3.6)."""
        xp = self.xp
        self._check_x(x)
        self._check_state(state, x.shape[0])
        total = None
        for l in range(len(self.layers)):
            b_l, _ = self._bottom_up(l, self._below(x, state, l))
            term = xp.sum(xp.reshape(b_l * state[l], (x.shape[0], -1)), axis=1)  # (n, …) -> (n,)
            total = term if total is None else total + term
        if beta != 0.0:
            total = total - beta * self.cost(x, state, y, self._nudge_ctx(x, y, beta))
        return total

    # ------------------------------------------------------------------ ∂Φ/∂θ
    def _layer_param_grads(self, l, lower, upper, idx, out, with_bias=True):
        """Add Σ_batch ∂⟨B_l(lower), upper⟩/∂θ_l to ``out`` (Eq. 3.9), argmax frozen at ``idx``."""
        xp = self.xp
        layer = self.layers[l]
        kw, kb = f"{layer.name}.weight", f"{layer.name}.bias"
        if isinstance(layer, ConvLayer):
            g = self._unpool(l, upper, idx)  # (n, o, h_conv, w_conv)
            dW = conv2d_weight_grad(lower, g, kernel_size=layer.kernel, padding=layer.padding)
            db = conv2d_bias_grad(g) if with_bias else None
        else:
            flat = xp.reshape(lower, (lower.shape[0], -1))  # (n, c, h, w) -> (n, c·h·w)
            dW = linear_weight_grad(flat, upper)
            db = xp.sum(upper, axis=0) if with_bias else None
        out[kw] = dW if kw not in out else out[kw] + dW
        if db is not None:
            out[kb] = db if kb not in out else out[kb] + db

    def dphi_dtheta_ctx(self, x, state, ctx, beta=0.0, x_drive=None):
        """Σ_batch ∂Φ^β/∂θ at ``state`` for every parameter (Eq. 3.9; cost parameters: −β ∂C/∂θ).

        ``x_drive``: :meth:`input_drive` of this x, whose argmax layer 1 reuses.
        """
        xp = self.xp
        first = self.input_drive(x) if x_drive is None else x_drive
        indices = [first[1]] + [self._bottom_up(l, state[l - 1])[1] for l in range(1, len(self.layers))]
        out: dict = {}
        for l in range(len(self.layers)):
            self._layer_param_grads(l, self._below(x, state, l), state[l], indices[l], out)
        if beta != 0.0:
            for (w_k, term), c in zip(self.cost_terms, ctx):
                if w_k == 0.0:
                    continue
                for name, g in term.param_grads(self.params, state, c).items():
                    g = (-beta * w_k) * g
                    out[name] = g if name not in out else out[name] + g
        for name in self.params:
            if name not in out:  # cost-only parameters at β = 0, or with a zero weight
                out[name] = xp.zeros_like(self.params[name])
        return {k: out[k] for k in self.params}

    def dphi_dtheta(self, x, state, y=None, beta=0.0):
        """Σ over the batch of ∂Φ^β/∂θ for every parameter, keyed like ``params`` (Eq. 3.9)."""
        self._check_x(x)
        self._check_state(state, x.shape[0])
        ctx = self._nudge_ctx(x, y, beta)
        return self.dphi_dtheta_ctx(x, state, ctx, beta)

    # ------------------------------------------------------------------ inference
    def logits(self, state):
        """Readout of a settled state: s_L (mse) or W_out vec(s_L) + b_out (softmax)."""
        return self.readout_term.logits(self.params, state)

    def predict(self, x, T):
        """Class predictions after T free steps from zero (Eq. 3.8 with β = 0), shape (n,)."""
        from .settle import settle

        st = settle(self, x, T)
        return self.xp.argmax(self.logits(st.state), axis=1)

    def __repr__(self):
        return (f"CRNN({self.arch_name!r}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"readout={self.readout!r}, activation={self.activation!r}, dtype={self.dtype_name!r}, "
                f"backend={backend_name(self.xp)!r})")
