"""SGD with momentum and weight decay, the cosine schedule and per-layer rates (SPEC.md §8).

Notation: θ a parameter tensor, g its gradient estimate (∂L/∂θ, or the EP estimate), v its
velocity buffer (zero at the start), μ the momentum, λ the weight decay, η_θ the learning
rate of θ's layer, s a global scale (``lr_scale``), e the epoch (0-based).

    v ← μ v + (g + λ θ)                    weight decay joins the gradient before momentum (Eq. 8.1)
    θ ← θ − s·η_θ·v
    η(e) = η_min + ½(η_0 − η_min)(1 + cos(π e / E_cos))   for e ≤ E_cos,  η_min after   (Eq. 8.2)
    η_θ  = r_j for every parameter of layer j, r = (r_1, …, r_J) one rate per layer       (Eq. 8.3)

This is PyTorch's ``torch.optim.SGD(momentum=μ, weight_decay=λ, dampening=0, nesterov=False)``
(with v = 0 initially its first step sets v = g + λθ), as used by Laborieux et al. (2021);
their cosine schedule anneals each layer's rate from its own η_0 to the common η_min.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend import device_of, namespace_of, to_numpy

__all__ = ["SGD", "cosine_lr", "per_layer_lrs"]


def cosine_lr(epoch, *, lr0: float, lr_min: float, epochs_cos: int) -> float:
    """Learning rate of epoch ``epoch`` (0-based) under cosine annealing, Eq. (8.2).

    η(e) = η_min + ½(η_0 − η_min)(1 + cos(π e / E_cos)) for 0 ≤ e ≤ E_cos, and η_min for
    e > E_cos (constant after the annealing, unlike PyTorch's CosineAnnealingLR, which
    would rise again). η(0) = η_0, η(E_cos) = η_min. ``epoch`` may be fractional (per-step
    annealing). ``epochs_cos`` = 0 means no annealing: η_min from the start.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if int(epochs_cos) != epochs_cos or epochs_cos < 0:
        raise ValueError(f"epochs_cos must be a non-negative integer, got {epochs_cos!r}")
    if lr0 < 0 or lr_min < 0:
        raise ValueError(f"learning rates must be >= 0, got lr0={lr0}, lr_min={lr_min}")
    if epoch >= epochs_cos:
        return float(lr_min)
    return float(lr_min + 0.5 * (lr0 - lr_min) * (1.0 + math.cos(math.pi * epoch / epochs_cos)))


def _prefix(name: str) -> str:
    """The layer prefix of a parameter name: 'conv1' of 'conv1.weight'."""
    return name.rsplit(".", 1)[0] if "." in name else name


def per_layer_lrs(param_names, lrs, *, layer_of: dict | None = None) -> dict[str, float]:
    """Map one learning rate per layer to every parameter of that layer, Eq. (8.3).

    Parameters
    ----------
    param_names : iterable of str
        Parameter names in model order (``conv1.weight``, ``conv1.bias``, …).
    lrs : sequence of float
        r_1 … r_J, one per layer (e.g. Laborieux et al.'s 0.25, 0.15, 0.1, 0.08, 0.05 for
        conv1 … conv4 and the readout fc1), or a single rate for every parameter.
    layer_of : dict name -> layer name, optional
        The layer whose rate each parameter takes; by default the name without its last
        ``.``-component. The CRNN's :meth:`~pyeqprop.model.crnn.CRNN.param_owners` maps a
        local head or distillation map to the layer it reads. Layers are counted in order of
        first appearance.

    Returns
    -------
    dict name -> rate, in the order of ``param_names``.

    Raises ``ValueError`` listing the layers when the number of rates is neither 1 nor the
    number of layers.
    """
    names = list(param_names)
    owner = {k: (layer_of[k] if layer_of is not None else _prefix(k)) for k in names}
    layers = list(dict.fromkeys(owner[k] for k in names))
    rates = [float(r) for r in lrs]
    if any(r < 0 for r in rates):
        raise ValueError(f"learning rates must be >= 0, got {rates}")
    if len(rates) == 1:
        return {name: rates[0] for name in names}
    if len(rates) != len(layers):
        raise ValueError(f"got {len(rates)} per-layer learning rates for {len(layers)} layers "
                         f"({', '.join(layers)}); give one rate, or exactly one rate per layer, in this order")
    by_layer = dict(zip(layers, rates))
    return {name: by_layer[owner[name]] for name in names}


class SGD:
    """Stochastic gradient descent with momentum and weight decay, Eq. (8.1).

    Parameters
    ----------
    params : dict[str, array]
        The model's parameter dict (e.g. ``teacher.params``). It is updated in place:
        ``step`` stores the new arrays under the same keys, so the model sees them.
    lr : float
        η for every parameter not in ``lr_per_param``.
    momentum : float
        μ ∈ [0, 1).
    weight_decay : float
        λ ≥ 0, added to the gradient before momentum (coupled L2, as in PyTorch).
    lr_per_param : dict[str, float] or None
        η_θ per parameter name (see :func:`per_layer_lrs`); keys must be parameters.

    Attributes
    ----------
    base_lrs : dict[str, float]
        η_θ as constructed, the η_0 of the cosine schedule.
    lrs : dict[str, float]
        The current rates; :meth:`anneal` sets them from ``base_lrs`` (Eq. 8.2).
    velocity : dict[str, array]
        v per parameter, in the parameters' namespace, dtype and device.
    steps : int
        Number of steps taken.
    """

    def __init__(self, params: dict, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 lr_per_param: dict | None = None):
        if not isinstance(params, dict) or not params:
            raise ValueError("params must be a non-empty dict name -> array (the model's params)")
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        lr_per_param = dict(lr_per_param or {})
        unknown = [k for k in lr_per_param if k not in params]
        if unknown:
            raise ValueError(f"lr_per_param names {unknown[0]!r}, which is not a parameter; "
                             f"parameters are {list(params)}")
        self.params = params
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.base_lrs = {k: float(lr_per_param.get(k, lr)) for k in params}
        if any(v < 0 for v in self.base_lrs.values()):
            raise ValueError(f"learning rates must be >= 0, got {self.base_lrs}")
        self.lrs = dict(self.base_lrs)
        self.velocity = {}
        for k, p in params.items():
            xp = namespace_of(p)
            self.velocity[k] = xp.zeros(p.shape, dtype=p.dtype, device=device_of(p))
        self.steps = 0

    def _check_grads(self, grads):
        for k, p in self.params.items():
            if k not in grads:
                raise ValueError(f"gradient for parameter {k!r} is missing (grads has keys {list(grads)})")
            g = grads[k]
            if tuple(g.shape) != tuple(p.shape):
                raise ValueError(f"gradient for parameter {k!r} has shape {tuple(g.shape)} "
                                 f"but the parameter has shape {tuple(p.shape)}")
            if g.dtype != p.dtype:
                raise ValueError(f"gradient for parameter {k!r} has dtype {g.dtype} but the parameter {p.dtype}")
        extra = [k for k in grads if k not in self.params]
        if extra:
            raise ValueError(f"gradient {extra[0]!r} has no parameter (parameters are {list(self.params)})")

    def step(self, grads: dict, lr_scale: float = 1.0) -> None:
        """One update of every parameter, Eq. (8.1): v ← μv + (g + λθ); θ ← θ − s·η_θ·v.

        ``grads`` must hold exactly the parameters' keys with their shapes and dtypes; it is
        checked in full before anything changes (``ValueError`` naming the first bad key).
        ``lr_scale`` is s, a global factor on every rate.
        """
        self._check_grads(grads)
        mu, lam = self.momentum, self.weight_decay
        for k, p in self.params.items():
            d = grads[k] + lam * p if lam != 0.0 else grads[k]
            v = mu * self.velocity[k] + d
            self.velocity[k] = v
            self.params[k] = p - (lr_scale * self.lrs[k]) * v
        self.steps += 1

    def anneal(self, epoch, *, lr_min: float, epochs_cos: int) -> dict[str, float]:
        """Set every rate to its cosine-annealed value at ``epoch`` (Eq. 8.2) from ``base_lrs``."""
        self.lrs = {k: cosine_lr(epoch, lr0=b, lr_min=lr_min, epochs_cos=epochs_cos)
                    for k, b in self.base_lrs.items()}
        return dict(self.lrs)

    def state_dict(self) -> dict:
        """The optimizer state with velocities as host NumPy arrays (for checkpoints)."""
        return {
            "velocity": {k: np.array(to_numpy(v), copy=True) for k, v in self.velocity.items()},
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "base_lrs": dict(self.base_lrs),
            "lrs": dict(self.lrs),
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output; velocities move to the parameters' namespace.

        Raises ``ValueError`` naming the first parameter whose velocity is missing or has
        another shape, or an unknown parameter name.
        """
        vel = state.get("velocity")
        if not isinstance(vel, dict):
            raise ValueError("optimizer state has no 'velocity' dict")
        for k, p in self.params.items():
            if k not in vel:
                raise ValueError(f"optimizer state has no velocity for parameter {k!r}")
            if tuple(np.shape(vel[k])) != tuple(p.shape):
                raise ValueError(f"optimizer velocity for {k!r} has shape {tuple(np.shape(vel[k]))} "
                                 f"but the parameter has shape {tuple(p.shape)}")
        extra = [k for k in vel if k not in self.params]
        if extra:
            raise ValueError(f"optimizer state has a velocity for {extra[0]!r}, which is not a parameter")
        new_vel = {}
        for k, p in self.params.items():
            xp = namespace_of(p)
            new_vel[k] = xp.asarray(np.array(to_numpy(vel[k]), copy=True), dtype=p.dtype, device=device_of(p))
        self.velocity = new_vel
        for key in ("base_lrs", "lrs"):
            if key in state:
                missing = [k for k in self.params if k not in state[key]]
                if missing:
                    raise ValueError(f"optimizer state {key!r} has no rate for parameter {missing[0]!r}")
                setattr(self, key, {k: float(state[key][k]) for k in self.params})
        self.momentum = float(state.get("momentum", self.momentum))
        self.weight_decay = float(state.get("weight_decay", self.weight_decay))
        self.steps = int(state.get("steps", self.steps))
