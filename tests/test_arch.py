"""Unit tests: architecture spec strings and presets (SPEC.md §3.1), parameters and initialisation
(Eq. 3.10), and the error messages of the model's public functions."""
from __future__ import annotations

import math

import numpy as np
import pytest

import pyeqprop
from pyeqprop import backend
from pyeqprop.model import ArchError, parse_arch, preset_spec
from pyeqprop.model.arch import ConvLayer, FCLayer

F64 = np.float64

# VGG widths (Simonyan & Zisserman 2015), "M" = 2×2 max-pool after the conv before it
VGG_WIDTHS = {
    "vgg11": [64, 128, 256, 256, 512, 512, 512, 512],
    "vgg13": [64, 64, 128, 128, 256, 256, 512, 512, 512, 512],
    "vgg16": [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512],
}
VGG_POOLED = {  # index of each conv followed by an M
    "vgg11": [0, 1, 3, 5, 7],
    "vgg13": [1, 3, 5, 7, 9],
    "vgg16": [1, 3, 6, 9, 12],
}


def _convs(arch):
    return [ly for ly in arch.layers if isinstance(ly, ConvLayer)]


# --------------------------------------------------------------------------- grammar
def test_spec_tokens_resolve_to_layers():
    arch = parse_arch("c4m-c6k5p1a-C3-f7", (2, 12, 12), 3, "mse")
    c1, c2, c3, f1, out = arch.layers
    assert (c1.out_channels, c1.kernel, c1.padding, c1.pool, c1.conv_hw, c1.out_hw) == (
        4, 3, 1, "max", (12, 12), (6, 6))
    # k5 p1 on 6×6: 6 + 2 − 5 + 1 = 4, then 2×2 average → 2×2
    assert (c2.in_channels, c2.kernel, c2.padding, c2.pool, c2.conv_hw, c2.out_hw) == (4, 5, 1, "avg", (4, 4), (2, 2))
    assert (c3.token, c3.pool, c3.out_hw) == ("c3", "none", (2, 2))  # tokens are case-insensitive
    assert isinstance(f1, FCLayer) and (f1.in_features, f1.out_features) == (3 * 2 * 2, 7)
    assert (out.name, out.in_features, out.out_features) == ("fc2", 7, 3)
    assert arch.readout is None
    assert arch.state_shapes == [(4, 6, 6), (6, 2, 2), (3, 2, 2), (7,), (3,)]


def test_softmax_readout_is_not_a_neuron_layer():
    arch = parse_arch("c4m", (1, 4, 4), 5, "softmax")
    assert len(arch.layers) == 1
    assert (arch.readout.name, arch.readout.in_features, arch.readout.out_features) == ("fc1", 4 * 2 * 2, 5)


def test_pool_sizes_follow_the_input():
    # 32×32: c3 pad 1 keeps the extent, each m halves it
    a32 = parse_arch("c2m-c2m-c2m", (1, 32, 32), 2, "mse")
    assert [ly.out_hw for ly in _convs(a32)] == [(16, 16), (8, 8), (4, 4)]
    a8 = parse_arch("c2m-c2m-c2m", (1, 8, 8), 2, "mse")
    assert [ly.out_hw for ly in _convs(a8)] == [(4, 4), (2, 2), (1, 1)]
    non_square = parse_arch("c2m-c2a", (1, 8, 4), 2, "mse")
    assert [ly.out_hw for ly in _convs(non_square)] == [(4, 2), (2, 1)]


@pytest.mark.parametrize("spec, shape, token, words", [
    ("c4m-c4m", (1, 6, 6), "c4m", "3×3"),  # 6 → 3 after the first pool: the second pools an odd map
    ("c4m-c4m-c4m", (1, 4, 4), "c4m", "1×1"),  # 4 → 2 → 1: the third pools a 1×1 map
    ("c4-x5", (1, 8, 8), "x5", "unknown token"),
    ("x5", (1, 8, 8), "x5", "unknown architecture preset"),
    ("c0", (1, 8, 8), "c0", "channels must be > 0"),
    ("c4-f0", (1, 8, 8), "f0", "units must be > 0"),
    ("f8-c4", (1, 8, 8), "c4", "cannot follow a fully connected layer"),
    ("c2k5p0", (1, 3, 3), "c2k5p0", "kernel 5 is larger"),
    ("c2m", (1, 5, 6), "c2m", "5×6"),
])
def test_bad_specs_name_the_token(spec, shape, token, words):
    with pytest.raises(ArchError) as info:
        parse_arch(spec, shape, 10, "mse")
    msg = str(info.value)
    assert repr(token) in msg and words in msg


@pytest.mark.parametrize("kwargs, words", [
    (dict(input_shape=(8, 8)), "input_shape must be (c, h, w)"),
    (dict(input_shape=(1, 0, 8)), ">= 1"),
    (dict(num_classes=0), "num_classes must be >= 1"),
    (dict(readout="hinge"), "readout must be 'mse' or 'softmax'"),
])
def test_bad_arguments_of_parse_arch(kwargs, words):
    args = dict(arch="c4", input_shape=(1, 8, 8), num_classes=10, readout="mse") | kwargs
    with pytest.raises(ArchError, match=None) as info:
        parse_arch(**args)
    assert words in str(info.value)


@pytest.mark.parametrize("spec", ["", "-", "c4--c4", "c4-"])
def test_empty_tokens_are_rejected(spec):
    with pytest.raises(ArchError, match="empty token in architecture spec"):
        parse_arch(spec, (1, 4, 4), 2, "softmax")


# --------------------------------------------------------------------------- presets
def test_laborieux_preset_has_the_published_shape_and_size():
    """Laborieux et al. 2021: 3×32×32 → 128 → 256 → 512 → 512 (pad 0) → 10, about 3.84 M weights."""
    arch = parse_arch("laborieux", (3, 32, 32), 10, "softmax")
    convs = _convs(arch)
    assert [(c.in_channels, c.out_channels, c.kernel, c.padding) for c in convs] == [
        (3, 128, 3, 1), (128, 256, 3, 1), (256, 512, 3, 1), (512, 512, 3, 0)]
    assert [c.out_hw for c in convs] == [(16, 16), (8, 8), (4, 4), (1, 1)]
    assert convs[-1].conv_hw == (2, 2)  # 4×4 with a 3×3 kernel and no padding, then the pool
    # weights by hand: 128·3·9 + 256·128·9 + 512·256·9 + 512·512·9 + 10·512
    by_hand = 3_456 + 294_912 + 1_179_648 + 2_359_296 + 5_120
    assert by_hand == 3_842_432  # "about 3.84 M weights"
    net = pyeqprop.CRNN("laborieux", (3, 32, 32), num_classes=10, readout="softmax", dtype="float32", xp="numpy")
    weights = sum(int(np.prod(v.shape)) for k, v in net.params.items() if k.endswith(".weight"))
    biases = sum(int(np.prod(v.shape)) for k, v in net.params.items() if k.endswith(".bias"))
    assert weights == by_hand
    assert biases == 128 + 256 + 512 + 512 + 10
    mse = parse_arch("laborieux", (3, 32, 32), 10, "mse")
    assert mse.layers[-1].in_features == 512 and mse.layers[-1].out_features == 10


@pytest.mark.parametrize("name, n_conv", [("vgg11", 8), ("vgg13", 10), ("vgg16", 13)])
def test_vgg_presets_widths_and_pools(name, n_conv):
    a32 = parse_arch(name, (3, 32, 32), 10, "mse")
    convs = _convs(a32)
    assert len(convs) == n_conv
    assert [c.out_channels for c in convs] == VGG_WIDTHS[name]
    assert [i for i, c in enumerate(convs) if c.pool == "max"] == VGG_POOLED[name]  # 32 → 1 in five pools
    assert convs[-1].out_hw == (1, 1)
    # 8×8: a pool is kept while the map is even and ≥ 2, so only the first three remain
    a8 = parse_arch(name, (3, 8, 8), 10, "mse")
    pooled8 = [i for i, c in enumerate(_convs(a8)) if c.pool == "max"]
    assert pooled8 == VGG_POOLED[name][:3]
    assert _convs(a8)[-1].out_hw == (1, 1)
    assert [c.out_channels for c in _convs(a8)] == VGG_WIDTHS[name]


def test_vgg_width_divisor():
    arch = parse_arch("VGG11/8", (3, 32, 32), 10, "mse")
    assert [c.out_channels for c in _convs(arch)] == [w // 8 for w in VGG_WIDTHS["vgg11"]]
    assert preset_spec("vgg16/128", (3, 32, 32)).split("-")[0] == "c1"  # 64 // 128 = 0 → at least 1
    with pytest.raises(ArchError, match="width divisor"):
        preset_spec("vgg11/0", (3, 32, 32))


def test_small_presets():
    assert preset_spec("digits", (1, 8, 8)) == "c32m-c64m"
    assert [c.out_hw for c in _convs(parse_arch("mnist", (1, 28, 28), 10, "mse"))] == [(14, 14), (7, 7)]


# --------------------------------------------------------------------------- parameters and init
def _net(**kw):
    args = dict(num_classes=3, readout="mse", dtype="float64", xp="numpy", seed=0)
    args.update(kw)
    return pyeqprop.CRNN("c4m-c6a-f7", (2, 8, 8), **args)


def test_param_names_and_shapes_are_pytorch_style():
    expect = [("conv1.weight", (4, 2, 3, 3)), ("conv1.bias", (4,)), ("conv2.weight", (6, 4, 3, 3)),
              ("conv2.bias", (6,)), ("fc1.weight", (7, 6 * 2 * 2)), ("fc1.bias", (7,)),
              ("fc2.weight", (3, 7)), ("fc2.bias", (3,))]
    for readout in ("mse", "softmax"):
        net = _net(readout=readout)
        assert [(k, tuple(v.shape)) for k, v in net.params.items()] == expect
        assert all(v.dtype == np.float64 for v in net.params.values())
    assert _net(readout="mse").network_param_names() == [k for k, _ in expect]
    assert _net(readout="softmax").network_param_names() == [k for k, _ in expect[:6]]
    assert [tuple(s.shape) for s in _net().init_state(5)] == [(5, 4, 4, 4), (5, 6, 2, 2), (5, 7), (5, 3)]


def test_init_is_deterministic_and_uniform_in_the_pytorch_range():
    a, b, c = _net(seed=3), _net(seed=3), _net(seed=4)
    fan_in = {"conv1": 2 * 9, "conv2": 4 * 9, "fc1": 24, "fc2": 7}
    for k, v in a.params.items():
        assert np.array_equal(v, b.params[k])
        assert not np.array_equal(v, c.params[k])
        bound = 1.0 / math.sqrt(fan_in[k.split(".")[0]])
        assert np.all(np.abs(v) <= bound)
        if v.size >= 24:  # all of ≥ 24 uniform draws inside half the range: probability 2^-24
            assert np.max(np.abs(v)) > 0.5 * bound


def test_weight_scale_multiplies_weights_only():
    one, half = _net(seed=1), _net(seed=1, weight_scale=0.5)
    for k, v in one.params.items():
        expect = 0.5 * v if k.endswith(".weight") else v  # exact: scaling by a power of two
        assert np.array_equal(half.params[k], expect), k


@pytest.mark.parametrize("kw, exc, words", [
    (dict(activation="relu"), ValueError, "unknown activation 'relu'"),
    (dict(dtype="float16"), ValueError, "dtype must be 'float32' or 'float64'"),
    (dict(readout="hinge"), ArchError, "readout must be"),
])
def test_bad_constructor_arguments(kw, exc, words):
    with pytest.raises(exc) as info:
        _net(**kw)
    assert words in str(info.value)


# --------------------------------------------------------------------------- error messages
@pytest.fixture
def small():
    net = _net()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 8, 8))
    return net, x, np.array([0, 2])


def test_bad_x_is_named(small):
    net, x, y = small
    with pytest.raises(ValueError, match=r"x must have shape \(n, 2, 8, 8\), got \(2, 8, 8\)"):
        net.phi(x[0], net.init_state(2))
    with pytest.raises(ValueError, match=r"x must have shape \(n, 2, 8, 8\), got \(2, 2, 8, 6\)"):
        pyeqprop.settle(net, x[..., :6], 3)
    with pytest.raises(ValueError, match="x has dtype float32 but the network uses float64"):
        pyeqprop.settle(net, x.astype(np.float32), 3)
    strict = backend.asarray(x, xp="array_api_strict", dtype="float64")
    with pytest.raises(TypeError, match="array_api_strict"):
        pyeqprop.learning.predict(net, strict, 3)


def test_bad_state_is_named(small):
    net, x, y = small
    with pytest.raises(ValueError, match="state must have 4 layers, got 3"):
        net.step(x, net.init_state(2)[:3])
    with pytest.raises(ValueError, match=r"state layer 1 must have shape \(2, 4, 4, 4\)"):
        net.dphi_ds(x, net.init_state(3)[:1] + net.init_state(2)[1:])


def test_bad_y_is_named(small):
    net, x, y = small
    with pytest.raises(ValueError, match=r"y must have shape \(2,\), got \(3,\)"):
        pyeqprop.ep_gradients(net, x, np.array([0, 1, 2]), beta=0.1, T1=2, T2=2)
    with pytest.raises(ValueError, match="integer class labels"):
        pyeqprop.bptt_gradients(net, x, np.array([0.0, 1.0]), T=2)
    with pytest.raises(ValueError, match="needs targets"):
        pyeqprop.ep_gradients(net, x, None, beta=0.1, T1=2, T2=2)
    with pytest.raises(ValueError, match="needs targets y"):
        net.nudge(x, None, 0.1)
    with pytest.raises(ValueError, match=r"nudged evaluation \(beta=0.1\) needs targets y"):
        net.nudge(x).at(0.1)
    with pytest.raises(ValueError, match="the cost needs targets y"):
        net.cost(x, net.init_state(2), None)


@pytest.mark.parametrize("kw, words", [
    (dict(estimator="two-sided"), "estimator must be one of"),
    (dict(beta=0.0), "beta must be a positive finite number"),
    (dict(beta=-0.1), "beta must be a positive finite number"),
    (dict(beta=float("nan")), "beta must be a positive finite number"),
    (dict(beta=float("inf")), "beta must be a positive finite number"),
    (dict(T1=0), "T1 must be a positive integer"),
    (dict(T2=1.5), "T2 must be a positive integer"),
])
def test_bad_ep_arguments(small, kw, words):
    net, x, y = small
    args = dict(beta=0.1, T1=2, T2=2, estimator="symmetric") | kw
    with pytest.raises(ValueError) as info:
        pyeqprop.ep_gradients(net, x, y, **args)
    assert words in str(info.value)


def test_bad_T_is_named(small):
    net, x, y = small
    with pytest.raises(ValueError, match="T must be a non-negative integer, got -1"):
        pyeqprop.settle(net, x, -1)
    with pytest.raises(ValueError, match="T must be a non-negative integer, got 2.5"):
        pyeqprop.settle(net, x, 2.5)
    with pytest.raises(ValueError, match="T must be a positive integer, got 0"):
        pyeqprop.bptt_gradients(net, x, y, T=0)
