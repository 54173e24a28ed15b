"""Hypothesis strategies for small CRNNs (SPEC.md §3), valid by construction.

A :class:`CRNNConfig` is a complete description of one test network and its data: the
layer tokens, the input size, the readout, the activation, the batch size and a seed.
The strategy draws the layers first and then *derives* an input size that every layer
accepts, working backwards from the last layer's output extent, so no example is thrown
away with ``assume``:

* a 2×2 pool (``m`` max, ``a`` average) needs an even conv output of at least 2: going
  backwards, the extent is doubled;
* a conv with kernel k and padding p ≤ (k − 1)//2 maps an extent h to h + 2p − k + 1 ≤ h:
  going backwards, h_in = h_out + k − 1 − 2p ≥ h_out ≥ 1, and the padded input
  h_in + 2p = h_out + k − 1 ≥ k is always large enough (Eq. 2.2).

Array contents are not drawn by hypothesis: the config carries a ``seed`` and the test
draws x, y and any states from ``numpy.random.default_rng(seed)`` on the host. A failing
example prints the config, which with the seed is a complete reproduction note.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

__all__ = ["ConvSpec", "CRNNConfig", "crnn_configs"]

_POOL_SUFFIX = {"max": "m", "avg": "a", "none": ""}


@dataclass(frozen=True)
class ConvSpec:
    """One conv neuron layer: ``c<channels>[k<kernel>][p<padding>][m|a]``."""

    channels: int
    kernel: int
    padding: int
    pool: str  # "max", "avg" or "none"

    @property
    def token(self) -> str:
        tok = f"c{self.channels}"
        if self.kernel != 3:
            tok += f"k{self.kernel}"
        if self.padding != (self.kernel - 1) // 2:
            tok += f"p{self.padding}"
        return tok + _POOL_SUFFIX[self.pool]


@dataclass(frozen=True)
class CRNNConfig:
    """A small valid CRNN with its data. Shapes: x (n, c, h, w), y (n,) in 0 … num_classes − 1."""

    convs: tuple[ConvSpec, ...]
    fc: int | None  # units of an optional fc neuron layer after the convs
    in_channels: int
    h: int
    w: int
    num_classes: int
    readout: str  # "mse" or "softmax"
    activation: str  # "hard_sigmoid" or "half_hard_sigmoid"
    n: int
    seed: int

    @property
    def arch(self) -> str:
        tokens = [c.token for c in self.convs] + ([f"f{self.fc}"] if self.fc else [])
        return "-".join(tokens)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.h, self.w)

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)

    def net(self, *, xp="numpy", dtype="float64", weight_scale=1.0, seed=None, feedback=1.0):
        """The CRNN of this config (initialisation seed = ``seed`` or the config's seed; feedback gain ω of
        Eq. 3.18)."""
        from ..model import CRNN

        return CRNN(self.arch, self.input_shape, num_classes=self.num_classes, readout=self.readout,
                    activation=self.activation, dtype=dtype, xp=xp,
                    seed=self.seed if seed is None else seed, weight_scale=weight_scale, feedback=feedback)

    def data(self, rng: np.random.Generator | None = None):
        """Host arrays x (n, c, h, w) standard normal float64 and y (n,) int64 labels."""
        rng = self.rng() if rng is None else rng
        x = rng.standard_normal((self.n, *self.input_shape))
        y = rng.integers(0, self.num_classes, size=self.n).astype(np.int64)
        return x, y


_seeds = st.integers(0, 2**32 - 1)


@st.composite
def conv_specs(draw, *, max_channels: int = 3) -> ConvSpec:
    """Kernel 1..3, padding 0..(k − 1)//2 (so the extent never grows), any pooling."""
    k = draw(st.integers(1, 3))
    return ConvSpec(channels=draw(st.integers(1, max_channels)), kernel=k,
                    padding=draw(st.integers(0, (k - 1) // 2)),
                    pool=draw(st.sampled_from(("max", "avg", "none"))))


def _input_extent(convs, out_extent: int) -> int:
    """The input extent that gives ``out_extent`` after all ``convs`` (see module docstring)."""
    e = out_extent
    for c in reversed(convs):
        if c.pool != "none":
            e *= 2  # the conv output must be even and >= 2
        e = e + c.kernel - 1 - 2 * c.padding  # conv_outsize(e_in, k, 1, p) = e
    return e


@st.composite
def crnn_configs(draw, *, max_convs: int = 3, max_channels: int = 3, readouts=("mse", "softmax"),
                 activations=("hard_sigmoid", "half_hard_sigmoid"), max_batch: int = 3) -> CRNNConfig:
    """CRNNs with 1..``max_convs`` conv layers (max/avg/no pooling, kernels 1..3), an optional fc
    layer of 1..4 units, 1..2 input channels, 2..4 classes, batch 1..``max_batch``, and an input
    size derived so that every pool is valid: the last conv's output extent is drawn in 1..2 per
    axis (often non-square) and the input extent follows backwards."""
    convs = tuple(draw(st.lists(conv_specs(max_channels=max_channels), min_size=1, max_size=max_convs)))
    fc = draw(st.one_of(st.none(), st.integers(1, 4)))
    h = _input_extent(convs, draw(st.integers(1, 2)))
    w = _input_extent(convs, draw(st.integers(1, 2)))
    return CRNNConfig(
        convs=convs, fc=fc, in_channels=draw(st.integers(1, 2)), h=h, w=w,
        num_classes=draw(st.integers(2, 4)), readout=draw(st.sampled_from(tuple(readouts))),
        activation=draw(st.sampled_from(tuple(activations))), n=draw(st.integers(1, max_batch)),
        seed=draw(_seeds),
    )
