"""Unit tests of the intermediate-signal options (SPEC.md §6.1): layer lists, weights, errors."""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest

from pyeqprop.diagnostics.signals import SETTINGS, ablation_settings
from pyeqprop.model import CRNN
from pyeqprop.learning.signals import (DistillationMap, LocalErrorHead, OutputDistillation, SignalConfig,
                                    TeacherFeatures, attach_signals, kd_schedule_factor, parse_layers,
                                    set_kd_weights, standardise_targets)
from pyeqprop.model.teacher import Teacher

ARCH, SHAPE = "c2m-c3-c2m-f4", (1, 8, 8)  # three conv layers, then an fc layer


def _net(readout="softmax"):
    return CRNN(ARCH, SHAPE, num_classes=3, readout=readout, dtype="float64", xp="numpy", seed=0)


def _teacher():
    return Teacher(ARCH, SHAPE, num_classes=3, dtype="float64", xp="numpy", seed=1)


# ---------------------------------------------------------------------- parse_layers
@pytest.mark.parametrize("spec, expected", [
    ("all", [0, 1, 2]), ("ALL", [0, 1, 2]), (" all ", [0, 1, 2]),
    ("none", []), ("None", []), ("", []), (None, []),
    ("1,3", [0, 2]), ("3, 1", [0, 2]), ("2,2", [1]), ("1,", [0]),
    ([3, 1], [0, 2]), ((2,), [1]), ([], []), ("lower", [0, 1]), (" Lower ", [0, 1]),
])
def test_parse_layers_valid(spec, expected):
    assert parse_layers(spec, 3, "local-error") == expected


@pytest.mark.parametrize("spec, bad", [("1,4", 4), ("0", 0), ([5], 5), ("-1", -1)])
def test_parse_layers_out_of_range_names_the_layer(spec, bad):
    with pytest.raises(ValueError, match=rf"distillation layer {bad} is out of range.*1\.\.3"):
        parse_layers(spec, 3, "distillation")


@pytest.mark.parametrize("spec", ["abc", "1;2", "1 2", "first", "1.5", "all,1"])
def test_parse_layers_rejects_garbage(spec):
    with pytest.raises(ValueError, match=r"local-error layers must be 'all', 'lower', 'none' or a comma list"):
        parse_layers(spec, 3, "local-error")


@pytest.mark.parametrize("n, expected", [(1, [0]), (2, [0]), (7, [0, 1, 2, 3]), (8, [0, 1, 2, 3])])
def test_parse_layers_lower_is_the_first_half_rounded_up(n, expected):
    assert parse_layers("lower", n, "distillation") == expected  # Eq. 6.1's "lower": ⌈n/2⌉ layers


# ---------------------------------------------------------------------- weights
def test_weight_per_layer_and_broadcast():
    net = _net()
    terms = attach_signals(net, SignalConfig(local_layers="1,3", local_weight=[0.25, 0.75]))
    assert [(w, t.layer) for w, t in net.cost_terms[1:]] == [(0.25, 0), (0.75, 2)]
    assert [t.name for t in terms] == ["head1", "head3"]
    net = _net()
    attach_signals(net, SignalConfig(local_layers="all", local_weight=0.5))
    assert [w for w, _ in net.cost_terms[1:]] == [0.5, 0.5, 0.5]
    net = _net()
    attach_signals(net, SignalConfig(local_layers="all", local_weight=[0.5]))  # one value: every layer
    assert [w for w, _ in net.cost_terms[1:]] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("weights", [[0.5, 0.5], [0.1, 0.2, 0.3, 0.4]])
def test_weights_length_mismatch(weights):
    with pytest.raises(ValueError, match=rf"local-error weights: expected 1 or 3 values.*got {len(weights)}"):
        attach_signals(_net(), SignalConfig(local_layers="all", local_weight=weights))
    with pytest.raises(ValueError, match=rf"distillation weights: expected 1 or 3 values.*got {len(weights)}"):
        attach_signals(_net(), SignalConfig(kd_layers="all", kd_weight=weights), _teacher())


# ---------------------------------------------------------------------- teacher
@pytest.mark.parametrize("config", [SignalConfig(kd_layers="all"), SignalConfig(kd_layers="2"),
                                    SignalConfig(output_kd_weight=0.5)])
def test_distillation_without_teacher_raises(config):
    net = _net()
    with pytest.raises(ValueError, match="no teacher"):
        attach_signals(net, config)
    assert len(net.cost_terms) == 1


def test_local_errors_need_no_teacher():
    net = _net()
    attach_signals(net, SignalConfig(local_layers="all"))
    assert [t.kind for _, t in net.cost_terms] == ["softmax", "local", "local", "local"]


@pytest.mark.parametrize("config, needs", [
    (SignalConfig(), False),
    (SignalConfig(local_layers="all"), False),
    (SignalConfig(kd_layers="all"), True),
    (SignalConfig(kd_layers="1"), True),
    (SignalConfig(kd_layers=[2]), True),
    (SignalConfig(kd_layers="none"), False),
    (SignalConfig(kd_layers="NONE"), False),
    (SignalConfig(kd_layers=" none "), False),
    (SignalConfig(kd_layers=""), False),
    (SignalConfig(kd_layers=[]), False),
    (SignalConfig(kd_layers=None), False),
    (SignalConfig(output_kd_weight=0.3), True),
    (SignalConfig(kd_layers="none", output_kd_weight=0.0), False),
])
def test_needs_teacher(config, needs):
    assert config.needs_teacher() is needs
    net = _net()
    if needs:
        with pytest.raises(ValueError, match="no teacher"):
            attach_signals(net, config)
    else:
        attach_signals(net, config)  # no teacher needed, none given


def test_attach_with_teacher_builds_maps_and_output_distillation():
    net = _net("mse")
    terms = attach_signals(net, SignalConfig(local_layers="2", kd_layers="1,3", output_kd_weight=0.5,
                                             temperature=2.0), _teacher())
    assert [(t.kind, t.layer) for t in terms] == [("local", 1), ("kd", 0), ("kd", 2), ("kd_out", 4)]
    assert terms[-1].tau == 2.0 and net.cost_terms[-1][0] == 0.5
    assert net.params["kd1.weight"].shape == (2, 2, 1, 1) and net.params["kd3.bias"].shape == (2,)


# ---------------------------------------------------------------------- ablations
def test_ablations_are_one_flag_apart():
    """EP / EP+local / EP+KD / EP+local+KD differ only in local_layers and kd_layers; each step
    switches one of them, and the networks get exactly the terms the name says."""
    s = ablation_settings()
    assert tuple(s) == SETTINGS
    changed = {}
    for a, b in [("EP", "EP+local"), ("EP", "EP+KD"), ("EP+local", "EP+local+KD"), ("EP+KD", "EP+local+KD")]:
        changed[(a, b)] = {f.name for f in fields(SignalConfig) if getattr(s[a], f.name) != getattr(s[b], f.name)}
    assert changed == {("EP", "EP+local"): {"local_layers"}, ("EP", "EP+KD"): {"kd_layers"},
                       ("EP+local", "EP+local+KD"): {"kd_layers"}, ("EP+KD", "EP+local+KD"): {"local_layers"}}
    kinds = {}
    for name, cfg in s.items():
        net = _net()
        attach_signals(net, cfg, _teacher() if cfg.needs_teacher() else None)
        kinds[name] = sorted(t.kind for _, t in net.cost_terms[1:])
    assert kinds == {"EP": [], "EP+local": ["local"] * 3, "EP+KD": ["kd"] * 3,
                     "EP+local+KD": ["kd"] * 3 + ["local"] * 3}
    assert [s[n].needs_teacher() for n in SETTINGS] == [False, False, True, True]


def test_ablations_from_a_custom_base_and_errors():
    base = SignalConfig(local_layers="1,2", local_weight=0.3, local_loss="mse", kd_layers="3", kd_weight=2.0)
    s = ablation_settings(base, ("EP", "EP+local+KD"))
    assert list(s) == ["EP", "EP+local+KD"] and s["EP+local+KD"] == base
    assert s["EP"].local_weight == 0.3 and s["EP"].local_layers == "none" and s["EP"].kd_layers == "none"
    with pytest.raises(ValueError, match="unknown setting"):
        ablation_settings(base, ("EP", "EP+distillation"))
    with pytest.raises(ValueError, match="output_kd_weight = 0"):
        ablation_settings(SignalConfig(local_layers="all", kd_layers="all", output_kd_weight=0.5))
    with pytest.raises(ValueError, match="must select kd_layers"):
        ablation_settings(SignalConfig(local_layers="all"))


# ---------------------------------------------------------------------- term options
def test_term_option_errors():
    prov = TeacherFeatures(_teacher())
    with pytest.raises(ValueError, match="local error loss must be 'ce' or 'mse'"):
        LocalErrorHead(0, (2, 4, 4), 3, loss="nll")
    with pytest.raises(ValueError, match="grid must be >= 1"):
        LocalErrorHead(0, (2, 4, 4), 3, grid=0)
    with pytest.raises(ValueError, match="normalisation must be 'mean' or 'sum'"):
        DistillationMap(0, (2, 4, 4), (2, 4, 4), prov, normalisation="max")
    with pytest.raises(ValueError, match="cannot be average-pooled"):
        DistillationMap(0, (2, 3, 3), (2, 4, 4), prov)
    with pytest.raises(ValueError, match="cannot distil"):
        DistillationMap(0, (2, 4, 4), (8,), prov)
    with pytest.raises(ValueError, match="signal init must be 'zeros' or 'uniform', got 'normal'"):
        LocalErrorHead(0, (2, 4, 4), 3, init="normal")
    with pytest.raises(ValueError, match="signal init must be 'zeros' or 'uniform', got 'ones'"):
        DistillationMap(0, (2, 4, 4), (2, 4, 4), prov, init="ones")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        OutputDistillation(_net().readout_term, prov, temperature=0.0)


@pytest.mark.parametrize("shape, grid, pool, features", [
    ((2, 4, 4), 2, (2, 2), 8), ((2, 4, 4), 1, (4, 4), 2), ((2, 6, 3), 2, (3, 3), 4), ((2, 6, 3), 4, (2, 1), 18),
    ((2, 5, 7), 2, (5, 7), 2), ((2, 2, 2), 3, (1, 1), 8), ((7,), 2, None, 7),
])
def test_local_head_grid(shape, grid, pool, features):
    """Eq. 6.2: g_h is the largest divisor of h not above g (likewise g_w); fc layers are read directly."""
    head = LocalErrorHead(0, shape, 3, grid=grid)
    assert head.pool == pool and head.features == features
    assert head.param_specs()[0].shape == (3, features)


def test_teacher_features_computed_once_per_batch():
    """One teacher forward per batch gives both the features and the logits (Eqs. 6.4, 6.6)."""
    from types import SimpleNamespace

    class Counting:
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return np.zeros((x.shape[0], 3)), SimpleNamespace(acts=[x])

    prov = TeacherFeatures(Counting())
    x = np.ones((2, 1, 4, 4))
    feats, logits = prov.get(x)
    assert feats[0] is x and logits.shape == (2, 3)
    prov.get(x)
    assert Counting.calls == 1
    prov.get(np.ones((2, 1, 4, 4)))
    assert Counting.calls == 2


# ---------------------------------------------------------------------- Eq. 6.7: heads and maps start at zero
@pytest.mark.parametrize("init", ["zeros", "uniform"])
def test_signal_init(init):
    """Heads and maps start at zero by default (Eq. 6.7): silent, ∂C/∂s = 0 for every layer,
    until they learn; ``init="uniform"`` draws them by Eq. 3.10 and they push at once. The network's
    own parameters are the same either way."""
    net, ref = _net(), _net()
    terms = attach_signals(net, SignalConfig(local_layers="all", kd_layers="all", init=init), _teacher())
    assert all(np.array_equal(net.params[k], ref.params[k]) for k in ref.params)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (4, *SHAPE)), np.array([0, 1, 2, 0])
    states = [rng.uniform(0, 1, shp) for shp in net.state_shapes(4)]
    for term in terms:
        names = [spec.name for spec in term.param_specs()]
        zero = all(not np.any(net.params[k]) for k in names)
        assert zero == (init == "zeros"), names
        force = term.state_grads(net.params, states, term.prepare(net.params, x, y))[term.layer]
        assert (np.max(np.abs(force)) == 0.0) == (init == "zeros"), term.name


def test_param_spec_init_error_names_the_value():
    from pyeqprop.model.params import ParamSpec, init_params

    with pytest.raises(ValueError, match=r"parameter 'h.weight' has init 'ones'; expected 'uniform' or 'zeros'"):
        init_params([ParamSpec("h.weight", (2, 2), 2, "ones")], np.random.default_rng(0), dtype="float64",
                    xp=np, device="cpu")


# ---------------------------------------------------------------------- Eq. 6.8: the distillation schedule
@pytest.mark.parametrize("epochs", [1, 2, 5, 10])
def test_cosine_schedule_starts_at_full_weight_decays_and_mirrors(epochs):
    f = [kd_schedule_factor("cosine", e, epochs) for e in range(epochs)]
    assert f[0] == 1.0
    assert all(a > b for a, b in zip(f, f[1:]))  # strictly decreasing over the run
    assert all(0.0 < v <= 1.0 for v in f)  # never off within the run
    # a half cosine is point-symmetric about e = E/2: f(e) + f(E − e) = 1 (cos(π − x) = −cos x)
    assert all(abs(f[e] + f[epochs - e] - 1.0) <= 1e-15 for e in range(1, epochs))
    assert [kd_schedule_factor("constant", e, epochs) for e in range(epochs)] == [1.0] * epochs


@pytest.mark.parametrize("args, match", [(("linear", 0, 3), "'constant' or 'cosine', got 'linear'"),
                                         (("cosine", 3, 3), r"epoch must be in 0\.\.2 .*got 3"),
                                         (("cosine", -1, 3), "got -1"),
                                         (("constant", 0, 0), "epochs = 0")])
def test_schedule_errors_name_the_value(args, match):
    with pytest.raises(ValueError, match=match):
        kd_schedule_factor(*args)


def test_set_kd_weights_scales_distillation_only_and_does_not_compound():
    net = _net()
    attach_signals(net, SignalConfig(local_layers="1", local_weight=0.3, kd_layers="1,3", kd_weight=[2.0, 4.0],
                                     output_kd_weight=0.5), _teacher())
    assert [t.kind for _, t in net.cost_terms][1:] == ["local", "kd", "kd", "kd_out"]
    assert [w for w, _ in net.cost_terms] == [1.0, 0.3, 2.0, 4.0, 0.5]
    for _ in range(2):  # twice: weights are base × factor, not compounded
        set_kd_weights(net, 0.25)
    assert [w for w, _ in net.cost_terms] == [1.0, 0.3, 0.5, 1.0, 0.125]
    set_kd_weights(net, 1.0)
    assert [w for w, _ in net.cost_terms] == [1.0, 0.3, 2.0, 4.0, 0.5]
    for bad in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=rf"finite and >= 0, got {bad}"):
            set_kd_weights(net, bad)
    assert [w for w, _ in net.cost_terms] == [1.0, 0.3, 2.0, 4.0, 0.5]  # a refused factor changes nothing


# ---------------------------------------------------------------------- Eq. 6.9: standardised targets
def _pooled_numpy(feature, pool):
    """Average pooling by reshape (an oracle independent of pyeqprop.ops.pool): (n, c, h, w) -> (n, c, h/p, w/p)."""
    n, c, h, w = feature.shape
    return feature.reshape(n, c, h // pool, pool, w // pool, pool).mean(axis=(3, 5))


def test_standardised_targets_have_the_training_splits_channel_statistics():
    rng = np.random.default_rng(3)
    x = rng.uniform(-1.0, 1.0, size=(37, *SHAPE))
    teacher = _teacher()
    teacher.params["conv2.weight"][1] = 0.0  # channel 2 of conv2 becomes the constant ρ(−5) = 0
    teacher.params["conv2.bias"][1] = -5.0
    net = _net()
    maps = attach_signals(net, SignalConfig(kd_layers="all"), teacher)
    standardise_targets(net, x, batch=5)  # 8 batches, the last of 2 samples: the pairwise merge is exercised
    feats = teacher.features(x)
    for term in maps:
        t = feats[term.layer]  # the student's own shapes: no pooling (pool 1)
        assert term.teacher_pool in (None, (1, 1))
        axes = (0, 2, 3) if t.ndim == 4 else (0,)
        mu, sd = np.mean(t, axis=axes), np.std(t, axis=axes)
        sd_tilde = np.where(sd > 0, sd, 1.0)
        np.testing.assert_allclose(term.target_stats[0], mu, rtol=0, atol=1e-14)
        np.testing.assert_allclose(term.target_stats[1], sd_tilde, rtol=1e-12, atol=0)
        hat = term.prepare(net.params, x, None)  # over the same samples: mean 0, std 1 per live channel
        np.testing.assert_allclose(np.mean(hat, axis=axes), 0.0, rtol=0, atol=1e-13)
        live = sd > 0
        np.testing.assert_allclose(np.std(hat, axis=axes)[live], 1.0, rtol=1e-12)
    conv2 = maps[1]
    assert conv2.target_stats[1][1] == 1.0 and conv2.target_stats[0][1] == 0.0  # the constant channel: σ̃ = 1
    assert not np.any(conv2.prepare(net.params, x, None)[:, 1])


def test_standardised_statistics_do_not_depend_on_the_batch():
    rng = np.random.default_rng(4)
    x = rng.uniform(-1.0, 1.0, size=(23, *SHAPE))
    stats = []
    for batch in (1, 4, 23, 100):
        net = _net()
        attach_signals(net, SignalConfig(kd_layers="all"), _teacher())
        standardise_targets(net, x, batch=batch)
        stats.append([t.target_stats for _, t in net.cost_terms if t.kind == "kd"])
    for other in stats[1:]:
        for (mu_a, sd_a), (mu_b, sd_b) in zip(stats[0], other):
            np.testing.assert_allclose(mu_a, mu_b, rtol=0, atol=1e-15)  # float64 sums of 23 numbers in [0, 1]
            np.testing.assert_allclose(sd_a, sd_b, rtol=1e-13)


def test_standardised_targets_pool_a_larger_teacher_map():
    # a teacher without pools (8×8 maps) distilled into a student with them (4×4): Eq. 6.4 pools by 2 first
    x = np.random.default_rng(5).uniform(-1.0, 1.0, size=(11, *SHAPE))
    teacher = Teacher("c3-c3", SHAPE, num_classes=3, dtype="float64", xp="numpy", seed=2)
    net = CRNN("c2m-c2", SHAPE, num_classes=3, dtype="float64", xp="numpy", seed=0)
    maps = attach_signals(net, SignalConfig(kd_layers="all"), teacher)
    standardise_targets(net, x, batch=4)
    for term, t in zip(maps, teacher.features(x)):
        assert term.teacher_pool == (2, 2)
        pooled = _pooled_numpy(t, 2)
        np.testing.assert_allclose(term.target_stats[0], pooled.mean(axis=(0, 2, 3)), rtol=0, atol=1e-15)
        np.testing.assert_allclose(term.target_stats[1], pooled.std(axis=(0, 2, 3)), rtol=1e-12)


def test_standardise_targets_errors_and_no_maps():
    net = _net()
    attach_signals(net, SignalConfig(local_layers="all"))
    standardise_targets(net, np.zeros((0, *SHAPE)))  # no distillation map: nothing to do, no error
    net = _net()
    attach_signals(net, SignalConfig(kd_layers="1"), _teacher())
    with pytest.raises(ValueError, match="needs >= 1 sample and batch >= 1, got 0 and 256"):
        standardise_targets(net, np.zeros((0, *SHAPE)))
    with pytest.raises(ValueError, match="got 3 and 0"):
        standardise_targets(net, np.zeros((3, *SHAPE)), batch=0)


def test_standardise_targets_runs_on_the_array_api_alone():
    """Eq. 6.9 under array-api-strict (no NumPy-only call, a batch that does not divide n): float32
    statistics equal NumPy float64's to float32 rounding of the features (|t| ≤ 1: atol 1e-6)."""
    x = np.random.default_rng(6).uniform(-1.0, 1.0, size=(9, *SHAPE))
    stats = {}
    for xp, dtype in (("numpy", "float64"), ("array_api_strict", "float32")):
        teacher = Teacher("c3-c3", SHAPE, num_classes=3, dtype="float64", xp="numpy", seed=2)
        t = Teacher("c3-c3", SHAPE, num_classes=3, dtype=dtype, xp=xp, seed=2)
        for k in t.params:  # the same teacher in both namespaces
            t.params[k] = t.xp.asarray(np.asarray(teacher.params[k]), dtype=t.dtype)
        net = CRNN("c2m-c2", SHAPE, num_classes=3, dtype=dtype, xp=xp, seed=0)
        maps = attach_signals(net, SignalConfig(kd_layers="all"), t)
        standardise_targets(net, t.xp.asarray(x, dtype=t.dtype), batch=4)
        stats[xp] = [(np.asarray(mu), np.asarray(sd)) for mu, sd in (m.target_stats for m in maps)]
    for (mu_a, sd_a), (mu_b, sd_b) in zip(stats["numpy"], stats["array_api_strict"]):
        np.testing.assert_allclose(mu_b, mu_a, rtol=0, atol=1e-6)
        np.testing.assert_allclose(sd_b, sd_a, rtol=0, atol=1e-6)
