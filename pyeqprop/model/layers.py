"""The per-layer maps that the CRNN and the teacher share (Eqs. 3.1, 3.10, 7.1).

A layer is a :class:`~pyeqprop.model.arch.ConvLayer` or :class:`~pyeqprop.model.arch.FCLayer`;
its parameters live in a plain mapping under PyTorch names (``conv1.weight`` …).
"""
from __future__ import annotations

import numpy as np

from ..backend import namespace_of
from ..ops.conv import conv2d
from ..ops.linear import linear
from ..ops.pool import avg_pool2d, avg_unpool2d, max_pool2d, max_unpool2d
from .arch import ConvLayer
from .costs import ParamSpec

__all__ = ["param_specs", "init_params", "forward", "unpool"]


def param_specs(layers) -> list[ParamSpec]:
    """Weight and bias specs of ``layers`` in order: conv W (o, c, k, k), fc W (out, in); fan-in for Eq. 3.10."""
    specs = []
    for layer in layers:
        if isinstance(layer, ConvLayer):
            fan_in = layer.in_channels * layer.kernel * layer.kernel
            specs.append(ParamSpec(f"{layer.name}.weight",
                                   (layer.out_channels, layer.in_channels, layer.kernel, layer.kernel), fan_in))
            specs.append(ParamSpec(f"{layer.name}.bias", (layer.out_channels,), fan_in))
        else:
            specs.append(ParamSpec(f"{layer.name}.weight", (layer.out_features, layer.in_features),
                                   layer.in_features))
            specs.append(ParamSpec(f"{layer.name}.bias", (layer.out_features,), layer.in_features))
    return specs


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


def forward(layer, params, a):
    """P(conv(a; W) + b) for a conv layer, W vec(a) + b for an fc layer, and the max-pool argmax (Eqs. 3.1, 7.1).

    a : (n, c, h, w) or (n, in). Returns (B, indices) with indices None unless the pooling is max.
    """
    W, b = params[f"{layer.name}.weight"], params[f"{layer.name}.bias"]
    if isinstance(layer, ConvLayer):
        z = conv2d(a, W, b, padding=layer.padding)  # (n, o, h_conv, w_conv)
        if layer.pool == "max":
            return max_pool2d(z)  # (n, o, h_conv/2, w_conv/2), argmax
        if layer.pool == "avg":
            return avg_pool2d(z), None
        return z, None
    xp = namespace_of(a)
    flat = xp.reshape(a, (a.shape[0], -1))  # (n, c, h, w) -> (n, c·h·w)
    return linear(flat, W, b), None


def unpool(layer, g, indices):
    """P*: the adjoint of the layer's pooling, at ``indices`` for max pooling (Eqs. 2.7, 2.8); identity otherwise."""
    if getattr(layer, "pool", "none") == "max":
        return max_unpool2d(g, indices, output_size=layer.conv_hw)
    if getattr(layer, "pool", "none") == "avg":
        return avg_unpool2d(g, output_size=layer.conv_hw)
    return g
