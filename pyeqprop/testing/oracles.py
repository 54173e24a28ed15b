"""Loop-based float64 NumPy oracles for the primitives of SPEC.md §2.

In the manner of JAX's ``lax_reference``: each function is short, computes in float64 by
explicit loops over output (or input) positions, and casts the result back to the input
dtype (``.astype(x.dtype)``) so that dtype bugs in the code under test are not hidden.

This module imports nothing from pyeqprop (not even the shape arithmetic): output sizes
are written out again here, and ``conv2d_transpose`` scatters each output position's
contribution instead of reusing the oracle ``conv2d``.

Notation: n batch, c input channels, o output channels, h×w input, k_h×k_w kernel or
window, s stride, p padding, h' = (h + 2p − k_h)//s_h + 1 (pooling: p = 0).
"""
from __future__ import annotations

import numpy as np

__all__ = [
    "conv2d", "conv2d_transpose", "conv2d_weight_grad",
    "max_pool2d", "max_unpool2d", "avg_pool2d", "avg_unpool2d", "linear",
]


def _pair(v):
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _f64(a):
    return np.asarray(a, dtype=np.float64)


def _pad(x, p):
    """x (n, c, h, w) -> x_p (n, c, h + 2p_h, w + 2p_w), zero border."""
    n, c, h, w = x.shape
    x_p = np.zeros((n, c, h + 2 * p[0], w + 2 * p[1]))
    x_p[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    return x_p


def conv2d(x, w, b=None, *, stride=1, padding=0):
    """y[n,o,i,j] = b[o] + Σ_{c,a,β} w[o,c,a,β] x_p[n,c,s_h i + a, s_w j + β] (Eq. 2.1)."""
    s, p = _pair(stride), _pair(padding)
    x_p, w64 = _pad(_f64(x), p), _f64(w)
    n, _, hp, wp = x_p.shape
    o, _, kh, kw = w64.shape
    ho, wo = (hp - kh) // s[0] + 1, (wp - kw) // s[1] + 1
    y = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = x_p[:, :, s[0] * i:s[0] * i + kh, s[1] * j:s[1] * j + kw]  # (n, c, k_h, k_w)
            y[:, :, i, j] = np.einsum("ncab,ocab->no", patch, w64)
    if b is not None:
        y += _f64(b)[None, :, None, None]
    return y.astype(x.dtype)


def conv2d_transpose(g, w, *, stride=1, padding=0, output_size):
    """Adjoint of conv2d in x (Eq. 2.3), by scattering each g[:, :, i, j] into its window."""
    s, p = _pair(stride), _pair(padding)
    h, wd = (int(output_size[-2]), int(output_size[-1]))
    g64, w64 = _f64(g), _f64(w)
    n, _, ho, wo = g64.shape
    _, c, kh, kw = w64.shape
    z_p = np.zeros((n, c, h + 2 * p[0], wd + 2 * p[1]))
    for i in range(ho):
        for j in range(wo):
            z_p[:, :, s[0] * i:s[0] * i + kh, s[1] * j:s[1] * j + kw] += np.einsum(
                "no,ocab->ncab", g64[:, :, i, j], w64)  # (n, c, k_h, k_w)
    return z_p[:, :, p[0]:p[0] + h, p[1]:p[1] + wd].astype(g.dtype)


def conv2d_weight_grad(x, g, *, kernel_size, stride=1, padding=0):
    """Δw[o,c,a,β] = Σ_{n,i,j} g[n,o,i,j] x_p[n,c,s_h i + a, s_w j + β] (Eq. 2.4)."""
    k, s, p = _pair(kernel_size), _pair(stride), _pair(padding)
    x_p, g64 = _pad(_f64(x), p), _f64(g)
    _, c, _, _ = x_p.shape
    _, o, ho, wo = g64.shape
    dw = np.zeros((o, c, k[0], k[1]))
    for i in range(ho):
        for j in range(wo):
            patch = x_p[:, :, s[0] * i:s[0] * i + k[0], s[1] * j:s[1] * j + k[1]]  # (n, c, k_h, k_w)
            dw += np.einsum("no,ncab->ocab", g64[:, :, i, j], patch)
    return dw.astype(x.dtype)


def max_pool2d(x, *, kernel_size=2, stride=2):
    """Max pooling with indices (Eq. 2.6), PyTorch's convention: the index is the flat
    position u·w + v in the (h, w) plane of the first maximum in row-major window order."""
    k, s = _pair(kernel_size), _pair(stride)
    n, c, h, w = x.shape
    ho, wo = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
    x64 = _f64(x)
    y = np.zeros((n, c, ho, wo))
    idx = np.zeros((n, c, ho, wo), dtype=np.int64)
    for nn in range(n):
        for cc in range(c):
            for i in range(ho):
                for j in range(wo):
                    win = x64[nn, cc, s[0] * i:s[0] * i + k[0], s[1] * j:s[1] * j + k[1]]
                    t = int(np.argmax(win))  # np.argmax returns the first maximum, row-major
                    a, b = divmod(t, k[1])
                    y[nn, cc, i, j] = win[a, b]
                    idx[nn, cc, i, j] = (s[0] * i + a) * w + (s[1] * j + b)
    return y.astype(x.dtype), idx


def max_unpool2d(y, indices, *, output_size):
    """z[n,c,u,v] = Σ_{i,j : indices[n,c,i,j] = u·w + v} y[n,c,i,j] (Eq. 2.7), a scatter-add.

    Needs no kernel or stride: the indices carry all the geometry.
    """
    h, w = int(output_size[-2]), int(output_size[-1])
    n, c, ho, wo = y.shape
    y64 = _f64(y)
    z = np.zeros((n, c, h * w))
    for nn in range(n):
        for cc in range(c):
            for i in range(ho):
                for j in range(wo):
                    z[nn, cc, int(indices[nn, cc, i, j])] += y64[nn, cc, i, j]
    return z.reshape(n, c, h, w).astype(y.dtype)


def avg_pool2d(x, *, kernel_size=2, stride=2):
    """y[n,c,i,j] = mean of the window (i, j) of x (Eq. 2.8)."""
    k, s = _pair(kernel_size), _pair(stride)
    n, c, h, w = x.shape
    ho, wo = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
    x64 = _f64(x)
    y = np.zeros((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            win = x64[:, :, s[0] * i:s[0] * i + k[0], s[1] * j:s[1] * j + k[1]]  # (n, c, k_h, k_w)
            y[:, :, i, j] = win.sum(axis=(2, 3)) / (k[0] * k[1])
    return y.astype(x.dtype)


def avg_unpool2d(y, *, kernel_size=2, stride=2, output_size):
    """Adjoint of avg_pool2d (Eq. 2.8): each y[:, :, i, j]/(k_h k_w) is added to its window."""
    k, s = _pair(kernel_size), _pair(stride)
    h, w = int(output_size[-2]), int(output_size[-1])
    n, c, ho, wo = y.shape
    y64 = _f64(y)
    z = np.zeros((n, c, h, w))
    for i in range(ho):
        for j in range(wo):
            z[:, :, s[0] * i:s[0] * i + k[0], s[1] * j:s[1] * j + k[1]] += (
                y64[:, :, i, j, None, None] / (k[0] * k[1]))
    return z.astype(y.dtype)


def linear(x, w, b=None):
    """y[n,o] = b[o] + Σ_i w[o,i] x[n,i] (Eq. 2.11)."""
    x64, w64 = _f64(x), _f64(w)
    y = np.zeros((x64.shape[0], w64.shape[0]))
    for o in range(w64.shape[0]):
        y[:, o] = (x64 * w64[o]).sum(axis=1)  # (n, i) · (i,) -> (n,)
    if b is not None:
        y += _f64(b)
    return y.astype(x.dtype)
