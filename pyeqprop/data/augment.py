"""Data augmentation and normalisation on any Array API backend.

The random choices (crop offsets, flips) are drawn on the host from a NumPy
``Generator``; only those few numbers travel to the device, and the images are moved with
standard Array API operations (``take``, ``where``, ``flip``, arithmetic), so the same code runs
on NumPy, CuPy and ``array_api_strict`` arrays. The namespace is inferred from ``x``.

Notation: n images, c channels, h×w size, p padding.

Random crop with padding p: conceptually pad each image by p pixels on every side (zeros, or
the edge pixel for ``padding_mode='edge'``) and cut an h×w window at offset (a, b) ∈ [0, 2p]²:

    y[n, c, i, j] = x_pad[n, c, i + a_n, j + b_n] = x[n, c, i + a_n − p, j + b_n − p]

where x outside the image is 0 (zeros) or the nearest edge pixel (edge). No padded copy is
built: one gather reads x at the clipped source indices, and a mask zeroes what falls outside.

Horizontal flip: y[n, :, :, j] = x[n, :, :, w − 1 − j] for the chosen images.

The CIFAR recipe of Laborieux et al. 2021 is: random crop 32 with 4-pixel *edge* padding, random
horizontal flip, then normalise; ``padding_mode='zeros'`` is the default here, pass
``padding_mode='edge'`` to follow that recipe exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..backend import device_of, namespace_of

__all__ = [
    "crop",
    "random_crop",
    "hflip",
    "random_hflip",
    "augment",
    "normalize",
    "PADDING_MODES",
]

PADDING_MODES = ("zeros", "edge")


def _check_rng(rng) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                        f"got {type(rng).__name__}")
    return rng


def crop(x, offsets_y, offsets_x, *, padding: int = 4, padding_mode: str = "zeros"):
    """Crop each image of the padded batch at the given offsets (deterministic part of the crop).

    Parameters: x (n, c, h, w); offsets_y, offsets_x host integer sequences of length n with
    values in [0, 2p] (a_n, b_n above; a = b = p is the identity).
    Returns: (n, c, h, w), same dtype, namespace and device as x.
    """
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    xp = namespace_of(x)
    dev = device_of(x)
    n, c, h, w = x.shape
    oy = np.asarray(offsets_y, dtype=np.int64).reshape(-1)
    ox = np.asarray(offsets_x, dtype=np.int64).reshape(-1)
    if oy.shape != (n,) or ox.shape != (n,):
        raise ValueError(f"need {n} offsets per axis, got {oy.shape} and {ox.shape}")
    if oy.size and (min(oy.min(), ox.min()) < 0 or max(oy.max(), ox.max()) > 2 * padding):
        raise ValueError(f"offsets must lie in [0, {2 * padding}]")
    i64 = xp.int64
    a = xp.reshape(xp.asarray(oy - padding, dtype=i64, device=dev), (n, 1, 1, 1))
    b = xp.reshape(xp.asarray(ox - padding, dtype=i64, device=dev), (n, 1, 1, 1))
    rows = xp.reshape(xp.arange(h, dtype=i64, device=dev), (1, 1, h, 1)) + a  # (n, 1, h, 1) source rows
    cols = xp.reshape(xp.arange(w, dtype=i64, device=dev), (1, 1, 1, w)) + b  # (n, 1, 1, w) source cols
    rows_c = xp.minimum(xp.maximum(rows, 0), h - 1)
    cols_c = xp.minimum(xp.maximum(cols, 0), w - 1)
    plane = (xp.reshape(xp.arange(n, dtype=i64, device=dev), (n, 1, 1, 1)) * c
             + xp.reshape(xp.arange(c, dtype=i64, device=dev), (1, c, 1, 1)))  # (n, c, 1, 1) image·channel
    flat_idx = (plane * h + rows_c) * w + cols_c  # (n, c, h, w) index into x flattened
    out = xp.take(xp.reshape(x, (n * c * h * w,)), xp.reshape(flat_idx, (n * c * h * w,)), axis=0)
    out = xp.reshape(out, (n, c, h, w))  # (n·c·h·w,) -> (n, c, h, w)
    if padding_mode == "zeros" and padding > 0:
        inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)  # (n, 1, h, w)
        out = xp.where(inside, out, xp.zeros((), dtype=x.dtype, device=dev))
    return out


def random_crop(x, rng: np.random.Generator, *, padding: int = 4, padding_mode: str = "zeros"):
    """Random h×w crop of each image padded by ``padding`` (offsets uniform in [0, 2p]², drawn by
    ``rng.integers(0, 2p + 1, size=(2, n))``: row offsets then column offsets)."""
    _check_rng(rng)
    n = x.shape[0]
    oy, ox = rng.integers(0, 2 * padding + 1, size=(2, n))
    return crop(x, oy, ox, padding=padding, padding_mode=padding_mode)


def hflip(x, mask):
    """Flip left-right the images whose ``mask`` entry (host bool sequence of length n) is true."""
    xp = namespace_of(x)
    n = x.shape[0]
    m = np.asarray(mask, dtype=bool).reshape(-1)
    if m.shape != (n,):
        raise ValueError(f"mask must have {n} entries, got {m.shape}")
    m_dev = xp.reshape(xp.asarray(m, device=device_of(x)), (n, 1, 1, 1))
    return xp.where(m_dev, xp.flip(x, axis=3), x)


def random_hflip(x, rng: np.random.Generator, *, p: float = 0.5):
    """Flip each image left-right with probability ``p`` (``rng.random(n) < p``)."""
    _check_rng(rng)
    return hflip(x, rng.random(x.shape[0]) < p)


def augment(x, rng: np.random.Generator, *, padding: int = 4, flip: bool = True, padding_mode: str = "zeros"):
    """Random crop (padding ``padding``; 0 skips it) then random horizontal flip (when ``flip``)."""
    _check_rng(rng)
    if padding > 0:
        x = random_crop(x, rng, padding=padding, padding_mode=padding_mode)
    if flip:
        x = random_hflip(x, rng)
    return x


def normalize(x, mean: Sequence[float], std: Sequence[float]):
    """Per-channel (x − mean_c) / std_c for x (n, c, h, w); mean and std have c entries."""
    xp = namespace_of(x)
    c = x.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std need {c} entries, got {len(mean)} and {len(std)}")
    dev = device_of(x)
    m = xp.reshape(xp.asarray([float(v) for v in mean], dtype=x.dtype, device=dev), (1, c, 1, 1))
    s = xp.reshape(xp.asarray([float(v) for v in std], dtype=x.dtype, device=dev), (1, c, 1, 1))
    return (x - m) / s
