"""Parameter declarations and their seeded initialisation (Eqs. 3.10, 3.16, 6.7).

Every parameter pyeqprop trains — a layer's W_l and b_l, the softmax readout, a local head or
a distillation map — is declared by a :class:`ParamSpec` and drawn by :func:`init_params`
(uniform, Eq. 3.10, the default). A network may instead start from :func:`orthogonal_init`
(Eq. 3.16): orthogonal weights scaled so that the linearised settling step has a chosen
spectral radius (Eq. 3.17), biases that centre the pre-activations in ρ's linear piece.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ParamSpec", "init_params", "PARAM_INITS", "NETWORK_INITS", "DEFAULT_RADIUS", "REFERENCE_BATCH",
           "INPUT_GAIN", "orthogonal_matrix", "orthogonal_weight", "orthogonal_init"]

PARAM_INITS = ("uniform", "zeros")
"""How a parameter starts: uniform in ±1/√fan_in (Eq. 3.10) or at zero (Eq. 6.7)."""

NETWORK_INITS = ("uniform", "orthogonal", "delta-orthogonal")
"""How a network's layers and readout start: uniform (Eq. 3.10), or orthogonal weights calibrated to a
spectral radius (Eq. 3.16), with orthogonal (o, c·k·k) kernels or delta-orthogonal ones (the centre tap only)."""

DEFAULT_RADIUS = 0.85
"""The spectral radius r of the linearised step (Eq. 3.17) an orthogonal init is calibrated to by default."""

REFERENCE_BATCH = 4
"""Samples in the reference state ŝ of Eq. (3.16)."""

INPUT_GAIN = 0.5
"""The first layer's weight rows have root-mean-square norm INPUT_GAIN · a (a the width of ρ's linear piece,
Eq. 3.16): a unit-variance input then moves the pre-activation by a/2 per standard deviation, centre to kink."""


@dataclass(frozen=True)
class ParamSpec:
    """A parameter a layer or cost term owns: PyTorch name, shape, fan-in and initialisation (Eq. 3.10).

    ``init``: "uniform" (±1/√fan_in, weights × weight_scale) or "zeros".
    """

    name: str
    shape: tuple[int, ...]
    fan_in: int
    init: str = "uniform"


def init_params(specs, rng: np.random.Generator, *, dtype: str, xp, device, weight_scale: float = 1.0) -> dict:
    """Draw each spec uniform in ±1/√fan_in (weights × ``weight_scale``) from ``rng`` in order, Eq. (3.10).

    A spec with ``init="zeros"`` (heads and maps, Eq. 6.7) starts at zero and draws nothing from ``rng``.
    """
    out = {}
    for spec in specs:
        if spec.init == "zeros":
            out[spec.name] = xp.zeros(spec.shape, dtype=getattr(xp, dtype), device=device)
            continue
        if spec.init != "uniform":
            raise ValueError(f"parameter {spec.name!r} has init {spec.init!r}; expected 'uniform' or 'zeros'")
        bound = 1.0 / np.sqrt(spec.fan_in)
        if spec.name.endswith(".weight"):
            bound *= weight_scale
        host = rng.uniform(-bound, bound, size=spec.shape).astype(dtype)
        out[spec.name] = xp.asarray(host, device=device)
    return out


def orthogonal_matrix(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-distributed (rows, cols) float64 matrix with orthonormal rows (rows ≤ cols) or columns (Eq. 3.16).

    QR of a standard normal matrix, with the signs of R's diagonal moved into Q (Mezzadri 2007), so the
    draw does not depend on the QR routine's sign convention.
    """
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q = q * np.where(np.diag(r) < 0, -1.0, 1.0)
    return q if rows >= cols else q.T


def _rows_rms_one(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """:func:`orthogonal_matrix` times √(rows/cols) when rows > cols: rows of root-mean-square norm 1 in any shape."""
    q = orthogonal_matrix(rows, cols, rng)
    return q * np.sqrt(rows / cols) if rows > cols else q


def orthogonal_weight(shape, rng: np.random.Generator, *, delta: bool = False) -> np.ndarray:
    """An orthogonal weight of ``shape`` (Eq. 3.16): fc (out, in) semi-orthogonal; conv (o, c, k, k) either the
    (o, c·k·k) semi-orthogonal matrix reshaped, or (``delta``) zero but for the centre tap, a semi-orthogonal
    (o, c) matrix: the convolution then maps the channels at every position isometrically (up to a factor).
    A matrix with more rows than columns is multiplied by √(rows/cols), so that in every shape its rows (a unit's incoming weights)
    have root-mean-square norm 1."""
    shape = tuple(int(v) for v in shape)
    if len(shape) == 2:
        return _rows_rms_one(shape[0], shape[1], rng)
    o, c, kh, kw = shape
    if not delta:
        return _rows_rms_one(o, c * kh * kw, rng).reshape(shape)
    w = np.zeros(shape)
    w[:, :, kh // 2, kw // 2] = _rows_rms_one(o, c, rng)
    return w


def orthogonal_init(net, rng: np.random.Generator, *, radius: float = DEFAULT_RADIUS, delta: bool = False,
                    iterations: int = 1000, tol: float = 1e-6) -> dict:
    """Parameters of ``net``'s layers and readout by Eq. (3.16), in ``net.params`` order, on its backend.

    1. Every weight W_l is :func:`orthogonal_weight` (drawn from ``rng`` in parameter order); the first
       layer's rows are scaled to norm :data:`INPUT_GAIN` · a (a = hi − lo, ρ's kinks), the others' to 1.
    2. A reference state ŝ: :data:`REFERENCE_BATCH` samples, every neuron uniform in [0, 1] from ``rng``
       (x = 0), and its max-pool argmaxes.
    3. W_2 … W_L are multiplied by g = r / (ρ'_max · ρ(H)), ρ(H) by :func:`~pyeqprop.model.spectrum.step_radius`
       with D = I at ŝ's argmaxes: the linearised step then has spectral radius r wherever every unit is in
       ρ's linear piece (D = ρ'_max I), and at most about r elsewhere (D ≤ ρ'_max I).
    4. b_l = (lo + hi)/2 − mean(H ŝ)_l, the mean over the reference samples and positions of each channel
       (of each unit, fc): at ŝ the mean pre-activation of every channel is the centre of ρ's linear piece.

    The softmax readout's weight is orthogonal (rows of norm 1) and its bias zero. W_1, the readout and the
    biases do not enter J: the input's gain is set apart from the step's stability.
    """
    from .spectrum import step_radius

    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius!r}")
    xp, dtype = net.xp, net.dtype_name
    lo, hi = net.act.kinks
    centre, width = 0.5 * (lo + hi), hi - lo

    def put(a):
        return xp.asarray(np.asarray(a).astype(dtype), device=net.device)

    params = dict(net.params)
    for l, layer in enumerate(net.layers):
        shape = tuple(spec.shape for spec in layer.param_specs() if spec.name == layer.weight)[0]
        gain = INPUT_GAIN * width if l == 0 else 1.0
        params[layer.weight] = put(gain * orthogonal_weight(shape, rng, delta=delta))
        params[layer.bias] = put(np.zeros(shape[0]))
    for spec in net.readout_term.param_specs():
        params[spec.name] = put(orthogonal_weight(spec.shape, rng) if spec.name.endswith(".weight")
                                else np.zeros(spec.shape))
    net.params.update(params)
    ref = [put(rng.uniform(0.0, 1.0, size=shape)) for shape in net.state_shapes(REFERENCE_BATCH)]
    indices = [None] + [net.layers[l].argmax(net.params, ref[l - 1]) for l in range(1, len(net.layers))]
    if len(net.layers) > 1:
        ones = [xp.ones_like(s) for s in ref]
        est = step_radius(net, ones, indices, iterations=iterations, tol=tol, rng=rng)
        if est.radius > 0:
            g = radius / (net.act.max_slope * est.radius)
            for layer in net.layers[1:]:
                net.params[layer.weight] = net.params[layer.weight] * g
    h = net.jacobian_vector(ref, indices)
    for layer, hl in zip(net.layers, h):
        axes = tuple(a for a in range(hl.ndim) if a != 1)  # every axis but the channel (unit) axis
        net.params[layer.bias] = xp.astype(centre - xp.mean(hl, axis=axes), net.dtype)
    return {k: net.params[k] for k in net.params}
