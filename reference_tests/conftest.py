"""Shared fixtures of the reference tests: hypothesis profile and the ``xp`` backend fixture.

Inputs are drawn on the host from NumPy's RNG, moved with ``pyeqprop.backend.asarray`` to
the backend under test, and results come back with ``pyeqprop.backend.to_numpy``; every
comparison is made on the host.
"""
from __future__ import annotations

import pytest

from pyeqprop import backend
from pyeqprop.testing.strategies import load_profile

load_profile()


def _backend_params():
    params = []
    for name in ("numpy", "array_api_strict", "cupy"):
        marks = []
        if name == "cupy" and not backend.cupy_available():
            marks = [pytest.mark.skip(reason="CuPy/GPU not available")]
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.fixture(scope="session", params=_backend_params())
def xp(request):
    """The array namespace of one backend (session scope, so hypothesis tests may use it)."""
    return backend.get_namespace(request.param)
