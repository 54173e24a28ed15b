"""Parameter declarations and their seeded initialisation (Eqs. 3.10, 6.7).

Every parameter pyeqprop trains — a layer's W_l and b_l, the softmax readout, a local head or
a distillation map — is declared by a :class:`ParamSpec` and drawn by :func:`init_params`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ParamSpec", "init_params", "PARAM_INITS"]

PARAM_INITS = ("uniform", "zeros")
"""How a parameter starts: uniform in ±1/√fan_in (Eq. 3.10) or at zero (Eq. 6.7)."""


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
