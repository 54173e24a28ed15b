"""The convolutional CRNN: parameters, primitive function Φ, its gradients and one dynamics step (SPEC.md §3).

Notation: s_0 = x is the input (never passed through ρ); s_1 … s_L are the neuron layers;
conv layer l has weights W_l (o, c, k, k), bias b_l (o,), padding p_l and pooling P_l;
fc layer l has W_l (out, in) and b_l (out,). For a batch of n samples every quantity below
is per sample; sums over the batch are explicit.

    B_l(s_{l−1}) = P_l(conv(s_{l−1}; W_l, p_l) + b_l)        conv layer      (Eq. 3.1)
                 = W_l vec(s_{l−1}) + b_l                     fc layer
    Φ(x, s; θ)   = Σ_l c_l ⟨B_l(s_{l−1}), s_l⟩,  c_l = ω^{l−L}                 (Eqs. 3.2, 3.18)
    Φ^β          = Φ − β C,  C = Σ_k w_k C_k                                   (Eqs. 3.5-3.6)
    u_l = (1/c_l) ∂Φ^β/∂s_l = B_l(s_{l−1}) + ω T_l(s_{l+1}) − (β/c_l) ∂C/∂s_l  (Eqs. 3.7, 3.18)
    T_l(s_{l+1}) = conv_transpose(P*_{l+1}(s_{l+1}); W_{l+1})   (P* = unpool at the current argmax)
                 = reshape(W_{l+1}ᵀ s_{l+1})                    (fc above)
    s_l ← ρ(u_l) for all l at once                                              (Eq. 3.8)
    ∂Φ/∂W_l = c_l conv2d_weight_grad(s_{l−1}, P*_l(s_l)),  ∂Φ/∂b_l = c_l Σ P*_l(s_l)   (Eq. 3.9)
            = c_l s_lᵀ vec(s_{l−1}),                      = c_l Σ s_l       (fc)

ω is the feedback gain (default 1: Laborieux et al.'s network, every c_l = 1 and u = ∂Φ^β/∂s).

The energy protocol (SPEC.md Eq. 3.12) is what every learning algorithm uses:
``init_state(n)``, ``nudge(x, y, beta)`` → :class:`Nudge`, ``drive(x, s, nudge)``,
``step(x, s, nudge)``, ``update(x, s, nudge, layers=B)`` (a Gauss–Seidel block, Eq. 3.13),
``dphi_dtheta(x, s, nudge)`` and ``dphi_dtheta_diff`` (Eq. 4.6), and for BPTT and the
equilibrium gradient the frozen-argmax linear parts ``hessian_vector(μ, idx)`` and
``dphi_dtheta_tangent(x, s, μ, idx)``.

Max pooling inside Φ is piecewise linear: with the argmax frozen, Φ is bilinear in
neighbouring layers, which makes its Hessian in s symmetric (used by BPTT, Eq. 5.2).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType
from typing import Any

import numpy as np

from ..backend import Array, backend_name, device_of, dtype_name, namespace_of, resolve, to_numpy
from ..ops.activations import get_activation
from .arch import parse_arch
from .layers import make_layers, param_specs
from .params import DEFAULT_RADIUS, NETWORK_INITS, init_params, orthogonal_init
from .readout import make_readout

__all__ = ["CRNN", "Drive", "Nudge", "FreeBase"]

DType = Any
"""A floating dtype: "float32"/"float64", a NumPy type or dtype, or a dtype of the network's namespace."""


@dataclass
class Drive:
    """Everything one evaluation of ∂Φ^β/∂s produces: the pre-activations u_l and the argmaxes."""

    u: list  # u_l = ∂Φ^β/∂s_l, shape of s_l
    indices: list  # max-pool indices of layer l (None unless P_l is max)
    bottom_up: list = field(default_factory=list)  # B_l(s_{l−1})


@dataclass(frozen=True)
class FreeBase:
    """What a difference-variable nudged phase (Eq. 4.8) keeps of the free state s⁰, built once per batch.

    state : s⁰_1 … s⁰_L; u : the free drives u⁰_l at s⁰ (Eq. 3.18, β = 0);
    pre_pool : per layer, z⁰_l = conv(s⁰_{l−1}) + b_l before max pooling (None without max pooling,
        and for layer 1, whose input x no phase changes);
    indices : the max-pool argmaxes at s⁰ (None without max pooling).
    """

    state: list
    u: list
    pre_pool: list
    indices: list


@dataclass(frozen=True)
class Nudge:
    """What one batch's evaluations of Φ^β share: β, the prepared cost context and B_1(x) (Eqs. 3.1, 3.6, 3.12).

    Build it with :meth:`CRNN.nudge`; :meth:`at` gives the same batch at another β (the phases
    of one EP estimate share everything but β). It holds for the parameters it was built with:
    B_1(x) and the teacher features are computed then, so build a new one after an update.

    beta : float, the nudging strength β of Φ^β = Φ − βC (0: the free dynamics).
    ctx : list or None, one prepared context per cost term (one-hot targets, teacher features);
        None when no targets were given, which allows only β = 0.
    x_drive : (B_1(x), argmax_1), constant while x is: every phase and gradient of the batch reuses it.
    prepared : one entry per layer, what the layer builds once from its parameters for the many
        drives of a batch (a conv layer's weight matrix, Eq. 2.1; None for an fc layer), or None
        (each drive then builds its own).
    """

    beta: float
    ctx: list | None
    x_drive: tuple
    prepared: tuple | None = None

    def prep(self, l: int) -> Array | None:
        """Layer l's prepared operator (None when there is none)."""
        return None if self.prepared is None else self.prepared[l]

    def at(self, beta: float) -> "Nudge":
        """The same batch and cost context at nudging strength ``beta``."""
        if beta != 0.0 and self.ctx is None:
            raise ValueError(f"a nudged evaluation (beta={beta}) needs targets y")
        return replace(self, beta=float(beta))


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
    dtype : "float32" | "float64", or the same as a NumPy type or dtype (``np.float32``) or the namespace's own
    xp : namespace, backend name or None (process default).
    seed : int
        Initialisation seed (Eq. 3.10): every weight and bias is drawn uniform in
        ±weight_scale/√fan_in from ``numpy.random.default_rng(seed)`` in parameter order,
        fan_in = c·k·k for conv and the input width for fc (PyTorch's default range);
        biases use ±1/√fan_in.
    weight_scale : float
        Multiplies the weight range (not the biases); < 1 makes the dynamics contract.
        For ``init="uniform"`` only.
    init : "uniform" | "orthogonal" | "delta-orthogonal"
        ``uniform``: Eq. 3.10 as above (the default). The orthogonal inits (Eq. 3.16) draw orthogonal
        weights from the same generator, scale W_2 … W_L so that the linearised step has spectral radius
        ``radius`` where ρ is in its linear piece (Eq. 3.17), and set the biases so that the mean
        pre-activation of each channel is the centre of that piece at a reference state.
    radius : float or None
        The radius r of Eq. 3.16 (default 0.85); only for the orthogonal inits.
    feedback : float
        The feedback gain ω ∈ (0, 1] of Eq. 3.18: layer l's energy weight is c_l = ω^{l−L}, so the
        dynamics read u_l = B_l + ω T_l − (β/c_l) ∂C/∂s_l. 1 (the default) is the plain network
        of Eqs. 3.2-3.8; smaller values weaken the top-down term against the bottom-up one, which
        lets the forward gain stay near 1 in a deep network while its settling map contracts.

    Attributes
    ----------
    params : dict[str, array]
        PyTorch names and layouts: ``conv1.weight`` (o, c, k, k), ``conv1.bias`` (o,),
        ``fc1.weight`` (out, in), ``fc1.bias`` (out,), …, in a fixed order.
    layers : tuple of :class:`~pyeqprop.model.layers.ConvMap` / ``DenseMap``
        The neuron layers s_1 … s_L, each owning its maps and adjoints.
    cost_terms : list of (weight, term)
        The readout first, then any intermediate-signal terms (``add_cost_term``).
    """

    def __init__(self, arch: str, input_shape: Sequence[int], *, num_classes: int = 10, readout: str = "mse",
                 activation: str = "hard_sigmoid", dtype: DType = "float32", xp: ModuleType | str | None = None,
                 seed: int = 0, weight_scale: float = 1.0, init: str = "uniform",
                 radius: float | None = None, feedback: float = 1.0) -> None:
        self.xp = resolve(xp)
        self.check_arguments(arch, input_shape)
        self.check_init(init, radius, weight_scale)
        self.check_feedback(feedback)
        dtype = dtype_name(dtype, self.xp)
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
        self.layers = make_layers(self.arch.layers)
        self.feedback = float(feedback)
        L = len(self.layers)
        self.layer_weights = tuple(self.feedback ** (l - (L - 1)) for l in range(L))  # c_l, Eq. 3.18 (0-based l)
        term = make_readout(readout, self.arch, self.num_classes)
        self.readout_term = term
        self.cost_terms: list = [(1.0, term)]
        self.device = device_of(self.xp.zeros((1,), dtype=self.dtype))  # where states and parameters live
        self.params: dict = {}
        self.init = init
        self.radius = None if init == "uniform" else float(DEFAULT_RADIUS if radius is None else radius)
        rng = np.random.default_rng(seed)
        specs = param_specs(self.layers) + term.param_specs()
        if init == "uniform":
            self._init_params(specs, rng)
        else:  # Eq. 3.16: the shapes and order first, then the calibrated values
            self._init_params([replace(spec, init="zeros") for spec in specs], rng)
            orthogonal_init(self, rng, radius=self.radius, delta=init == "delta-orthogonal")

    # ------------------------------------------------------------------ parameters
    def _init_params(self, specs, rng):
        taken = [spec.name for spec in specs if spec.name in self.params]
        if taken:
            raise ValueError(f"parameter {taken[0]!r} already exists")
        self.params.update(init_params(specs, rng, dtype=self.dtype_name, xp=self.xp, device=self.device,
                                       weight_scale=self.weight_scale))

    def add_cost_term(self, term: Any, weight: float, *, seed: int | None = None) -> Any:
        """Add an intermediate cost term C_k with weight w_k (Eq. 3.5) and initialise its parameters."""
        rng = np.random.default_rng(self.seed + 1000 + len(self.cost_terms) if seed is None else seed)
        self._init_params(term.param_specs(), rng)
        self.cost_terms.append((float(weight), term))
        return term

    def network_param_names(self) -> list[str]:
        """Names of the parameters that appear in Φ (not only in the cost)."""
        return [s.name for s in param_specs(self.layers)]

    def param_owners(self) -> dict[str, str]:
        """The layer each parameter belongs to, in ``params`` order: its own layer (neuron or readout);
        for a local head or distillation map, the neuron layer it reads (whose rate it takes, Eq. 8.3)."""
        own = {layer.name for layer in self.layers}
        if self.arch.readout is not None:
            own.add(self.arch.readout.name)
        out = {}
        for _, term in self.cost_terms:
            for spec in term.param_specs():
                prefix = spec.name.rsplit(".", 1)[0]
                out[spec.name] = prefix if prefix in own else self.layers[term.layer].name
        return {k: out.get(k, k.rsplit(".", 1)[0]) for k in self.params}

    def conv_layer_indices(self) -> list[int]:
        """0-based indices of the convolutional neuron layers, in order (what ``--local-layers 1,3`` counts)."""
        return [l for l, layer in enumerate(self.layers) if layer.kind == "conv"]

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        return [(batch, *shape) for shape in self.arch.state_shapes]

    def init_state(self, batch: int) -> list[Array]:
        """Zero states s_1 … s_L for a batch (the start of every free phase, Eq. 3.8)."""
        return [self.xp.zeros(shape, dtype=self.dtype, device=self.device) for shape in self.state_shapes(batch)]

    # ------------------------------------------------------------------ checks
    @staticmethod
    def check_arguments(arch, input_shape) -> None:
        """Raise a ``TypeError`` naming the value unless ``arch`` is a string and ``input_shape`` a sequence
        (their contents are :func:`~pyeqprop.model.arch.parse_arch`'s to check)."""
        if not isinstance(arch, str):
            raise TypeError(f"arch must be a spec string such as 'c16m-c32m' or a preset name, got {arch!r}")
        if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__len__"):
            raise TypeError(f"input_shape must be a sequence (c, h, w) of three integers, got {input_shape!r}")

    @staticmethod
    def check_init(init, radius, weight_scale) -> None:
        """Raise a ``ValueError`` naming the value unless ``init`` is one of :data:`NETWORK_INITS` and ``radius``
        (> 0) is given only with an orthogonal init, ``weight_scale`` ≠ 1 only with the uniform one (Eq. 3.16)."""
        if init not in NETWORK_INITS:
            raise ValueError(f"init must be one of {', '.join(NETWORK_INITS)}, got {init!r}")
        if init == "uniform" and radius is not None:
            raise ValueError(f"radius={radius!r} applies to the orthogonal inits (Eq. 3.16); init='uniform' is "
                             "scaled by weight_scale")
        if radius is not None and not (isinstance(radius, (int, float)) and radius > 0):
            raise ValueError(f"radius must be a number > 0, got {radius!r}")
        if init != "uniform" and weight_scale != 1.0:
            raise ValueError(f"weight_scale={weight_scale!r} applies to init='uniform' (Eq. 3.10); init={init!r} "
                             "is scaled by radius")

    @staticmethod
    def check_feedback(feedback) -> None:
        """Raise a ``ValueError`` naming the value unless the feedback gain ω is a number in (0, 1] (Eq. 3.18)."""
        if isinstance(feedback, bool) or not isinstance(feedback, (int, float)) or not 0.0 < feedback <= 1.0:
            raise ValueError(f"feedback must be a number in (0, 1] (the gain ω of the top-down term, Eq. 3.18), "
                             f"got {feedback!r}")

    def check_input(self, x: Array) -> None:
        """Raise unless x is a non-empty (n, c, h, w) batch of the network's input shape, namespace and dtype."""
        xp = namespace_of(x)
        if backend_name(xp) != backend_name(self.xp):
            raise TypeError(f"x lives in namespace {backend_name(xp)!r} but the network in {backend_name(self.xp)!r}")
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"x must have shape (n, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}); a batch needs at least one sample")
        if x.dtype != self.dtype:
            raise ValueError(f"x has dtype {x.dtype} but the network uses {self.dtype_name}")

    def check_state(self, state: list[Array], n: int) -> None:
        """Raise unless ``state`` is a list of L arrays of the state shapes for a batch of n."""
        shapes = self.state_shapes(n)
        if len(state) != len(shapes):
            raise ValueError(f"state must have {len(shapes)} layers, got {len(state)}")
        for l, (s, shape) in enumerate(zip(state, shapes)):
            if tuple(s.shape) != shape:
                raise ValueError(f"state layer {l + 1} must have shape {shape}, got {tuple(s.shape)}")

    def check_labels(self, y: Array, n: int) -> None:
        """Raise unless y is (n,) integer class labels in 0 … num_classes − 1, in the network's namespace.

        The range check reads the smallest and largest label back to the host: one small transfer
        per batch, next to the settling's T1 + T2 steps.
        """
        xp = namespace_of(y)
        if backend_name(xp) != backend_name(self.xp):
            raise TypeError(f"y lives in namespace {backend_name(xp)!r} but the network in {backend_name(self.xp)!r}")
        if y.ndim != 1 or y.shape[0] != n:
            raise ValueError(f"y must have shape ({n},), got {tuple(y.shape)}")
        if not xp.isdtype(y.dtype, "integral"):
            raise ValueError(f"y must hold integer class labels, got dtype {y.dtype}")
        if n == 0:
            return
        lo, hi = (int(v) for v in to_numpy(xp.stack([xp.min(y), xp.max(y)])))
        if lo < 0 or hi >= self.num_classes:
            bad = lo if lo < 0 else hi
            raise ValueError(f"y holds the label {bad}, outside 0 … {self.num_classes - 1} "
                             f"(the network has num_classes={self.num_classes})")

    # ------------------------------------------------------------------ the nudge of a batch
    def prepare(self, x: Array, y: Array | None) -> list:
        """Per-batch cost context: one entry per cost term (one-hot targets, teacher features)."""
        if y is not None:
            self.check_labels(y, x.shape[0])
        return [term.prepare(self.params, x, y) for _, term in self.cost_terms]

    def input_drive(self, x: Array, prep: Array | None = None) -> tuple:
        """B_1(x) and its argmax: constant while x is, so a batch computes it once (Eq. 3.1)."""
        return self.layers[0].bottom_up(self.params, x, prep)

    def prepare_layers(self) -> tuple:
        """Each layer's operator built once from the current parameters (:meth:`ConvMap.prepare`)."""
        return tuple(layer.prepare(self.params) for layer in self.layers)

    def nudge(self, x: Array, y: Array | None = None, beta: float = 0.0) -> Nudge:
        """The :class:`Nudge` of a batch: checks x (and y), prepares the cost context, computes B_1(x).

        ``y`` may be None for the free dynamics (β = 0); a nudged evaluation needs it.
        """
        self.check_input(x)
        if beta != 0.0 and y is None:
            raise ValueError(f"a nudged evaluation (beta={beta}) needs targets y")
        ctx = self.prepare(x, y) if y is not None else None
        prepared = self.prepare_layers()
        return Nudge(float(beta), ctx, self.input_drive(x, prepared[0]), prepared)

    def _free(self, x, nudge):
        """``nudge``, or the free nudge of x when None (checking x)."""
        return self.nudge(x) if nudge is None else nudge

    # ------------------------------------------------------------------ Φ and its state gradient
    def drive(self, x: Array, state: list[Array], nudge: Nudge | None = None, *, layers: Iterable[int] | None = None,
              known: dict | None = None) -> Drive:
        """u_l = (1/c_l) ∂Φ^β/∂s_l = B_l + ω T_l − (β/c_l) ∂C/∂s_l (Eqs. 3.7, 3.18) with the argmaxes used;
        β from ``nudge`` (0 when None). With ω = 1 (every c_l = 1) this is ∂Φ^β/∂s_l.

        ``layers``: the 0-based layers whose u_l is wanted (default all; the others are None in
        the result). u_l needs B_l(s_{l−1}) and the argmax of layer l + 1, so only those bottom-up
        drives are computed. ``known``: {l: (B_l, argmax_l)} already computed at this state (a
        Gauss–Seidel half-sweep reuses the layers the previous half did not change, Eq. 3.13).
        """
        nudge = self._free(x, nudge)
        self.check_state(state, x.shape[0])
        L = len(self.layers)
        if layers is None:  # the synchronous step: every layer (no set arithmetic in the settling loop)
            want = need = range(L)
        else:
            want = sorted(layers)
            need = sorted(set(want) | {l + 1 for l in want if l + 1 < L})
        bu, idx = [None] * L, [None] * L
        for l in need:
            if l == 0:
                bu[0], idx[0] = nudge.x_drive
            elif known is not None and l in known:
                bu[l], idx[l] = known[l]
            else:
                bu[l], idx[l] = self.layers[l].bottom_up(self.params, state[l - 1], nudge.prep(l))
        u = [None] * L
        omega, c = self.feedback, self.layer_weights
        for l in want:
            u[l] = bu[l]
            if l + 1 < L:
                td = self.layers[l + 1].top_down(self.params, state[l + 1], idx[l + 1], state[l].shape,
                                                 nudge.prep(l + 1))
                if omega != 1.0:  # the settling loop's hot path: scale the fresh T_l in place, no copy
                    td *= omega
                u[l] = u[l] + td
        beta = nudge.beta
        if beta != 0.0:
            for w_k, grads in self._weighted_cost_state_grads(state, nudge.ctx, None if layers is None else want):
                for l, g in grads.items():
                    if u[l] is not None:
                        u[l] = u[l] - (beta * w_k / c[l]) * g
        return Drive(u, idx, bu)

    def _weighted_cost_state_grads(self, state, ctx, layers=None):
        """(w_k, {l: ∂C_k/∂s_l}) of every weighted cost term, or only of those on ``layers``."""
        if ctx is None:
            raise ValueError("a nudged evaluation (beta != 0) needs targets y")
        for (w_k, term), c in zip(self.cost_terms, ctx):
            if w_k != 0.0 and (layers is None or term.layer in layers):
                yield w_k, term.state_grads(self.params, state, c)

    def dphi_ds(self, x: Array, state: list[Array], nudge: Nudge | None = None) -> list[Array]:
        """∂Φ^β/∂s_l = c_l u_l for l = 1 … L, per sample (Eqs. 3.7, 3.18)."""
        return [c * a for c, a in zip(self.layer_weights, self.drive(x, state, nudge).u)]

    def step(self, x: Array, state: list[Array], nudge: Nudge | None = None) -> list[Array]:
        """One synchronous update of every layer, s_l ← ρ(u_l) (Eq. 3.8; u_l = ∂Φ^β/∂s_l when ω = 1)."""
        d = self.drive(x, state, nudge)
        return [self.act.fn(u) for u in d.u]

    def update(self, x: Array, state: list[Array], nudge: Nudge | None = None, *, layers: Iterable[int],
               known: dict | None = None) -> tuple[list[Array], Drive]:
        """s_l ← ρ(∂Φ^β/∂s_l) for the 0-based ``layers`` only, the others kept: a block update (Eq. 3.13).

        Returns (new state, the drive used); ``known`` as in :meth:`drive`.
        """
        d = self.drive(x, state, nudge, layers=layers, known=known)
        return [s if u is None else self.act.fn(u) for s, u in zip(state, d.u)], d

    def cost(self, x: Array, state: list[Array], nudge: Nudge) -> Array:
        """Total cost C = Σ_k w_k C_k per sample, shape (n,) (Eq. 3.5); needs a nudge built with targets."""
        if nudge is None or nudge.ctx is None:
            raise ValueError("the cost needs targets y")
        total = None
        for (w_k, term), c in zip(self.cost_terms, nudge.ctx):
            if w_k == 0.0:
                continue
            v = w_k * term.value(self.params, state, c)
            total = v if total is None else total + v
        return total

    def phi(self, x: Array, state: list[Array], nudge: Nudge | None = None) -> Array:
        """Φ^β(x, s; θ) = Σ_l c_l ⟨B_l, s_l⟩ − β C per sample, shape (n,) (Eqs. 3.2, 3.6, 3.18)."""
        xp = self.xp
        nudge = self._free(x, nudge)
        self.check_state(state, x.shape[0])
        total = None
        for l, layer in enumerate(self.layers):
            b_l = nudge.x_drive[0] if l == 0 else layer.bottom_up(self.params, state[l - 1], nudge.prep(l))[0]
            term = self.layer_weights[l] * xp.sum(xp.reshape(b_l * state[l], (x.shape[0], -1)), axis=1)  # (n,)
            total = term if total is None else total + term
        if nudge.beta != 0.0:
            total = total - nudge.beta * self.cost(x, state, nudge)
        return total

    # ------------------------------------------------------------------ ∂Φ/∂θ
    def _argmaxes(self, nudge, state):
        """Every layer's max-pool argmax at ``state`` (layer 1's from the nudge's B_1(x)); None where
        a layer has no max pooling, which then costs no convolution."""
        return [nudge.x_drive[1]] + [self.layers[l].argmax(self.params, state[l - 1], nudge.prep(l))
                                     for l in range(1, len(self.layers))]

    def _weighted(self, l, grads):
        """Layer l's (dW, db) of ⟨B_l, s_l⟩ times its energy weight c_l (Eq. 3.18; exact, c_l = 1, when ω = 1)."""
        c = self.layer_weights[l]
        return tuple(None if g is None else c * g for g in grads)

    @staticmethod
    def _accumulate(out, name, g):
        out[name] = g if name not in out else out[name] + g

    def dphi_dtheta(self, x: Array, state: list[Array], nudge: Nudge | None = None) -> dict[str, Array]:
        """Σ_batch ∂Φ^β/∂θ at ``state`` for every parameter, keyed like ``params`` (Eq. 3.9; layer l's
        terms carry its energy weight c_l, Eq. 3.18).

        Cost-only parameters (readout, heads, maps) get −β w_k ∂C_k/∂θ; zero at β = 0.
        """
        xp = self.xp
        nudge = self._free(x, nudge)
        self.check_state(state, x.shape[0])
        indices = self._argmaxes(nudge, state)
        out: dict = {}
        for l, layer in enumerate(self.layers):
            dW, db = self._weighted(l, layer.param_adjoint(x if l == 0 else state[l - 1], state[l], indices[l]))
            self._accumulate(out, layer.weight, dW)
            self._accumulate(out, layer.bias, db)
        beta = nudge.beta
        if beta != 0.0:
            for (w_k, term), c in zip(self.cost_terms, nudge.ctx):
                if w_k == 0.0:
                    continue
                for name, g in term.param_grads(self.params, state, c).items():
                    self._accumulate(out, name, (-beta * w_k) * g)
        for name in self.params:
            if name not in out:  # cost-only parameters at β = 0, or with a zero weight
                out[name] = xp.zeros_like(self.params[name])
        return {k: out[k] for k in self.params}

    def dphi_dtheta_diff(self, x: Array, state: list[Array], nudge: Nudge, state2: list[Array],
                         nudge2: Nudge) -> dict[str, Array]:
        """Σ_batch [∂Φ^β/∂θ(s) − ∂Φ^{β2}/∂θ(s2)], the differences formed before the reductions (Eq. 4.6).

        What an EP estimator subtracts (Eqs. 4.1-4.3): the two terms are up to 10⁷ times their
        difference at the bottom layers, so subtracting after each reduction loses that many
        digits in float32; Φ is bilinear in neighbouring layers, so the difference is a sum of
        ⟨a − a2, P*s⟩ and ⟨a2, P*s − P*2 s2⟩ terms, each at its own phase's argmax. Cost-only
        parameters: −β w_k ∂C_k/∂θ(s) + β2 w_k ∂C_k/∂θ(s2).
        """
        self.check_state(state, x.shape[0])
        self.check_state(state2, x.shape[0])
        idx, idx2 = self._argmaxes(nudge, state), self._argmaxes(nudge2, state2)
        out: dict = {}
        for l, layer in enumerate(self.layers):
            a, a2 = (x, x) if l == 0 else (state[l - 1], state2[l - 1])
            dW, db = self._weighted(l, layer.param_adjoint_diff(a, state[l], idx[l], a2, state2[l], idx2[l]))
            out[layer.weight], out[layer.bias] = dW, db
        return self._with_cost_params(out, ((state, nudge, 1.0), (state2, nudge2, -1.0)))

    def _with_cost_params(self, out: dict, phases) -> dict:
        """``out`` completed: each phase's (state, nudge, sign) adds −sign β w_k ∂C_k/∂θ of the cost
        terms' own parameters (Eq. 4.6; none at β = 0), and parameters nothing touched get zeros."""
        for st, nd, sign in phases:
            if nd.beta == 0.0:
                continue
            for (w_k, term), c in zip(self.cost_terms, nd.ctx):
                if w_k != 0.0:
                    for name, g in term.param_grads(self.params, st, c).items():
                        self._accumulate(out, name, (-sign * nd.beta * w_k) * g)
        for name in self.params:
            if name not in out:
                out[name] = self.xp.zeros_like(self.params[name])
        return {k: out[k] for k in self.params}

    # ------------------------------------------------------------------ difference variables (Eq. 4.8)
    def free_base(self, x: Array, state: list[Array], nudge: Nudge | None = None) -> FreeBase:
        """The :class:`FreeBase` of free state s⁰ = ``state``: u⁰ = the free drive at s⁰, and z⁰, argmax⁰ of
        every max-pooling layer above the first (Eq. 4.8). ``nudge``: the batch's (its β is not used)."""
        nudge = self._free(x, nudge)
        self.check_state(state, x.shape[0])
        d = self.drive(x, state, nudge.at(0.0) if nudge.beta != 0.0 else nudge)
        z, idx = [None] * len(self.layers), list(d.indices)
        for l in range(1, len(self.layers)):
            z[l], _ = self.layers[l].pre_pool(self.params, state[l - 1], nudge.prep(l))
        return FreeBase(list(state), d.u, z, idx)

    def _cost_layers(self) -> set:
        return {term.layer for w_k, term in self.cost_terms if w_k != 0.0}

    def _phase_state(self, base: FreeBase, delta: list[Array], layers) -> list[Array]:
        """s⁰ + δ on ``layers`` (those a cost term reads), s⁰ elsewhere: what the cost terms are evaluated at."""
        full = list(base.state)
        for l in layers:
            full[l] = base.state[l] + delta[l]
        return full

    def delta_drive(self, x: Array, base: FreeBase, delta: list[Array], nudge: Nudge, *,
                    layers: Iterable[int] | None = None, known: dict | None = None) -> Drive:
        """Δu_l = u_l^β(s⁰ + δ) − u⁰_l, formed from δ without s⁰ + δ (Eq. 4.8):

            Δu_l = ΔB_l(δ_{l−1}) + ω ΔT_l(δ_{l+1}) − (β w_k/c_l) ∂C_k/∂s_l(s⁰ + δ),

        ΔB, ΔT the layers' ``bottom_up_delta``/``top_down_delta`` (their argmax at s⁰ + δ). Returns a
        :class:`Drive` whose ``u`` holds Δu_l, ``indices`` the argmaxes at s⁰ + δ and ``bottom_up``
        the ΔB_l (None at layer 1: x is fixed). ``layers``, ``known`` as in :meth:`drive`.
        """
        L = len(self.layers)
        if layers is None:
            want = need = range(L)
        else:
            want = sorted(layers)
            need = sorted(set(want) | {l + 1 for l in want if l + 1 < L})
        dB, idx = [None] * L, [None] * L
        for l in need:
            if l == 0:
                idx[0] = base.indices[0]
            elif known is not None and l in known:
                dB[l], idx[l] = known[l]
            else:
                dB[l], idx[l] = self.layers[l].bottom_up_delta(self.params, delta[l - 1], base.pre_pool[l],
                                                               base.indices[l], nudge.prep(l))
        du = [None] * L
        omega, c = self.feedback, self.layer_weights
        for l in want:
            u = dB[l]
            if l + 1 < L:
                td = self.layers[l + 1].top_down_delta(self.params, delta[l + 1], base.state[l + 1], idx[l + 1],
                                                       base.indices[l + 1], delta[l].shape, nudge.prep(l + 1))
                if omega != 1.0:
                    td *= omega
                u = td if u is None else u + td
            du[l] = self.xp.zeros_like(delta[l]) if u is None else u
        beta = nudge.beta
        if beta != 0.0:
            cost_layers = self._cost_layers() if layers is None else self._cost_layers() & set(want)
            full = self._phase_state(base, delta, cost_layers)
            for w_k, grads in self._weighted_cost_state_grads(full, nudge.ctx, None if layers is None else want):
                for l, g in grads.items():
                    if du[l] is not None:
                        du[l] = du[l] - (beta * w_k / c[l]) * g
        return Drive(du, idx, dB)

    def delta_update(self, x: Array, base: FreeBase, delta: list[Array], nudge: Nudge, *,
                     layers: Iterable[int] | None = None, known: dict | None = None) -> tuple[list[Array], Drive]:
        """δ_l ← ρ(u⁰_l + Δu_l) − ρ(u⁰_l) (Eq. 4.8, the difference of ρ by Eq. 2.12) for the 0-based
        ``layers`` (default all), the others kept. Returns (new δ, the :meth:`delta_drive` used)."""
        d = self.delta_drive(x, base, delta, nudge, layers=layers, known=known)
        return [dl if du is None else self.act.delta(u0, du) for dl, u0, du in zip(delta, base.u, d.u)], d

    def dphi_dtheta_delta_diff(self, x: Array, base: FreeBase, delta: list[Array], nudge: Nudge,
                               delta2: list[Array] | None, nudge2: Nudge) -> dict[str, Array]:
        """Σ_batch [∂Φ^β/∂θ(s⁰ + δ) − ∂Φ^{β2}/∂θ(s⁰ + δ²)] from the differences δ, δ² (Eq. 4.8): what
        :meth:`dphi_dtheta_diff` gives, with no state difference ever formed. ``delta2`` None: the free
        phase itself (δ² = 0, at s⁰'s argmaxes). Cost-only parameters as in (4.6), at s⁰ + δ.
        """
        phases = [(delta, nudge), (delta2, nudge2)]
        args = []
        for d, nd in phases:
            if d is None:
                args.append((None, list(base.indices)))
                continue
            idx = [base.indices[0]] + [None if base.indices[l] is None else
                                       self.layers[l].bottom_up_delta(self.params, d[l - 1], base.pre_pool[l],
                                                                      base.indices[l], nd.prep(l))[1]
                                       for l in range(1, len(self.layers))]
            args.append((d, idx))
        (d1, idx1), (d2, idx2) = args
        out: dict = {}
        for l, layer in enumerate(self.layers):
            a = x if l == 0 else base.state[l - 1]
            da1 = None if l == 0 or d1 is None else d1[l - 1]
            da2 = None if l == 0 or d2 is None else d2[l - 1]
            grads = layer.param_adjoint_delta(a, da1, base.state[l], None if d1 is None else d1[l], idx1[l],
                                              da2, None if d2 is None else d2[l], idx2[l])
            out[layer.weight], out[layer.bias] = self._weighted(l, grads)
        cost_layers = self._cost_layers()
        return self._with_cost_params(out, [(base.state if d is None else self._phase_state(base, d, cost_layers),
                                             nd, sign) for d, nd, sign in ((d1, nudge, 1.0), (d2, nudge2, -1.0))])

    # ------------------------------------------------------------------ frozen-argmax linear parts (BPTT)
    def hessian_vector(self, mu: list[Array | None], indices: list) -> list[Array | None]:
        """(∂u/∂s)ᵀ μ at frozen argmaxes ``indices``: what BPTT propagates back through a step (Eq. 5.3).

        (∂u/∂s)ᵀ μ)_l = ω P_l(conv(μ_{l−1}; W_l)) + T_l(μ_{l+1}), with μ_0 = 0 and P_l the
        selection at the argmax: the drive of Eq. 3.7 without biases or input, applied to μ, its
        bottom-up term times the feedback gain ω (Eq. 3.18). With ω = 1 it is H μ = ∂²Φ/∂s² · μ,
        symmetric because Φ is bilinear in neighbouring layers. An entry of μ may be None (zero
        on that layer, as in a Gauss–Seidel half-sweep, Eq. 5.6); an output entry none of whose
        neighbours carries μ is None too.
        """
        return self._linear_drive(mu, indices, below=self.feedback, above=1.0)

    def jacobian_vector(self, mu: list[Array | None], indices: list) -> list[Array | None]:
        """(∂u/∂s) μ at frozen argmaxes: P_l(conv(μ_{l−1}; W_l)) + ω T_l(μ_{l+1}) (Eqs. 3.17, 3.18).

        The transpose of :meth:`hessian_vector`; the two are equal when ω = 1.
        """
        return self._linear_drive(mu, indices, below=1.0, above=self.feedback)

    def symmetric_hessian_vector(self, mu: list[Array | None], indices: list) -> list[Array | None]:
        """M^{−1/2} H_Φ M^{−1/2} μ = √ω (P_l(conv(μ_{l−1}; W_l)) + T_l(μ_{l+1})), M = diag(c_l) (Eq. 3.18).

        The symmetric operator similar to ∂u/∂s = M⁻¹ H_Φ (H_Φ = ∂²Φ/∂s², symmetric): what the
        equilibrium gradient (Eq. 5.7) and the spectral radius (Eq. 3.17) work with. Equal to
        :meth:`hessian_vector` when ω = 1.
        """
        g = self.feedback ** 0.5
        return self._linear_drive(mu, indices, below=g, above=g)

    def _linear_drive(self, mu, indices, *, below: float, above: float):
        """below · P_l(conv(μ_{l−1}; W_l)) + above · T_l(μ_{l+1}) per layer (None entries as in
        :meth:`hessian_vector`); a gain of 1 multiplies nothing."""
        L = len(self.layers)
        out = []
        for l in range(L):
            term = None
            if l > 0 and mu[l - 1] is not None:
                term = self.layers[l].bottom_up_linear(self.params, mu[l - 1], indices[l])
                if below != 1.0:  # a fresh array: scaled in place (BPTT and the solve call this every step)
                    term *= below
            if l < L - 1 and mu[l + 1] is not None:
                shape = tuple(mu[l].shape) if mu[l] is not None else (mu[l + 1].shape[0], *self.arch.state_shapes[l])
                td = self.layers[l + 1].top_down(self.params, mu[l + 1], indices[l + 1], shape)
                if above != 1.0:
                    td *= above
                term = td if term is None else term + td
            if term is None and all(m is not None for m in mu):
                term = self.xp.zeros((mu[l].shape[0], *self.arch.state_shapes[l]), dtype=self.dtype,
                                     device=self.device)
            out.append(term)
        return out

    def dphi_dtheta_tangent(self, x: Array, state: list[Array], mu: list[Array | None],
                            indices: list) -> dict[str, Array]:
        """(∂u/∂θ)ᵀ μ summed over the batch at frozen argmaxes (Eq. 5.4), keyed by the network's parameters.

        By the product rule on Eq. 3.9: ∂/∂W_l ← conv2d_weight_grad(s_{l−1}, P*_l(μ_l)) +
        ω conv2d_weight_grad(μ_{l−1}, P*_l(s_l)) (μ_0 = 0: x is fixed; ω the feedback gain of
        Eq. 3.18, through which W_l reaches u_{l−1}), ∂/∂b_l ← Σ P*_l(μ_l). With ω = 1 it is
        D_s(Σ_batch ∂Φ/∂θ)(s) · μ. An entry of μ may be None (zero on that layer); its terms are skipped.
        """
        out: dict = {}
        for l, layer in enumerate(self.layers):
            if mu[l] is not None:
                dW, db = layer.param_adjoint(x if l == 0 else state[l - 1], mu[l], indices[l])  # s_{l−1} ⊗ P*(μ_l)
                self._accumulate(out, layer.weight, dW)
                self._accumulate(out, layer.bias, db)
            if l > 0 and mu[l - 1] is not None:
                dW, _ = layer.param_adjoint(mu[l - 1], state[l], indices[l], with_bias=False)  # μ_{l−1} ⊗ P*(s_l)
                if self.feedback != 1.0:
                    dW *= self.feedback  # a fresh array
                self._accumulate(out, layer.weight, dW)
        return out

    # ------------------------------------------------------------------ inference
    def logits(self, state: list[Array]) -> Array:
        """Readout of a settled state: s_L (mse) or W_out vec(s_L) + b_out (softmax)."""
        return self.readout_term.logits(self.params, state)

    def __repr__(self) -> str:
        return (f"CRNN({self.arch_name!r}, input_shape={self.input_shape}, num_classes={self.num_classes}, "
                f"readout={self.readout!r}, activation={self.activation!r}, dtype={self.dtype_name!r}, "
                f"backend={backend_name(self.xp)!r})")
