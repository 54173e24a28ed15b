"""Intermediate error signals: local error heads and linear-mapped distillation (SPEC.md §6).

pyeqprop's own design (the paper's exact equations are not available to us). Each signal is
a cost term (protocol in :mod:`pyeqprop.model.readout`, SPEC.md §3.3) added to the total cost

    C = C_out + Σ_{l∈A} λ_l C^loc_l + Σ_{l∈D} γ_l C^kd_l + κ C^kd_out              (Eq. 6.1)

so that Φ^β = Φ − βC nudges every selected hidden layer directly by −β ∂C/∂s_l within the
same settling dynamics (Eq. 3.7). Inference never uses the heads or maps.

Local error head, layer l (Eqs. 6.2-6.3), grid g:
    v_l = vec(avgpool_{k_l}(s_l))          k_l = (h_l/g_h, w_l/g_w), g_h the largest divisor of h_l that is ≤ g
    h_l = A_l v_l + a_l                    A_l (K, c_l·g_h·g_w), a_l (K,)
    C^loc_l = −log softmax(h_l)[y]         ("ce", default)   or   ½‖h_l − onehot(y)‖²  ("mse")

Distillation, layer l (Eqs. 6.4-6.5): teacher features t_l(x) (Eq. 7.4), average-pooled to
the student's spatial size when larger; a learned 1×1 convolution M_l (c_t, c_l, 1, 1) with
bias m_l (c_t,) (a linear map (d_t, d_l) for fc layers):
    C^kd_l = (1 / (2 |t_l|)) ‖M_l s_l + m_l − t_l‖²     normalisation "mean" (default),
             |t_l| = c_t·h_l·w_l elements per sample, so γ_l is the weight of a mean squared error;
    C^kd_l = ½ ‖M_l s_l + m_l − t_l‖²                  normalisation "sum".

Output distillation (Eq. 6.6), temperature τ, teacher logits z_t, student logits z_s (s_L for
mse, the softmax readout's logits otherwise):
    C^kd_out = −τ² Σ_k softmax(z_t/τ)_k log softmax(z_s/τ)_k,   ∂C^kd_out/∂z_s = τ (softmax(z_s/τ) − softmax(z_t/τ)).

Distillation weight schedule (Eq. 6.8), epoch e of E: γ_l(e) = γ_l f(e), κ(e) = κ f(e), with
f = 1 ("constant") or f(e) = ½(1 + cos(π e/E)) ("cosine").

Standardised targets (Eq. 6.9): t̂_{l,c} = (t_{l,c} − μ_{l,c}) / σ̃_{l,c} per teacher channel c,
μ and σ over the training split (samples and positions), σ̃ = σ, or 1 where σ = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..backend import namespace_of
from ..ops.conv import conv2d, conv2d_bias_grad, conv2d_transpose, conv2d_weight_grad
from ..ops.linear import linear, linear_transpose, linear_weight_grad
from ..ops.pool import avg_pool2d, avg_unpool2d
from ..model.params import ParamSpec
from ..ops.softmax import log_softmax, onehot

__all__ = ["SignalConfig", "LocalErrorHead", "DistillationMap", "OutputDistillation", "TeacherFeatures",
           "attach_signals", "parse_layers", "kd_schedule_factor", "set_kd_weights", "standardise_targets",
           "LOCAL_LOSSES", "KD_NORMALISATIONS", "KD_SCHEDULES", "KD_TARGETS", "SIGNAL_INITS"]

LOCAL_LOSSES = ("ce", "mse")  # C^loc_l of Eq. 6.3: cross-entropy of the head, or its squared error
KD_NORMALISATIONS = ("mean", "sum")  # Eq. 6.5: divide by |t_l| (a mean squared error), or not
SIGNAL_INITS = ("zeros", "uniform")  # heads and maps start at zero (Eq. 6.7) or uniform by Eq. 3.10
KD_SCHEDULES = ("constant", "cosine")  # Eq. 6.8: γ_l as given in every epoch, or decayed by a half cosine
KD_TARGETS = ("raw", "standardised")  # Eq. 6.9: the teacher's features t_l, or standardised per channel


def _largest_divisor_at_most(n: int, g: int) -> int:
    for d in range(min(n, g), 0, -1):
        if n % d == 0:
            return d
    return 1


class TeacherFeatures:
    """Teacher features for one batch, computed once and shared by every distillation term.

    Holds the last input it saw (compared by identity) so the teacher runs once per batch.
    """

    def __init__(self, teacher):
        self.teacher = teacher
        self._x = None
        self._value = None

    def get(self, x):
        if self._x is not x:
            logits, cache = self.teacher.forward(x)  # one forward gives both t_l (Eq. 7.4) and the logits
            self._x, self._value = x, (cache.acts, logits)
        return self._value


def _check_init(init):
    """Heads and maps start at zero (Eq. 6.7) or uniform by Eq. 3.10."""
    if init not in SIGNAL_INITS:
        raise ValueError(f"signal init must be {' or '.join(map(repr, SIGNAL_INITS))}, got {init!r}")


class LocalErrorHead:
    """Local error head on neuron layer ``layer`` (0-based), Eqs. (6.2)-(6.3); starts at zero, Eq. (6.7)."""

    kind = "local"

    def __init__(self, layer: int, state_shape, num_classes: int, *, grid: int = 2, loss: str = "ce", name=None,
                 init: str = "zeros"):
        _check_init(init)
        if loss not in LOCAL_LOSSES:
            raise ValueError(f"local error loss must be {' or '.join(map(repr, LOCAL_LOSSES))}, got {loss!r}")
        if grid < 1:
            raise ValueError(f"local head grid must be >= 1, got {grid}")
        self.layer = layer
        self.init = init
        self.name = name or f"head{layer + 1}"
        self.loss = loss
        self.num_classes = num_classes
        self.state_shape = tuple(state_shape)
        if len(self.state_shape) == 3:
            c, h, w = self.state_shape
            gh, gw = _largest_divisor_at_most(h, grid), _largest_divisor_at_most(w, grid)
            self.pool = (h // gh, w // gw)
            self.features = c * gh * gw
        else:
            self.pool = None
            self.features = self.state_shape[0]

    def param_specs(self):
        return [ParamSpec(f"{self.name}.weight", (self.num_classes, self.features), self.features, self.init),
                ParamSpec(f"{self.name}.bias", (self.num_classes,), self.features, self.init)]

    def prepare(self, params, x, y):
        return None if y is None else onehot(y, self.num_classes, x.dtype)

    def pooled(self, s):
        """v_l = vec(avgpool_{k_l}(s_l)), (n, c_l·g_h·g_w): what the head reads (Eq. 6.2)."""
        xp = namespace_of(s)
        if self.pool is not None and self.pool != (1, 1):
            s = avg_pool2d(s, kernel_size=self.pool, stride=self.pool)
        return xp.reshape(s, (s.shape[0], -1))  # (n, c, g_h, g_w) -> (n, c·g_h·g_w)

    def logits(self, params, states):
        return linear(self.pooled(states[self.layer]), params[f"{self.name}.weight"], params[f"{self.name}.bias"])

    def _delta(self, params, states, ctx):
        h = self.logits(params, states)
        if self.loss == "ce":
            xp = namespace_of(h)
            return xp.exp(log_softmax(h)) - ctx
        return h - ctx

    def value(self, params, states, ctx):
        xp = namespace_of(states[self.layer])
        h = self.logits(params, states)
        if self.loss == "ce":
            return -xp.sum(log_softmax(h) * ctx, axis=1)
        d = h - ctx
        return 0.5 * xp.sum(d * d, axis=1)

    def state_grads(self, params, states, ctx):
        xp = namespace_of(states[self.layer])
        s = states[self.layer]
        gv = linear_transpose(self._delta(params, states, ctx), params[f"{self.name}.weight"])  # (n, features)
        if self.pool is None:
            return {self.layer: gv}
        c, h, w = self.state_shape
        gv = xp.reshape(gv, (s.shape[0], c, h // self.pool[0], w // self.pool[1]))  # (n, c·g_h·g_w) -> (n, c, g_h, g_w)
        if self.pool != (1, 1):
            gv = avg_unpool2d(gv, kernel_size=self.pool, stride=self.pool, output_size=(h, w))
        return {self.layer: gv}

    def param_grads(self, params, states, ctx):
        xp = namespace_of(states[self.layer])
        d = self._delta(params, states, ctx)
        return {f"{self.name}.weight": linear_weight_grad(self.pooled(states[self.layer]), d),
                f"{self.name}.bias": xp.sum(d, axis=0)}


class DistillationMap:
    """Linear-mapped distillation on layer ``layer`` (0-based), Eqs. (6.4)-(6.5); starts at zero, Eq. (6.7)."""

    kind = "kd"

    def __init__(self, layer: int, state_shape, teacher_shape, provider: TeacherFeatures, *,
                 teacher_layer=None, normalisation: str = "mean", name=None, init: str = "zeros"):
        _check_init(init)
        if normalisation not in KD_NORMALISATIONS:
            raise ValueError(f"distillation normalisation must be {' or '.join(map(repr, KD_NORMALISATIONS))}, "
                             f"got {normalisation!r}")
        self.layer = layer
        self.teacher_layer = layer if teacher_layer is None else teacher_layer
        self.name = name or f"kd{layer + 1}"
        self.provider = provider
        self.normalisation = normalisation
        self.init = init
        self.state_shape = tuple(state_shape)
        self.teacher_shape = tuple(teacher_shape)
        self.target_stats = None  # (μ_l, σ̃_l) of Eq. 6.9, each (c_t,), once standardise_targets has run
        if len(self.state_shape) != len(self.teacher_shape):
            raise ValueError(f"cannot distil teacher features of shape {self.teacher_shape} into a student layer "
                             f"of shape {self.state_shape}")
        self.conv = len(self.state_shape) == 3
        if self.conv:
            (_, hs, ws), (ct, ht, wt) = self.state_shape, self.teacher_shape
            if ht % hs or wt % ws:
                raise ValueError(f"teacher map {ht}×{wt} cannot be average-pooled to the student's {hs}×{ws}")
            self.teacher_pool = (ht // hs, wt // ws)
            self.elements = ct * hs * ws
        else:
            self.teacher_pool = None
            self.elements = self.teacher_shape[0]

    def param_specs(self):
        if self.conv:
            cs, ct = self.state_shape[0], self.teacher_shape[0]
            return [ParamSpec(f"{self.name}.weight", (ct, cs, 1, 1), cs, self.init),
                    ParamSpec(f"{self.name}.bias", (ct,), cs, self.init)]
        ds, dt = self.state_shape[0], self.teacher_shape[0]
        return [ParamSpec(f"{self.name}.weight", (dt, ds), ds, self.init),
                ParamSpec(f"{self.name}.bias", (dt,), ds, self.init)]

    def pooled_target(self, x):
        """t_l(x) average-pooled to the student's spatial size (Eq. 6.4): (n, c_t, h_l, w_l) or (n, d_t)."""
        feats, _ = self.provider.get(x)
        t = feats[self.teacher_layer]
        if self.teacher_pool is not None and self.teacher_pool != (1, 1):
            t = avg_pool2d(t, kernel_size=self.teacher_pool, stride=self.teacher_pool)
        return t

    def prepare(self, params, x, y):
        """The target of Eq. 6.5: the pooled t_l, standardised per channel (Eq. 6.9) once
        :func:`standardise_targets` has set ``target_stats``."""
        t = self.pooled_target(x)
        if self.target_stats is None:
            return t
        mu, sd = self.target_stats
        shape = (1, -1, 1, 1) if self.conv else (1, -1)  # per channel, broadcast over samples (and positions)
        xp = namespace_of(t)
        return (t - xp.reshape(mu, shape)) / xp.reshape(sd, shape)

    def scale(self):
        """1/|t_l| for the mean normalisation, 1 for the sum (Eq. 6.5)."""
        return 1.0 / self.elements if self.normalisation == "mean" else 1.0

    def _residual(self, params, states, ctx):
        s = states[self.layer]
        W, b = params[f"{self.name}.weight"], params[f"{self.name}.bias"]
        m = conv2d(s, W, b) if self.conv else linear(s, W, b)
        return m - ctx

    def value(self, params, states, ctx):
        xp = namespace_of(states[self.layer])
        r = self._residual(params, states, ctx)
        return (0.5 * self.scale()) * xp.sum(xp.reshape(r * r, (r.shape[0], -1)), axis=1)

    def state_grads(self, params, states, ctx):
        r = self.scale() * self._residual(params, states, ctx)
        W = params[f"{self.name}.weight"]
        s = states[self.layer]
        if self.conv:
            return {self.layer: conv2d_transpose(r, W, output_size=s.shape)}
        return {self.layer: linear_transpose(r, W)}

    def param_grads(self, params, states, ctx):
        xp = namespace_of(states[self.layer])
        r = self.scale() * self._residual(params, states, ctx)
        s = states[self.layer]
        if self.conv:
            return {f"{self.name}.weight": conv2d_weight_grad(s, r, kernel_size=1),
                    f"{self.name}.bias": conv2d_bias_grad(r)}
        return {f"{self.name}.weight": linear_weight_grad(s, r), f"{self.name}.bias": xp.sum(r, axis=0)}


class OutputDistillation:
    """Output distillation against the teacher's softened probabilities, Eq. (6.6).

    Reads the student's logits through its readout term (s_L for mse, W_out vec(s_L) + b_out
    for softmax); for the softmax readout the readout weights receive the matching gradient.
    """

    kind = "kd_out"

    def __init__(self, readout, provider: TeacherFeatures, *, temperature: float = 4.0):
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.readout = readout
        self.layer = readout.layer
        self.provider = provider
        self.tau = float(temperature)

    def param_specs(self):
        return []

    def prepare(self, params, x, y):
        _, zt = self.provider.get(x)
        xp = namespace_of(zt)
        return xp.exp(log_softmax(zt / self.tau))

    def value(self, params, states, ctx):
        xp = namespace_of(ctx)
        zs = self.readout.logits(params, states)
        return -(self.tau ** 2) * xp.sum(ctx * log_softmax(zs / self.tau), axis=1)

    def _dz(self, params, states, ctx):
        xp = namespace_of(ctx)
        zs = self.readout.logits(params, states)
        return self.tau * (xp.exp(log_softmax(zs / self.tau)) - ctx)  # (n, K)

    def state_grads(self, params, states, ctx):
        xp = namespace_of(ctx)
        dz = self._dz(params, states, ctx)
        if self.readout.kind == "mse":
            return {self.layer: dz}
        W = params[f"{self.readout.name}.weight"]
        s = states[self.layer]
        return {self.layer: xp.reshape(linear_transpose(dz, W), s.shape)}  # (n, c·h·w) -> shape of s_L

    def param_grads(self, params, states, ctx):
        xp = namespace_of(ctx)
        if self.readout.kind == "mse":
            return {}
        dz = self._dz(params, states, ctx)
        s = states[self.layer]
        flat = xp.reshape(s, (s.shape[0], -1))  # (n, c, h, w) -> (n, c·h·w)
        return {f"{self.readout.name}.weight": linear_weight_grad(flat, dz),
                f"{self.readout.name}.bias": xp.sum(dz, axis=0)}


def parse_layers(spec, n_candidates: int, what: str):
    """'all' | 'lower' | 'none' | '' | comma list of 1-based layer numbers | list of ints -> sorted 0-based
    indices; 'lower' is the first ⌈n/2⌉ of the n candidates (Eq. 6.1)."""
    if spec is None:
        return []
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("none", ""):
            return []
        if text == "all":
            return list(range(n_candidates))
        if text == "lower":
            return list(range((n_candidates + 1) // 2))
        try:
            items = [int(t) for t in text.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"{what} layers must be 'all', 'lower', 'none' or a comma list of layer numbers, "
                             f"got {spec!r}") from None
    else:
        items = [int(t) for t in spec]
    for i in items:
        if not 1 <= i <= n_candidates:
            raise ValueError(f"{what} layer {i} is out of range: the network has conv layers 1..{n_candidates}")
    return sorted({i - 1 for i in items})


@dataclass
class SignalConfig:
    """Which intermediate signals to add and their weights (Eq. 6.1); defaults documented in SPEC.md §6.

    ``local_layers`` / ``kd_layers``: "all" (every conv layer), "none", or 1-based conv layer
    numbers ("1,3" or [1, 3]). Weights are a float for every selected layer or one per layer.
    """

    local_layers: object = "none"
    local_weight: object = 1.0
    local_grid: int = 2
    local_loss: str = "ce"
    kd_layers: object = "none"
    kd_weight: object = 1.0
    kd_normalisation: str = "mean"
    output_kd_weight: float = 0.0
    temperature: float = 4.0
    init: str = "zeros"
    extra: dict = field(default_factory=dict)

    def needs_teacher(self) -> bool:
        kd = self.kd_layers
        if isinstance(kd, str):
            selected = kd.strip().lower() not in ("none", "")  # as parse_layers reads it
        else:
            selected = kd is not None and len(list(kd)) > 0
        return selected or self.output_kd_weight != 0.0


def _weights(w, n, what):
    if isinstance(w, (int, float)):
        return [float(w)] * n
    w = [float(v) for v in w]
    if len(w) == 1:
        return w * n
    if len(w) != n:
        raise ValueError(f"{what} weights: expected 1 or {n} values (one per selected layer), got {len(w)}")
    return w


def kd_schedule_factor(schedule: str, epoch: int, epochs: int) -> float:
    """f(e) of Eq. 6.8 for epoch ``epoch`` (0-based) of ``epochs``: 1, or ½(1 + cos(π e/E)) for "cosine"."""
    if schedule not in KD_SCHEDULES:
        raise ValueError(f"distillation schedule must be {' or '.join(map(repr, KD_SCHEDULES))}, got {schedule!r}")
    if epochs < 1 or not 0 <= epoch < epochs:
        raise ValueError(f"epoch must be in 0..{epochs - 1} (of epochs = {epochs} >= 1), got {epoch}")
    return 1.0 if schedule == "constant" else 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def set_kd_weights(net, factor: float) -> None:
    """Set every distillation term's weight in ``net.cost_terms`` to its base weight γ_l or κ (the one
    :func:`attach_signals` gave it, ``term.base_weight``) times ``factor`` (Eq. 6.8), so calls do not
    compound; local heads and the readout keep theirs."""
    if not (math.isfinite(factor) and factor >= 0):
        raise ValueError(f"distillation weight factor must be finite and >= 0, got {factor!r}")
    net.cost_terms = [(term.base_weight * factor if term.kind in ("kd", "kd_out") else w, term)
                      for w, term in net.cost_terms]


def standardise_targets(net, x, *, batch: int = 256) -> None:
    """Give every distillation map of ``net`` the per-channel statistics of Eq. 6.9 over the samples ``x``.

    For map l, channel c: μ_{l,c} and σ_{l,c} of the pooled teacher features (Eq. 6.4) over the samples
    and positions of ``x`` (n, c, h, w), accumulated in float64 batch by batch, each batch's mean and
    sum of squared deviations merged by Chan et al.'s pairwise update (no catastrophic cancellation
    of Σt² − nμ²); σ̃ = σ, or 1 where σ = 0. Stored as ``target_stats`` in the map's dtype.
    """
    maps = [term for _, term in net.cost_terms if term.kind == "kd"]
    if not maps:
        return
    xp = namespace_of(x)
    n = x.shape[0]
    if n < 1 or batch < 1:
        raise ValueError(f"standardising distillation targets needs >= 1 sample and batch >= 1, got {n} and {batch}")
    stats = [None] * len(maps)  # per map: (count, mean, M2), float64 per channel
    dtypes = [None] * len(maps)  # the targets' own dtype, that of the student's cost
    for start in range(0, n, batch):
        xb = x[start:min(start + batch, n), ...]
        for i, term in enumerate(maps):
            t = term.pooled_target(xb)
            dtypes[i] = t.dtype  # the same for every batch
            t = xp.astype(t, xp.float64)
            if term.conv:  # (n, c, h, w) -> (c, n·h·w): one column per sample and position
                t = xp.reshape(xp.permute_dims(t, (1, 0, 2, 3)), (t.shape[1], -1))
            else:  # (n, d) -> (d, n)
                t = xp.permute_dims(t, (1, 0))
            k = t.shape[1]
            mean_b = xp.mean(t, axis=1)
            m2_b = xp.sum((t - xp.expand_dims(mean_b, axis=1)) ** 2, axis=1)
            if stats[i] is None:
                stats[i] = (k, mean_b, m2_b)
            else:
                count, mean, m2 = stats[i]
                total = count + k
                d = mean_b - mean
                stats[i] = (total, mean + d * (k / total), m2 + m2_b + d * d * (count * k / total))
    for term, (count, mean, m2), dtype in zip(maps, stats, dtypes):
        sd = xp.sqrt(m2 / count)
        sd = xp.where(sd > 0, sd, xp.ones_like(sd))
        term.target_stats = (xp.astype(mean, dtype), xp.astype(sd, dtype))


def attach_signals(net, config: SignalConfig, teacher=None):
    """Add the configured local heads and distillation maps to ``net`` (Eq. 6.1); returns the terms.

    Conv layer numbers count the CRNN's conv layers from 1. Distillation needs ``teacher``
    (a :class:`~pyeqprop.model.teacher.Teacher` with ``features(x)`` and ``forward(x)``).
    """
    conv_idx = net.conv_layer_indices()
    shapes = net.arch.state_shapes
    terms = []
    local = parse_layers(config.local_layers, len(conv_idx), "local-error")
    for j, w in zip(local, _weights(config.local_weight, len(local), "local-error")):
        l = conv_idx[j]
        terms.append(net.add_cost_term(
            LocalErrorHead(l, shapes[l], net.num_classes, grid=config.local_grid, loss=config.local_loss,
                           init=config.init), w))
    kd = parse_layers(config.kd_layers, len(conv_idx), "distillation")
    if (kd or config.output_kd_weight) and teacher is None:
        raise ValueError("distillation was requested but no teacher was given")
    provider = TeacherFeatures(teacher) if teacher is not None else None
    if kd:
        tshapes = [tuple(shp[1:]) for shp in teacher.feature_shapes(1)] if hasattr(teacher, "feature_shapes") else shapes
        for j, w in zip(kd, _weights(config.kd_weight, len(kd), "distillation")):
            l = conv_idx[j]
            terms.append(net.add_cost_term(
                DistillationMap(l, shapes[l], tshapes[l], provider, normalisation=config.kd_normalisation,
                                init=config.init), w))
    if config.output_kd_weight:
        terms.append(net.add_cost_term(OutputDistillation(net.readout_term, provider, temperature=config.temperature),
                                       config.output_kd_weight))
    for w, term in net.cost_terms:
        if term.kind in ("kd", "kd_out"):
            term.base_weight = w  # γ_l or κ, which the schedule of Eq. 6.8 scales
    return terms
