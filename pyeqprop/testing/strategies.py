"""Hypothesis strategies for the primitives, valid by construction, and the test profiles.

Every strategy draws the free parameters first and then *derives* the sizes that make the
configuration valid (for a convolution: padded input ≥ kernel), so no example is thrown
away with ``assume``. Array contents are not drawn by hypothesis: a configuration carries
a ``seed`` and the test draws its arrays from ``numpy.random.default_rng(seed)`` on the
host (then moves them to the backend under test), as in ``cupy.testing``. A failure
prints the configuration, which with the seed is a complete reproduction note.

Profiles (select with ``HYPOTHESIS_PROFILE``; default ``ci``):
``dev`` 10 examples, ``ci`` 40 examples, ``thorough`` 500 examples; no deadline
(timings of NumPy code on shared CI machines are not a property of the code). ``dev`` and
``ci`` are derandomised and keep no example database, so a run is reproducible and a failure
is the code's, not the draw's; ``thorough`` explores (random draws, the local database).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

__all__ = [
    "ConvConfig", "PoolConfig", "LinearConfig", "conv_configs", "pool_configs", "linear_configs",
    "random_array",
    "register_profiles", "load_profile", "PROFILE_ENV",
]

PROFILE_ENV = "HYPOTHESIS_PROFILE"


def register_profiles() -> None:
    """Register the ``dev``, ``ci`` and ``thorough`` profiles (idempotent)."""
    common = dict(deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    fixed = dict(derandomize=True, database=None)
    settings.register_profile("dev", max_examples=10, **fixed, **common)
    settings.register_profile("ci", max_examples=40, **fixed, **common)
    settings.register_profile("thorough", max_examples=500, **common)


def load_profile() -> str:
    """Register the profiles and load the one named by ``$HYPOTHESIS_PROFILE`` (default ``ci``)."""
    register_profiles()
    name = os.environ.get(PROFILE_ENV, "ci") or "ci"
    settings.load_profile(name)
    return name


def random_array(rng: np.random.Generator, shape, dtype=np.float64, *, integer: bool = False) -> np.ndarray:
    """Host array of ``shape``: standard normal, or integers in [−2, 2] (exact in any float
    dtype, and with only five values, ties inside pooling windows are frequent)."""
    if integer:
        a = rng.integers(-2, 3, size=shape).astype(np.float64)
    else:
        a = rng.standard_normal(shape)
    return a.astype(dtype)


@dataclass(frozen=True)
class ConvConfig:
    """A valid conv2d configuration. Shapes: x (n, c, h, w), w (o, c, k_h, k_w), y (n, o, h', w')."""

    n: int
    c: int
    o: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    seed: int

    @property
    def out_hw(self) -> tuple[int, int]:
        """(h', w') by Eq. (2.2), written out here so the strategy does not trust the library."""
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        return ((self.h + 2 * ph - kh) // sh + 1, (self.w + 2 * pw - kw) // sw + 1)

    @property
    def x_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def w_shape(self):
        return (self.o, self.c) + self.kernel

    @property
    def y_shape(self):
        return (self.n, self.o) + self.out_hw

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


@dataclass(frozen=True)
class PoolConfig:
    """A valid pooling configuration. Shapes: x (n, c, h, w), y and indices (n, c, h', w').

    ``ties``: draw integer-valued inputs so that windows often hold several maxima.
    """

    n: int
    c: int
    h: int
    w: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    ties: bool
    seed: int

    @property
    def out_hw(self) -> tuple[int, int]:
        """(h', w') by Eq. (2.5)."""
        (kh, kw), (sh, sw) = self.kernel, self.stride
        return ((self.h - kh) // sh + 1, (self.w - kw) // sw + 1)

    @property
    def overlapping(self) -> bool:
        return self.stride[0] < self.kernel[0] or self.stride[1] < self.kernel[1]

    @property
    def x_shape(self):
        return (self.n, self.c, self.h, self.w)

    @property
    def y_shape(self):
        return (self.n, self.c) + self.out_hw

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


_seeds = st.integers(0, 2**32 - 1)


@st.composite
def conv_configs(draw, *, max_extent: int = 7, stride=(1, 3), padding=(0, 2)) -> ConvConfig:
    """Convolutions with n 1..3, c and o 1..4, independent (often non-square) kernels 1..4,
    strides in ``stride``, paddings in ``padding``, and an input extent chosen as
    max(1, k − 2p) + extra with extra in 0..``max_extent`` per axis, so that the padded input
    is at least the kernel (Eq. 2.2 needs h + 2p ≥ k) and images are usually non-square."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(*stride)), draw(st.integers(*stride))
    ph, pw = draw(st.integers(*padding)), draw(st.integers(*padding))
    h = max(1, kh - 2 * ph) + draw(st.integers(0, max_extent))
    w = max(1, kw - 2 * pw) + draw(st.integers(0, max_extent))
    return ConvConfig(
        n=draw(st.integers(1, 3)), c=draw(st.integers(1, 4)), o=draw(st.integers(1, 4)),
        h=h, w=w, kernel=(kh, kw), stride=(sh, sw), padding=(ph, pw), seed=draw(_seeds),
    )


@st.composite
def pool_configs(draw, *, max_extent: int = 7, overlapping: bool | None = None, ties: bool | None = None) -> PoolConfig:
    """Poolings with kernels 1..3 and strides 1..3 per axis (s < k gives overlapping windows),
    input extent k + extra with extra in 0..``max_extent``.

    overlapping: None for any stride; False forces s ≥ k on both axes (disjoint windows);
    True forces s < k on at least the first axis with k ≥ 2 there.
    ties: None to draw it; True/False to fix it.
    """
    if overlapping is True:
        kh = draw(st.integers(2, 3))
        sh = draw(st.integers(1, kh - 1))
        kw = draw(st.integers(1, 3))
        sw = draw(st.integers(1, 3))
    elif overlapping is False:
        kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        sh, sw = draw(st.integers(kh, 3)), draw(st.integers(kw, 3))
    else:
        kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
        sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    return PoolConfig(
        n=draw(st.integers(1, 3)), c=draw(st.integers(1, 4)),
        h=kh + draw(st.integers(0, max_extent)), w=kw + draw(st.integers(0, max_extent)),
        kernel=(kh, kw), stride=(sh, sw),
        ties=draw(st.booleans()) if ties is None else ties, seed=draw(_seeds),
    )


@dataclass(frozen=True)
class LinearConfig:
    """A fully connected layer: x (n, i), w (o, i), y (n, o)."""

    n: int
    i: int
    o: int
    seed: int

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


@st.composite
def linear_configs(draw) -> LinearConfig:
    """Linear layers with n 1..4, i 1..8, o 1..6 (every shape is valid)."""
    return LinearConfig(n=draw(st.integers(1, 4)), i=draw(st.integers(1, 8)), o=draw(st.integers(1, 6)),
                        seed=draw(_seeds))
