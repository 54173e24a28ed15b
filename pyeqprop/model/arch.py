"""Architecture descriptions: the spec string, presets, and the resolved layer list (SPEC.md §3.1).

Spec string grammar (tokens joined by ``-``, case-insensitive)::

    conv token   c<channels>[k<kernel>][p<padding>][m|a]
                 kernel defaults to 3, padding to (kernel − 1)//2 ("same");
                 a trailing ``m`` is a 2×2 max-pool with stride 2 after the conv,
                 ``a`` a 2×2 average pool, nothing the identity.
    fc token     f<units>        a fully connected neuron layer.

The output layer of ``num_classes`` units is appended by :class:`~pyeqprop.CRNN`; it is a
dynamical layer for the ``mse`` readout and a non-dynamical softmax readout otherwise.

Examples: ``c32m-c64m`` (the digits preset), ``c128m-c256m-c512m-c512p0m`` (``laborieux``).

Presets: ``laborieux``, ``vgg11``, ``vgg13``, ``vgg16``, ``digits`` (8×8 inputs), ``mnist``
(28×28 inputs). A VGG preset may carry a width divisor, ``vgg11/8`` (every width divided by
8, at least 1), and its pools are adapted to the input size: a pool is kept only while the
map it pools is even and at least 2; later pools are dropped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from .._shapes import conv_outsize

__all__ = ["ConvLayer", "FCLayer", "Architecture", "parse_arch", "PRESETS", "preset_spec", "ArchError"]


class ArchError(ValueError):
    """An invalid architecture spec; the message names the offending token."""


@dataclass(frozen=True)
class ConvLayer:
    """Neuron layer s_l = P_l(conv(s_{l−1}; W_l) + b_l) of shape (c_out, h_out, w_out)."""

    kind: ClassVar[str] = "conv"
    name: str  # parameter prefix, e.g. "conv1"
    token: str
    in_channels: int
    out_channels: int
    kernel: int
    padding: int
    pool: str  # "max", "avg" or "none"
    in_hw: tuple[int, int]
    conv_hw: tuple[int, int]  # after the convolution, before pooling
    out_hw: tuple[int, int]  # after pooling: the state's spatial size

    @property
    def state_shape(self) -> tuple[int, int, int]:
        return (self.out_channels, *self.out_hw)


@dataclass(frozen=True)
class FCLayer:
    """Fully connected layer: a neuron layer s_l = W_l vec(s_{l−1}) + b_l, or the softmax readout."""

    kind: ClassVar[str] = "fc"
    name: str  # e.g. "fc1"
    token: str
    in_features: int
    out_features: int

    @property
    def state_shape(self) -> tuple[int]:
        return (self.out_features,)


@dataclass(frozen=True)
class Architecture:
    """A resolved architecture: the neuron layers in order and, for softmax, the readout layer."""

    spec: str
    input_shape: tuple[int, int, int]
    layers: tuple  # neuron layers s_1 … s_L (ConvLayer / FCLayer)
    readout: FCLayer | None  # the non-dynamical softmax readout, or None for mse

    @property
    def state_shapes(self) -> list[tuple[int, ...]]:
        return [layer.state_shape for layer in self.layers]


_CONV = re.compile(r"^c(\d+)(?:k(\d+))?(?:p(\d+))?([ma]?)$")
_FC = re.compile(r"^f(\d+)$")

_VGG = {
    "vgg11": "64 M 128 M 256 256 M 512 512 M 512 512 M",
    "vgg13": "64 64 M 128 128 M 256 256 M 512 512 M 512 512 M",
    "vgg16": "64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M",
}

PRESETS = {
    "laborieux": "c128m-c256m-c512m-c512p0m",
    "digits": "c32m-c64m",
    "mnist": "c32m-c64m",
    "vgg11": "(VGG-11 widths, pools adapted to the input)",
    "vgg13": "(VGG-13 widths, pools adapted to the input)",
    "vgg16": "(VGG-16 widths, pools adapted to the input)",
}


def _vgg_spec(name: str, divisor: int, hw: tuple[int, int]) -> str:
    tokens = _VGG[name].split()
    h, w = hw
    out = []
    for t in tokens:
        if t == "M":
            if h >= 2 and w >= 2 and h % 2 == 0 and w % 2 == 0:
                out[-1] += "m"
                h, w = h // 2, w // 2
            continue
        out.append(f"c{max(1, int(t) // divisor)}")
    return "-".join(out)


def preset_spec(name: str, input_shape) -> str:
    """The spec string of a preset for ``input_shape`` (c, h, w); unknown names raise ArchError."""
    key = name.strip().lower()
    m = re.fullmatch(r"(vgg1[136])(?:/(\d+))?", key)
    if m:
        div = int(m.group(2) or 1)
        if div < 1:
            raise ArchError(f"width divisor in {name!r} must be >= 1")
        return _vgg_spec(m.group(1), div, (int(input_shape[1]), int(input_shape[2])))
    if key in PRESETS:
        return PRESETS[key]
    raise ArchError(f"unknown architecture preset {name!r}; presets are {sorted(PRESETS)} "
                    "(vgg presets accept a width divisor, e.g. 'vgg11/8'), or give a spec string like 'c32m-c64m'")


def _is_spec(text: str) -> bool:
    return all(_CONV.match(t) or _FC.match(t) for t in text.lower().split("-") if t)


def parse_arch(arch: str, input_shape, num_classes: int, readout: str) -> Architecture:
    """Resolve a preset name or spec string into an :class:`Architecture`.

    Raises :class:`ArchError` naming the token for unknown tokens, channels ≤ 0, a kernel
    larger than its padded input, or a pool over an odd or 1-wide map.
    """
    if len(tuple(input_shape)) != 3:
        raise ArchError(f"input_shape must be (c, h, w), got {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    if min(c, h, w) < 1:
        raise ArchError(f"input_shape entries must be >= 1, got {(c, h, w)}")
    if int(num_classes) < 1:
        raise ArchError(f"num_classes must be >= 1, got {num_classes}")
    if readout not in ("mse", "softmax"):
        raise ArchError(f"readout must be 'mse' or 'softmax', got {readout!r}")
    text = arch.strip()
    # a string with '-' is a spec (no preset name has one): the token loop then names a bad token
    is_spec = (_is_spec(text) or "-" in text) and not text.lower().startswith("vgg")
    spec = text if is_spec else preset_spec(text, (c, h, w))
    tokens = [t for t in spec.lower().split("-")]
    if not tokens or any(t == "" for t in tokens):
        raise ArchError(f"empty token in architecture spec {spec!r}")
    layers = []
    shape: tuple = (c, h, w)
    n_conv = n_fc = 0
    for tok in tokens:
        m = _CONV.match(tok)
        if m:
            if len(shape) != 3:
                raise ArchError(f"token {tok!r}: a conv layer cannot follow a fully connected layer")
            ch = int(m.group(1))
            k = int(m.group(2)) if m.group(2) else 3
            p = int(m.group(3)) if m.group(3) is not None else (k - 1) // 2
            if ch <= 0:
                raise ArchError(f"token {tok!r}: channels must be > 0")
            if k <= 0:
                raise ArchError(f"token {tok!r}: kernel must be > 0")
            ci, hi, wi = shape
            if hi + 2 * p < k or wi + 2 * p < k:
                raise ArchError(f"token {tok!r}: kernel {k} is larger than the padded input {hi + 2 * p}×{wi + 2 * p}")
            hc, wc = conv_outsize(hi, k, 1, p), conv_outsize(wi, k, 1, p)
            pool = {"m": "max", "a": "avg", "": "none"}[m.group(4)]
            if pool != "none":
                if hc < 2 or wc < 2 or hc % 2 or wc % 2:
                    raise ArchError(f"token {tok!r}: cannot 2×2-pool a {hc}×{wc} map (it must be even and at least 2)")
                ho, wo = hc // 2, wc // 2
            else:
                ho, wo = hc, wc
            n_conv += 1
            layers.append(ConvLayer(f"conv{n_conv}", tok, ci, ch, k, p, pool, (hi, wi), (hc, wc), (ho, wo)))
            shape = (ch, ho, wo)
            continue
        m = _FC.match(tok)
        if m:
            units = int(m.group(1))
            if units <= 0:
                raise ArchError(f"token {tok!r}: units must be > 0")
            n_fc += 1
            fan_in = 1
            for v in shape:
                fan_in *= v
            layers.append(FCLayer(f"fc{n_fc}", tok, fan_in, units))
            shape = (units,)
            continue
        raise ArchError(f"unknown token {tok!r} in architecture spec {spec!r}; expected c<channels>[k<k>][p<p>][m|a] or f<units>")
    fan_in = 1
    for v in shape:
        fan_in *= v
    out = FCLayer(f"fc{n_fc + 1}", "out", fan_in, int(num_classes))
    if readout == "mse":
        return Architecture(spec, (c, h, w), tuple(layers) + (out,), None)
    if not layers:
        raise ArchError("the softmax readout needs at least one neuron layer in the spec")
    return Architecture(spec, (c, h, w), tuple(layers), out)
