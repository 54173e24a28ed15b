# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Switching backend: NumPy, array-api-strict, CuPy
#
# pyeqprop's numerical code is written once against the Python Array API standard. Every
# function infers its namespace from its input arrays; functions that create arrays (a
# `CRNN`, `asarray`) take `xp=` and otherwise use the process default, which comes from
# `pyeqprop.set_backend(...)` or the `PYEQPROP_BACKEND` environment variable.
# `pyeqprop.to_numpy` is the one way back to host memory.
#
# * `numpy`: the default.
# * `array_api_strict`: a CPU namespace that rejects anything outside the standard; the
#   tests run every property under it, so what passes there runs on CuPy too.
# * `cupy`: the GPU. This notebook runs its GPU part only when CuPy and a GPU are present
#   (`pyeqprop.backend.cupy_available()`), and prints a note otherwise.

# %%
import os
import time

import numpy as np

import pyeqprop as pe
from pyeqprop.backend import BACKENDS, BackendError, backend_name, cupy_available, get_backend
from pyeqprop.data import load_dataset

print("backends:", BACKENDS)
print("process default:", backend_name(get_backend()))

# %% [markdown]
# ## The process default
#
# `PYEQPROP_BACKEND` is read whenever no backend has been set with `set_backend` (so in a
# shell: `PYEQPROP_BACKEND=cupy pyeqprop train`). `set_backend` takes precedence and returns
# the namespace.

# %%
os.environ["PYEQPROP_BACKEND"] = "array_api_strict"
print("with PYEQPROP_BACKEND=array_api_strict:", backend_name(get_backend()))
del os.environ["PYEQPROP_BACKEND"]

xp = pe.set_backend("array_api_strict")
net = pe.CRNN("c8m-c16m", (1, 8, 8), dtype="float64")  # xp=None: the process default
print(net)
print("a parameter:", type(net.params["conv1.weight"]).__module__, "->",
      type(pe.to_numpy(net.params["conv1.weight"])).__module__)
pe.set_backend("numpy")
print("process default again:", backend_name(get_backend()))

try:
    pe.set_backend("cupy")
    print("CuPy is usable here; switched back to numpy")
    pe.set_backend("numpy")
except BackendError as exc:  # no CuPy, or no GPU: a clear error, nothing half-switched
    print("BackendError:", exc)

# %% [markdown]
# ## Same EP gradients on NumPy and array-api-strict
#
# Inputs are drawn once on the host and moved with `pyeqprop.backend.asarray`; parameters are
# drawn from NumPy's generator for every backend (Eq. 3.10), so the two networks start equal.

# %%
ds = load_dataset("digits")
x_host = np.asarray(ds.x_train[:32], dtype=np.float64)  # (32, 1, 8, 8)
y_host = np.asarray(ds.y_train[:32])  # (32,)


def ep_on(backend, dtype="float64", x=x_host, y=y_host, arch="c8m-c16m", T1=30, T2=10):
    """Symmetric EP gradients on one backend, as host float64 arrays, and the seconds taken."""
    net = pe.CRNN(arch, x.shape[1:], readout="softmax", dtype=dtype, xp=backend, seed=0)
    xb = pe.backend.asarray(x, xp=backend, dtype=dtype)
    yb = pe.backend.asarray(y, xp=backend)
    t0 = time.perf_counter()
    grads = pe.ep_gradients(net, xb, yb, beta=0.1, T1=T1, T2=T2, estimator="symmetric")
    host = {k: pe.to_numpy(v).astype(np.float64) for k, v in grads.items()}  # to_numpy also waits for a GPU
    return host, time.perf_counter() - t0


def max_rel_diff(a, b):
    return max(float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 1e-300)) for k in b)


g_np, t_np = ep_on("numpy")
g_strict, t_strict = ep_on("array_api_strict")
print(f"numpy            {t_np * 1e3:7.1f} ms")
print(f"array_api_strict {t_strict * 1e3:7.1f} ms")
print(f"largest relative difference per tensor: {max_rel_diff(g_strict, g_np):.1e}")
assert max_rel_diff(g_strict, g_np) < 1e-12

# %% [markdown]
# ## On the GPU
#
# The same calls with `xp="cupy"` (or after `pe.set_backend("cupy")`). We compare the EP
# gradients with NumPy's in float64 (agreement to round-off: the GPU sums in another
# order) and in float32, then time one EP estimate on a larger batch, after a warm-up call
# that compiles CuPy's kernels. `to_numpy` at the end of each call waits for the GPU, so the
# times are complete.

# %%
if cupy_available():
    import cupy

    print("GPU:", cupy.cuda.runtime.getDeviceProperties(0)["name"].decode())
    g_cp, _ = ep_on("cupy")
    print(f"float64: largest relative difference to numpy {max_rel_diff(g_cp, g_np):.1e}")
    g32_np, _ = ep_on("numpy", "float32")
    g32_cp, _ = ep_on("cupy", "float32")
    print(f"float32: largest relative difference to numpy {max_rel_diff(g32_cp, g32_np):.1e}")

    xb, yb = np.asarray(ds.x_train[:256]), np.asarray(ds.y_train[:256])
    ep_on("cupy", "float32", xb, yb, arch="c32m-c64m")  # warm-up: kernel compilation
    for backend in ("numpy", "cupy"):
        _, sec = ep_on(backend, "float32", xb, yb, arch="c32m-c64m", T1=20, T2=6)
        print(f"{backend:<6} c32m-c64m, batch 256, T1 = 20, T2 = 6, float32: {sec * 1e3:8.1f} ms")
else:
    print("CuPy or a GPU is not available here, so the GPU part is skipped. "
          "Install the wheel for your CUDA version (pip install cupy-cuda13x, or cupy-cuda12x) "
          "on a machine with an NVIDIA GPU and run this notebook again.")
