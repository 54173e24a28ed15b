"""Array backends: the one place that knows NumPy, CuPy and array-api-strict exist.

Numerical code in pyeqprop is written once against the Python Array API standard.
Primitives infer their namespace from their input arrays with :func:`namespace_of`;
functions that *create* arrays take an ``xp=`` argument, and fall back to the process
default (:func:`get_backend`) only when it is ``None``.

Backends
--------
``numpy``            default; through ``array_api_compat.numpy``.
``cupy``             GPU; imported lazily, a clear error when absent or without a device.
``array_api_strict`` tests only: it rejects anything outside the standard, so code that
                     passes under it runs on CuPy too.

The process default comes from the ``PYEQPROP_BACKEND`` environment variable or
:func:`set_backend`. :func:`to_numpy` is the one way back to host memory.
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "Array",
    "BACKENDS",
    "DTYPES",
    "BackendError",
    "get_namespace",
    "get_backend",
    "set_backend",
    "namespace_of",
    "backend_name",
    "to_numpy",
    "asarray",
    "cupy_available",
    "default_backend_name",
    "dtype_name",
    "ENV_VAR",
]

BACKENDS = ("numpy", "cupy", "array_api_strict")  # the names get_namespace / set_backend accept
DTYPES = ("float32", "float64")  # floating dtypes, by name, that networks (states, parameters) run in

Array = Any
"""An array of any supported namespace (``numpy.ndarray``, ``cupy.ndarray``, ``array_api_strict`` arrays), in
annotations: the Array API standard has no one array type to name."""

ENV_VAR = "PYEQPROP_BACKEND"  # the environment variable that names the process default

_default_name: str | None = None


class BackendError(RuntimeError):
    """A backend was requested that cannot be used here (absent package, no GPU, unknown name)."""


def _load(name: str) -> ModuleType:
    if name == "numpy":
        import array_api_compat.numpy as xnp

        return xnp
    if name == "array_api_strict":
        try:
            import array_api_strict
        except ImportError as exc:  # pragma: no cover - depends on environment
            raise BackendError(
                "backend 'array_api_strict' needs the package array-api-strict: "
                "pip install array-api-strict (it is in the 'test' extra)"
            ) from exc
        return array_api_strict
    if name == "cupy":
        try:
            import cupy  # noqa: F401
            import array_api_compat.cupy as xcp
        except ImportError as exc:
            raise BackendError(
                "backend 'cupy' was requested but CuPy is not installed: "
                "pip install cupy-cuda13x (or cupy-cuda12x for CUDA 12)"
            ) from exc
        try:
            n_dev = cupy.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDA driver missing or broken
            raise BackendError(f"backend 'cupy' was requested but no usable GPU was found ({exc})") from exc
        if n_dev < 1:
            raise BackendError("backend 'cupy' was requested but CUDA reports 0 GPUs")
        return xcp
    raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")


def get_namespace(name: str) -> ModuleType:
    """Return the array namespace for backend ``name`` (one of :data:`BACKENDS`)."""
    return _load(name)


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU (never raises)."""
    try:
        _load("cupy")
    except BackendError:
        return False
    return True


def set_backend(name: str) -> ModuleType:
    """Set the process-default backend (for the CLI and notebooks) and return its namespace."""
    xp = _load(name)
    global _default_name
    _default_name = name
    return xp


def default_backend_name() -> str:
    """The name of the process default: :func:`set_backend`'s, else ``$PYEQPROP_BACKEND``, else "numpy".

    Raises :class:`BackendError` naming the variable when ``$PYEQPROP_BACKEND`` is not one of
    :data:`BACKENDS` (whether that backend can be loaded here is :func:`get_namespace`'s concern).
    """
    if _default_name:
        return _default_name
    name = os.environ.get(ENV_VAR, "").strip()
    if not name:
        return "numpy"
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)} (set in ${ENV_VAR})")
    return name


def get_backend() -> ModuleType:
    """The process-default namespace: :func:`set_backend`, else ``$PYEQPROP_BACKEND``, else numpy."""
    return _load(default_backend_name())


def dtype_name(dtype, xp: ModuleType | None = None) -> str:
    """The name in :data:`DTYPES` of a floating dtype given as a string, a NumPy type or dtype
    (``np.float32``, ``np.dtype("float64")``) or a dtype of the namespace ``xp`` (``xp.float32``).

    Raises ``ValueError`` naming the value for anything else.
    """
    import warnings

    if isinstance(dtype, str) or dtype is None:  # None: np.dtype(None) would be float64
        name = dtype
    else:
        name = None
        for candidate in DTYPES if xp is not None else ():
            with warnings.catch_warnings():  # array_api_strict warns when compared with a NumPy dtype
                warnings.simplefilter("ignore")
                try:
                    same = bool(dtype == getattr(xp, candidate))
                except TypeError:
                    same = False
            if same:
                name = candidate
                break
        if name is None:
            try:
                name = np.dtype(dtype).name  # np.float32, np.dtype("float64"); cupy.float32 is np.float32
            except TypeError:
                pass
    if name not in DTYPES:
        raise ValueError(f"dtype must be {' or '.join(map(repr, DTYPES))} (a name, a NumPy dtype or a dtype of "
                         f"the network's namespace), got {dtype!r}")
    return name


def resolve(xp: ModuleType | str | None) -> ModuleType:
    """Turn an ``xp=`` argument (namespace, backend name or None) into a namespace."""
    if xp is None:
        return get_backend()
    if isinstance(xp, str):
        return _load(xp)
    if xp is np:
        return _load("numpy")
    return xp


def namespace_of(*arrays) -> ModuleType:
    """Namespace shared by ``arrays`` (``None`` entries are ignored).

    Raises ``TypeError`` naming the type of an entry that is not an array (a list), or both namespaces
    when arrays from different libraries are mixed.
    """
    from array_api_compat import array_namespace

    present = [a for a in arrays if a is not None]
    if not present:
        raise TypeError("namespace_of needs at least one array")
    try:
        return array_namespace(*present)
    except TypeError as exc:
        from array_api_compat import is_array_api_obj

        other = [a for a in present if not is_array_api_obj(a)]
        if other:
            raise TypeError(f"expected an array (numpy, cupy or array_api_strict), got {type(other[0]).__name__}; "
                            "convert it first, e.g. with numpy.asarray or pyeqprop.backend.asarray") from None
        kinds = sorted({type(a).__module__ + "." + type(a).__name__ for a in present})
        raise TypeError(
            f"arrays from different namespaces were mixed in one call: {kinds}; "
            "move them to one backend first (pyeqprop.backend.asarray)"
        ) from exc


def backend_name(xp: ModuleType) -> str:
    """Short name ('numpy', 'cupy', 'array_api_strict') of a namespace."""
    name = getattr(xp, "__name__", str(xp))
    if "strict" in name:
        return "array_api_strict"
    if "cupy" in name:
        return "cupy"
    return "numpy"


def asarray(a, *, xp: ModuleType | str | None = None, dtype=None) -> Array:
    """Move host data (NumPy arrays, lists) onto the namespace ``xp`` (default: process backend)."""
    xp = resolve(xp)
    if dtype is not None and isinstance(dtype, str):
        dtype = getattr(xp, dtype)
    if backend_name(xp) != "numpy" and not isinstance(a, np.ndarray) and hasattr(a, "__array_namespace__"):
        a = to_numpy(a)
    return xp.asarray(a, dtype=dtype)


def to_numpy(a: Array) -> np.ndarray:
    """Copy any supported array to a host NumPy array (the one way back to host)."""
    if isinstance(a, np.ndarray):
        return a
    mod = type(a).__module__
    if mod.startswith("cupy"):
        return a.get()
    if "array_api_strict" in mod:
        # array_api_strict arrays live on a CPU device and support the buffer protocol via __dlpack__
        return np.from_dlpack(a)
    if np.isscalar(a):
        return np.asarray(a)
    return np.asarray(a)


def device_of(a):
    """The device of array ``a`` (works on NumPy < 2, which lacks ``.device``)."""
    from array_api_compat import device

    return device(a)
