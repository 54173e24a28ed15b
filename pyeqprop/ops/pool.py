"""Max and average pooling with their adjoints (Eqs. 2.5-2.8 of SPEC.md).

Notation: n batch, c channels, h×w input, k_h×k_w window, s stride (no padding);
h' = (h − k_h)//s_h + 1, w' likewise (Eq. 2.5). A window (i, j) covers input rows
s_h·i + a and columns s_w·j + β for 0 ≤ a < k_h, 0 ≤ β < k_w.

Every function sweeps the k_h·k_w window *offsets* (a, β) and handles all windows at
once with a strided slice, so the code is pure Array API (no gather/scatter) and
overlapping windows (s < k) are exact: the unpooling adjoints accumulate.
"""
from __future__ import annotations

from .._shapes import check_pos, pair, pool_outsize
from ..backend import device_of, namespace_of

__all__ = ["max_pool2d", "max_pool2d_select", "max_unpool2d", "avg_pool2d", "avg_unpool2d"]


def _geometry(kernel_size, stride):
    k = pair(kernel_size, "kernel_size")
    s = pair(k if stride is None else stride, "stride")
    check_pos(k, "kernel_size")
    check_pos(s, "stride")
    return k, s


def _check_input(x, name="x"):
    if x.ndim != 4:
        raise ValueError(f"{name} must have rank 4 (n, c, h, w), got shape {tuple(x.shape)}")


def _window(a, b, k_out, s):
    """Strided slices selecting input element (s·i + a, s·j + b) for every window (i, j)."""
    ho, wo = k_out
    return (slice(a, a + s[0] * (ho - 1) + 1, s[0]), slice(b, b + s[1] * (wo - 1) + 1, s[1]))


def _corners(xp, out_hw, w, s, device):
    """Flat index (s_h·i)·w + s_w·j of each window's top-left input element, shape (h', w') int64."""
    ho, wo = out_hw
    i = xp.reshape(xp.arange(ho, dtype=xp.int64, device=device), (ho, 1))
    j = xp.reshape(xp.arange(wo, dtype=xp.int64, device=device), (1, wo))
    return (s[0] * i) * w + s[1] * j  # (h', 1) + (1, w') -> (h', w')


def _check_output_size(output_size, y_shape, k, s):
    if output_size is None:
        raise ValueError("output_size is required: the input size (h, w) is ambiguous")
    if len(output_size) == 4:
        output_size = output_size[2:]
    h, w = pair(tuple(int(v) for v in output_size), "output_size")
    for size, out, kk, ss, axis in ((h, y_shape[2], k[0], s[0], "h"), (w, y_shape[3], k[1], s[1], "w")):
        if size < kk or pool_outsize(size, kk, ss) != out:
            lo = (out - 1) * ss + kk
            raise ValueError(
                f"output_size {axis}={size} is inconsistent with the pooled size {out} "
                f"(kernel {kk}, stride {ss}): expected {axis} in [{lo}, {lo + ss - 1}]"
            )
    return h, w


def max_pool2d(x, *, kernel_size=2, stride=2):
    """Max pooling with argmax indices, Eq. (2.6).

    Definition:
        y[n,c,i,j] = max_{a,β} x[n,c, s_h·i + a, s_w·j + β]
        indices[n,c,i,j] = (s_h·i + a*)·w + (s_w·j + β*), the flat position in the (h, w)
        plane of the first maximum in row-major window order (PyTorch's convention).
        A window holding NaN gives NaN, at the position of its last NaN (PyTorch's CPU kernel):
        a diverging state is never hidden by the pooling above it.

    Parameters
    ----------
    x : (n, c, h, w). kernel_size, stride : int or pair (stride defaults to 2).

    Returns
    -------
    y : (n, c, h', w'), same dtype as x; indices : (n, c, h', w') int64.

    Adjoint
    -------
    At fixed indices the map x ↦ y is linear (a selection); its adjoint is
    :func:`max_unpool2d`: ⟨y(x), g⟩ = ⟨x, max_unpool2d(g, indices, output_size=x.shape)⟩.
    """
    xp = namespace_of(x)
    _check_input(x)
    k, s = _geometry(kernel_size, stride)
    n, c, h, w = x.shape
    ho, wo = pool_outsize(h, k[0], s[0]), pool_outsize(w, k[1], s[1])
    dev = device_of(x)
    base = _corners(xp, (ho, wo), w, s, dev)  # (h', w')
    y = None
    idx = None
    for a in range(k[0]):
        for b in range(k[1]):
            v = x[(slice(None), slice(None)) + _window(a, b, (ho, wo), s)]  # (n, c, h', w')
            pos = base + (a * w + b)
            if y is None:
                y = v
                idx = xp.broadcast_to(pos, v.shape)
            else:
                take = (v > y) | xp.isnan(v)  # strict: ties keep the first maximum; a NaN wins (as torch)
                y = xp.where(take, v, y)
                idx = xp.where(take, pos, idx)
    return y, xp.astype(idx, xp.int64)


def max_unpool2d(y, indices, *, kernel_size=2, stride=2, output_size):
    """Adjoint of :func:`max_pool2d` at fixed indices (max-unpooling), Eq. (2.7).

    Definition:
        z[n,c,u,v] = Σ_{i,j : indices[n,c,i,j] = u·w + v} y[n,c,i,j]
    (a scatter-add: with overlapping windows one input may receive several terms).

    Parameters
    ----------
    y : (n, c, h', w'); indices : (n, c, h', w') integer, as returned by max_pool2d with
        the same kernel_size and stride; output_size : (h, w) or (n, c, h, w).

    Returns
    -------
    z : (n, c, h, w), same dtype and namespace as y; zero where no window took its max.

    When the windows tile the plane (kernel = stride and h = k_h·h′, w = k_w·w′) z is one
    selection (no scatter) and its memory is channels-last; otherwise one masked add per tap.

    Adjoint
    -------
    Its adjoint is pooling by selection: x ↦ x[indices] (max_pool2d's values at fixed indices).
    """
    xp = namespace_of(y, indices)
    _check_input(y, "y")
    k, s = _geometry(kernel_size, stride)
    if tuple(indices.shape) != tuple(y.shape):
        raise ValueError(f"indices must have the shape of y {tuple(y.shape)}, got {tuple(indices.shape)}")
    h, w = _check_output_size(output_size, y.shape, k, s)
    n, c, ho, wo = y.shape
    dev = device_of(y)
    indices = xp.astype(indices, xp.int64)
    zero = xp.zeros((), dtype=y.dtype, device=dev)
    if k == s and (h, w) == (k[0] * ho, k[1] * wo):
        # The windows tile the plane: z is one selection, built channels-last over the
        # (n, h', k_h, w', k_w, c) view, whose element (i, a, j, β) sits at flat position
        # (k_h·i + a)·w + k_w·j + β. Channels innermost keeps the inner loop long, and the
        # result's memory is what conv2d_transpose and conv2d_weight_grad read (no copy there).
        pos = xp.reshape(xp.arange(h * w, dtype=xp.int64, device=dev), (1, ho, k[0], wo, k[1], 1))
        y6 = xp.reshape(xp.permute_dims(y, (0, 2, 3, 1)), (n, ho, 1, wo, 1, c))  # (n, c, h', w') -> (n, h', 1, w', 1, c)
        i6 = xp.reshape(xp.permute_dims(indices, (0, 2, 3, 1)), (n, ho, 1, wo, 1, c))
        z = xp.where(i6 == pos, y6, zero)  # (n, h', k_h, w', k_w, c)
        z = xp.reshape(z, (n, h, w, c))  # -> (n, h, w, c)
        return xp.permute_dims(z, (0, 3, 1, 2))  # -> (n, c, h, w)
    base = _corners(xp, (ho, wo), w, s, dev)  # (h', w')
    z = xp.zeros((n, c, h, w), dtype=y.dtype, device=dev)
    for a in range(k[0]):
        for b in range(k[1]):
            sl = (slice(None), slice(None)) + _window(a, b, (ho, wo), s)
            z[sl] += xp.where(indices == base + (a * w + b), y, zero)
    return z


def max_pool2d_select(x, indices, *, kernel_size=2, stride=2):
    """Pooling by selection at fixed indices, Eq. (2.7a): the adjoint of :func:`max_unpool2d`.

    Definition:
        y[n,c,i,j] = x[n,c, u, v]  with  u·w + v = indices[n,c,i,j]
    (each index must lie in its own window (i, j), as max_pool2d returns it).
    ``max_pool2d_select(x, max_pool2d(x)[1])`` equals ``max_pool2d(x)[0]``; the map is linear
    in x, which is what the BPTT reverse pass needs at frozen argmaxes.

    Parameters: x (n, c, h, w); indices (n, c, h', w') integer.
    Returns: y (n, c, h', w'), same dtype and namespace as x.

    Adjoint
    -------
    ⟨max_pool2d_select(x, idx), g⟩ = ⟨x, max_unpool2d(g, idx, output_size=x.shape)⟩.
    """
    xp = namespace_of(x, indices)
    _check_input(x)
    k, s = _geometry(kernel_size, stride)
    n, c, h, w = x.shape
    ho, wo = pool_outsize(h, k[0], s[0]), pool_outsize(w, k[1], s[1])
    if tuple(indices.shape) != (n, c, ho, wo):
        raise ValueError(f"indices must have shape {(n, c, ho, wo)} for x of shape {tuple(x.shape)}, "
                         f"got {tuple(indices.shape)}")
    dev = device_of(x)
    base = _corners(xp, (ho, wo), w, s, dev)  # (h', w')
    indices = xp.astype(indices, xp.int64)
    y = xp.zeros((n, c, ho, wo), dtype=x.dtype, device=dev)
    for a in range(k[0]):
        for b in range(k[1]):
            v = x[(slice(None), slice(None)) + _window(a, b, (ho, wo), s)]  # (n, c, h', w')
            y = xp.where(indices == base + (a * w + b), v, y)
    return y


def avg_pool2d(x, *, kernel_size=2, stride=2):
    """Average pooling, Eq. (2.8): y[n,c,i,j] = (1/(k_h·k_w)) Σ_{a,β} x[n,c, s_h·i + a, s_w·j + β].

    Parameters: x (n, c, h, w). Returns: y (n, c, h', w'), same dtype and namespace.

    Adjoint
    -------
    ⟨avg_pool2d(x), g⟩ = ⟨x, avg_unpool2d(g, output_size=x.shape)⟩.
    """
    namespace_of(x)  # a supported array, or a clear TypeError
    _check_input(x)
    k, s = _geometry(kernel_size, stride)
    n, c, h, w = x.shape
    ho, wo = pool_outsize(h, k[0], s[0]), pool_outsize(w, k[1], s[1])
    acc = None
    for a in range(k[0]):
        for b in range(k[1]):
            v = x[(slice(None), slice(None)) + _window(a, b, (ho, wo), s)]  # (n, c, h', w')
            acc = v if acc is None else acc + v
    return acc * (1.0 / (k[0] * k[1]))


def avg_unpool2d(y, *, kernel_size=2, stride=2, output_size):
    """Adjoint of :func:`avg_pool2d`, Eq. (2.8):
    z[n,c,u,v] = (1/(k_h·k_w)) Σ_{i,j : (u,v) in window (i,j)} y[n,c,i,j].

    Parameters: y (n, c, h', w'); output_size (h, w) or (n, c, h, w).
    Returns: z (n, c, h, w), same dtype and namespace as y.

    Adjoint
    -------
    Its adjoint is :func:`avg_pool2d`.
    """
    xp = namespace_of(y)
    _check_input(y, "y")
    k, s = _geometry(kernel_size, stride)
    h, w = _check_output_size(output_size, y.shape, k, s)
    n, c, ho, wo = y.shape
    z = xp.zeros((n, c, h, w), dtype=y.dtype, device=device_of(y))
    yk = y * (1.0 / (k[0] * k[1]))
    for a in range(k[0]):
        for b in range(k[1]):
            sl = (slice(None), slice(None)) + _window(a, b, (ho, wo), s)
            z[sl] += yk
    return z
