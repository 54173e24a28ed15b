"""How close one gradient estimate is to another: the cosine and the norm ratio (README's tables).

For two tensors a (the estimate) and b (the reference) of the same parameter, flattened and taken
to the host in float64: cos = ⟨a, b⟩/(‖a‖‖b‖) (1: the same direction) and ratio = ‖a‖/‖b‖
(1: the same size; ≪ 1: a vanishing estimate).
"""
from __future__ import annotations

import numpy as np

from ..backend import to_numpy

__all__ = ["cosine_and_ratio"]


def cosine_and_ratio(a, b, *, undefined: float = float("nan")) -> tuple[float, float]:
    """(cos(a, b), ‖a‖/‖b‖) on the host in float64; the cosine is ``undefined`` when a norm is 0 and the
    ratio NaN when ‖b‖ is."""
    a = np.ravel(np.asarray(to_numpy(a), dtype=np.float64))
    b = np.ravel(np.asarray(to_numpy(b), dtype=np.float64))
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else undefined
    return cos, (na / nb if nb > 0 else float("nan"))
