"""2-D convolution (cross-correlation) and its two adjoints (Eqs. 2.1-2.4 of SPEC.md).

Notation: n batch, c input channels, o output channels, h×w input size, k_h×k_w kernel,
s stride, p padding; h' = (h + 2p − k_h)//s + 1 and w' likewise (Eq. 2.2). x_p is x
zero-padded by p on each spatial side.

All three functions share one layout strategy: the padded input is moved to
channels-last and unfolded into a patch matrix whose rows are output positions and whose
columns are (a, b, c) kernel taps (``_unfold``); every contraction is then a single 2-D
matrix product. ``_fold`` is the adjoint of ``_unfold`` (scatter-add of overlapping
patches), which makes ``conv2d_transpose`` the exact adjoint of ``conv2d``.
"""
from __future__ import annotations

from .._shapes import check_nonneg, check_pos, conv_outsize, pair
from ..backend import device_of, namespace_of

__all__ = ["conv2d", "conv2d_transpose", "conv2d_weight_grad", "conv2d_bias_grad", "conv_weight_matrix"]


def _check_float(name, a, ref_dtype=None):
    if ref_dtype is not None and a.dtype != ref_dtype:
        raise ValueError(f"{name} has dtype {a.dtype} but the input has dtype {ref_dtype}; "
                         "expected matching float32 or float64 arrays")


def _check_rank(name, a, rank, symbols):
    if a.ndim != rank:
        raise ValueError(f"{name} must have rank {rank} {symbols}, got shape {tuple(a.shape)}")


def _geometry(stride, padding):
    s = pair(stride, "stride")
    p = pair(padding, "padding")
    check_pos(s, "stride")
    check_nonneg(p, "padding")
    return s, p


def _pad_channels_last(x, p):
    """x (n, c, h, w) -> x_p in channels-last layout (n, h + 2p_h, w + 2p_w, c)."""
    xp = namespace_of(x)
    n, c, h, w = x.shape
    x_cl = xp.permute_dims(x, (0, 2, 3, 1))  # (n, c, h, w) -> (n, h, w, c)
    if p == (0, 0):
        return x_cl
    out = xp.zeros((n, h + 2 * p[0], w + 2 * p[1], c), dtype=x.dtype, device=device_of(x))
    out[:, p[0]:p[0] + h, p[1]:p[1] + w, :] = x_cl
    return out


def _unfold(x_cl, k, s, out_hw):
    """Patch matrix of a padded channels-last input.

    x_cl (n, H, W, c) -> cols (n·h'·w', k_h·k_w·c), column index (a·k_w + b)·c + ci.
    """
    xp = namespace_of(x_cl)
    n, _, _, c = x_cl.shape
    ho, wo = out_hw
    taps = [
        x_cl[:, a:a + s[0] * (ho - 1) + 1:s[0], b:b + s[1] * (wo - 1) + 1:s[1], :]  # (n, h', w', c)
        for a in range(k[0]) for b in range(k[1])
    ]
    cols = taps[0] if len(taps) == 1 else xp.concat(taps, axis=3)  # (n, h', w', k_h·k_w·c)
    return xp.reshape(cols, (n * ho * wo, k[0] * k[1] * c))  # -> (n·h'·w', k_h·k_w·c)


def _fold(cols, n, c, padded_hw, k, s, out_hw):
    """Adjoint of ``_unfold``: scatter-add patch columns back into (n, H, W, c).

    Each tap is added in place (``out[sl] += …``, which the standard defines through
    ``__setitem__``): no temporary of the slice's size per tap.
    """
    xp = namespace_of(cols)
    ho, wo = out_hw
    cols = xp.reshape(cols, (n, ho, wo, k[0] * k[1] * c))  # (n·h'·w', k_h·k_w·c) -> (n, h', w', k_h·k_w·c)
    out = xp.zeros((n, padded_hw[0], padded_hw[1], c), dtype=cols.dtype, device=device_of(cols))
    for a in range(k[0]):
        for b in range(k[1]):
            t = a * k[1] + b
            rows = slice(a, a + s[0] * (ho - 1) + 1, s[0])
            cls = slice(b, b + s[1] * (wo - 1) + 1, s[1])
            out[:, rows, cls, :] += cols[:, :, :, t * c:(t + 1) * c]
    return out


def conv_weight_matrix(w):
    """The patch-matrix form of a kernel: w (o, c, k_h, k_w) -> W (k_h·k_w·c, o), Eq. (2.1).

    Row (a·k_w + b)·c + ci of W is w[:, ci, a, b], matching the columns of the patch matrix, so
    conv2d is ``cols @ W`` and conv2d_transpose ``g @ Wᵀ``. Building W moves every element of w
    (a transposing copy); a caller applying the same kernel many times (every step of a settling
    phase) builds it once and passes it as ``weight_matrix=``.
    """
    xp = namespace_of(w)
    _check_rank("w", w, 4, "(o, c, k_h, k_w)")
    o, c, kh, kw = w.shape
    w_t = xp.permute_dims(w, (2, 3, 1, 0))  # (o, c, k_h, k_w) -> (k_h, k_w, c, o)
    return xp.reshape(w_t, (kh * kw * c, o))  # -> (k_h·k_w·c, o)


def _matrix_of(w, weight_matrix):
    """``weight_matrix`` checked against w's shape, or W built from w."""
    if weight_matrix is None:
        return conv_weight_matrix(w)
    o, c, kh, kw = w.shape
    if tuple(weight_matrix.shape) != (kh * kw * c, o) or weight_matrix.dtype != w.dtype:
        raise ValueError(f"weight_matrix must be conv_weight_matrix(w): shape ({kh * kw * c}, {o}) and dtype "
                         f"{w.dtype}, got shape {tuple(weight_matrix.shape)} and dtype {weight_matrix.dtype}")
    return weight_matrix


def conv2d(x, w, b=None, *, stride=1, padding=0, weight_matrix=None):
    """2-D cross-correlation, Eq. (2.1).

    Notation: see the module docstring.

    Definition:
        y[n,o,i,j] = b[o] + Σ_{c,a,β} w[o,c,a,β] · x_p[n,c, s_h·i + a, s_w·j + β]

    Parameters
    ----------
    x : (n, c, h, w) array, float32 or float64.
    w : (o, c, k_h, k_w) array, same dtype as x.
    b : (o,) array or None.
    stride, padding : int or (int, int); stride ≥ 1, padding ≥ 0.
    weight_matrix : (k_h·k_w·c, o) array or None, ``conv_weight_matrix(w)`` built once by a caller
        that applies w many times (None: built here).

    Returns
    -------
    y : (n, o, h', w'), same dtype and namespace as x.

    Adjoint
    -------
    ⟨conv2d(x, w), g⟩ = ⟨x, conv2d_transpose(g, w, output_size=(h, w))⟩   (Eq. 2.3)
                      = ⟨w, conv2d_weight_grad(x, g, kernel_size=(k_h, k_w))⟩   (Eq. 2.4)
    for b = None, with the same stride and padding.
    """
    xp = namespace_of(x, w, b)
    s, p = _geometry(stride, padding)
    _check_rank("x", x, 4, "(n, c, h, w)")
    _check_rank("w", w, 4, "(o, c, k_h, k_w)")
    _check_float("w", w, x.dtype)
    n, c, h, wd = x.shape
    o, cw, kh, kw = w.shape
    if cw != c:
        raise ValueError(f"w has {cw} input channels but x has {c}: expected w of shape ({o}, {c}, {kh}, {kw})")
    if b is not None:
        _check_float("b", b, x.dtype)
        if tuple(b.shape) != (o,):
            raise ValueError(f"b must have shape ({o},), got {tuple(b.shape)}")
    ho = conv_outsize(h, kh, s[0], p[0])
    wo = conv_outsize(wd, kw, s[1], p[1])
    cols = _unfold(_pad_channels_last(x, p), (kh, kw), s, (ho, wo))  # (n·h'·w', k_h·k_w·c)
    y = cols @ _matrix_of(w, weight_matrix)  # (n·h'·w', o)
    if b is not None:
        y = y + b
    y = xp.reshape(y, (n, ho, wo, o))  # (n·h'·w', o) -> (n, h', w', o)
    return xp.permute_dims(y, (0, 3, 1, 2))  # -> (n, o, h', w')


def _resolve_output_size(output_size, g_shape, k, s, p, name="output_size"):
    if output_size is None:
        raise ValueError(f"{name} is required: the input size (h, w) is ambiguous when stride > 1")
    if len(output_size) == 4:
        output_size = output_size[2:]
    h, wd = pair(tuple(int(v) for v in output_size), name)
    ho, wo = g_shape[2], g_shape[3]
    for size, out, kk, ss, pp, axis in ((h, ho, k[0], s[0], p[0], "h"), (wd, wo, k[1], s[1], p[1], "w")):
        ok = size + 2 * pp >= kk and conv_outsize(size, kk, ss, pp) == out
        if not ok:
            lo = (out - 1) * ss + kk - 2 * pp
            raise ValueError(
                f"{name} {axis}={size} is inconsistent with the gradient's spatial size {out} "
                f"(kernel {kk}, stride {ss}, padding {pp}): expected {axis} in [{max(lo, 1)}, {lo + ss - 1}]"
            )
    return h, wd


def conv2d_transpose(g, w, *, stride=1, padding=0, output_size, weight_matrix=None):
    """Transposed convolution: the adjoint of :func:`conv2d` in x, Eq. (2.3).

    Definition:
        z[n,c,u,v] = Σ_{o,i,j,a,β : s_h·i + a − p_h = u, s_w·j + β − p_w = v} w[o,c,a,β] · g[n,o,i,j]

    Parameters
    ----------
    g : (n, o, h', w') array.
    w : (o, c, k_h, k_w) array, same dtype as g.
    output_size : (h, w) or (n, c, h, w) — the input size of the forward conv. Required,
        because with stride > 1 several input sizes give the same h'.
    weight_matrix : (k_h·k_w·c, o) array or None, ``conv_weight_matrix(w)`` (see :func:`conv2d`).

    Returns
    -------
    z : (n, c, h, w), same dtype and namespace as g.

    Adjoint
    -------
    ⟨conv2d(x, w), g⟩ = ⟨x, conv2d_transpose(g, w, output_size=x.shape)⟩; its own adjoint is conv2d.
    """
    xp = namespace_of(g, w)
    s, p = _geometry(stride, padding)
    _check_rank("g", g, 4, "(n, o, h', w')")
    _check_rank("w", w, 4, "(o, c, k_h, k_w)")
    _check_float("w", w, g.dtype)
    n, o, ho, wo = g.shape
    ow, c, kh, kw = w.shape
    if ow != o:
        raise ValueError(f"w has {ow} output channels but g has {o}: expected w of shape ({o}, c, {kh}, {kw})")
    h, wd = _resolve_output_size(output_size, g.shape, (kh, kw), s, p)
    g_cl = xp.permute_dims(g, (0, 2, 3, 1))  # (n, o, h', w') -> (n, h', w', o)
    g_mat = xp.reshape(g_cl, (n * ho * wo, o))  # -> (n·h'·w', o)
    cols = g_mat @ xp.matrix_transpose(_matrix_of(w, weight_matrix))  # (n·h'·w', k_h·k_w·c)
    z = _fold(cols, n, c, (h + 2 * p[0], wd + 2 * p[1]), (kh, kw), s, (ho, wo))  # (n, H, W, c)
    z = z[:, p[0]:p[0] + h, p[1]:p[1] + wd, :]  # crop the padding -> (n, h, w, c)
    return xp.permute_dims(z, (0, 3, 1, 2))  # -> (n, c, h, w)


def conv2d_weight_grad(x, g, *, kernel_size, stride=1, padding=0):
    """Adjoint of :func:`conv2d` in w (the weight gradient), Eq. (2.4).

    Definition:
        Δw[o,c,a,β] = Σ_{n,i,j} g[n,o,i,j] · x_p[n,c, s_h·i + a, s_w·j + β]

    Parameters
    ----------
    x : (n, c, h, w) array; g : (n, o, h', w') array, same dtype.
    kernel_size : int or (k_h, k_w).

    Returns
    -------
    Δw : (o, c, k_h, k_w), same dtype and namespace as x.

    Adjoint
    -------
    ⟨conv2d(x, w), g⟩ = ⟨w, conv2d_weight_grad(x, g, kernel_size=w.shape[2:])⟩.
    """
    xp = namespace_of(x, g)
    s, p = _geometry(stride, padding)
    k = pair(kernel_size, "kernel_size")
    check_pos(k, "kernel_size")
    _check_rank("x", x, 4, "(n, c, h, w)")
    _check_rank("g", g, 4, "(n, o, h', w')")
    _check_float("g", g, x.dtype)
    n, c, h, wd = x.shape
    ng, o, ho, wo = g.shape
    eh = conv_outsize(h, k[0], s[0], p[0])
    ew = conv_outsize(wd, k[1], s[1], p[1])
    if ng != n or (ho, wo) != (eh, ew):
        raise ValueError(f"g must have shape ({n}, o, {eh}, {ew}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(g.shape)}")
    cols = _unfold(_pad_channels_last(x, p), k, s, (ho, wo))  # (n·h'·w', k_h·k_w·c)
    g_cl = xp.permute_dims(g, (0, 2, 3, 1))  # (n, o, h', w') -> (n, h', w', o)
    g_mat = xp.reshape(g_cl, (n * ho * wo, o))  # -> (n·h'·w', o)
    dw = xp.matrix_transpose(g_mat) @ cols  # (o, k_h·k_w·c)
    dw = xp.reshape(dw, (o, k[0], k[1], c))  # -> (o, k_h, k_w, c)
    return xp.permute_dims(dw, (0, 3, 1, 2))  # -> (o, c, k_h, k_w)


def conv2d_bias_grad(g):
    """Adjoint of the bias term of :func:`conv2d`: Δb[o] = Σ_{n,i,j} g[n,o,i,j]. g (n, o, h', w') -> (o,)."""
    xp = namespace_of(g)
    _check_rank("g", g, 4, "(n, o, h', w')")
    return xp.sum(g, axis=(0, 2, 3))
