"""Integer shape arithmetic for convolution and pooling (Eqs. 2.2, 2.5 of SPEC.md).

Pure functions of integers: no arrays, no namespaces. ``conv_outsize`` and
``conv_insize_range`` are each other's inverse; ``pool_outsize`` is ``conv_outsize``
with no padding.
"""
from __future__ import annotations

__all__ = ["pair", "conv_outsize", "pool_outsize", "conv_insize_range", "check_nonneg", "check_pos"]


def pair(v, name: str) -> tuple[int, int]:
    """Normalise an int or a 2-sequence of ints to a pair, with an error naming ``name``."""
    if isinstance(v, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return (v, v)
    try:
        a, b = v
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if not (isinstance(a, int) and isinstance(b, int)) or isinstance(a, bool) or isinstance(b, bool):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return (int(a), int(b))


def check_pos(v: tuple[int, int], name: str) -> None:
    if v[0] < 1 or v[1] < 1:
        raise ValueError(f"{name} must be >= 1, got {v}")


def check_nonneg(v: tuple[int, int], name: str) -> None:
    if v[0] < 0 or v[1] < 0:
        raise ValueError(f"{name} must be >= 0, got {v}")


def conv_outsize(size: int, k: int, s: int, p: int) -> int:
    """Output length of a convolution, Eq. (2.2): ``h' = (h + 2p - k) // s + 1``.

    Raises ``ValueError`` when the kernel is larger than the padded input.
    """
    if size + 2 * p < k:
        raise ValueError(
            f"kernel size {k} is larger than the padded input {size} + 2*{p} = {size + 2 * p}"
        )
    return (size + 2 * p - k) // s + 1


def pool_outsize(size: int, k: int, s: int) -> int:
    """Output length of a pooling window sweep, Eq. (2.5): ``h' = (h - k) // s + 1``."""
    if size < k:
        raise ValueError(f"pooling kernel {k} is larger than the input size {size}")
    return (size - k) // s + 1


def conv_insize_range(out: int, k: int, s: int, p: int) -> range:
    """All input lengths ``h`` with ``conv_outsize(h, k, s, p) == out`` (the stride ambiguity)."""
    lo = (out - 1) * s + k - 2 * p
    return range(max(lo, 1), lo + s)
