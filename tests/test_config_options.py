"""One declaration per training option (pyeqprop.train.config.OPTIONS) and what is derived from it.

The declaration of each TrainConfig field (type, default, help, allowed values or range) drives
validate(), the coercion of config_from_mapping, dump_toml and the flags of ``pyeqprop train``;
these tests check each of those against the declaration, and that allowed values are the
constants of the modules that define them, not copies.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys

import pytest

from pyeqprop import backend
from pyeqprop.cli import main
from pyeqprop.data.augment import PADDING_MODES  # (pyeqprop.data.augment is also a function's name)
from pyeqprop.learning import estimators, signals
from pyeqprop.learning.settle import NUDGED_FORMS, SCHEDULES
from pyeqprop.model import params, readout
from pyeqprop.ops import activations
from pyeqprop.train import progress
from pyeqprop.train.step import UNCONVERGED_POLICIES
from pyeqprop.train.config import (OPTIONS, ConfigError, TrainConfig, config_from_mapping, dump_toml, load_toml,
                                   option)
from pyeqprop.train.config import declarations

# option -> the constant of the module where the concept lives
HOME = {
    "augment_padding_mode": PADDING_MODES,
    "readout": readout.READOUTS,
    "activation": activations.ACTIVATIONS,
    "dtype": backend.DTYPES,
    "estimator": estimators.ESTIMATORS,
    "local_loss": signals.LOCAL_LOSSES,
    "kd_normalisation": signals.KD_NORMALISATIONS,
    "kd_schedule": signals.KD_SCHEDULES,
    "kd_targets": signals.KD_TARGETS,
    "signal_init": signals.SIGNAL_INITS,
    "init": params.NETWORK_INITS,
    "backend": backend.BACKENDS,
    "progress": progress.PROGRESS_MODES,
    "schedule": SCHEDULES,
    "nudged_phase": NUDGED_FORMS,
    "unconverged": UNCONVERGED_POLICIES,
}
CHOICES = [name for name, opt in OPTIONS.items() if opt.choices is not None]
RANGED = [name for name, opt in OPTIONS.items() if (opt.gt, opt.ge, opt.lt, opt.le) != (None,) * 4]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------- (a) every field is declared
def test_every_field_has_one_declaration_with_a_one_line_help():
    defaults = TrainConfig()
    assert list(OPTIONS) == [f.name for f in dataclasses.fields(TrainConfig)]
    for f in dataclasses.fields(TrainConfig):
        opt = OPTIONS[f.name]
        assert isinstance(opt.help, str) and len(opt.help) >= 15 and "\n" not in opt.help, f.name
        assert opt.help == f.metadata["help"]
        assert opt.default == getattr(defaults, f.name)
        assert isinstance(opt.default, opt.type) and opt.type in (bool, int, float, str, list), f.name
        if opt.type is int:
            assert not isinstance(opt.default, bool), f.name


def test_a_field_without_a_declaration_is_refused():
    @dataclasses.dataclass
    class Partial:
        a: int = option(1, "a declared option")
        b: int = 2

    with pytest.raises(TypeError, match=r"Partial\.b must be declared with option"):
        declarations(Partial)


def test_a_list_default_is_not_shared_between_configs():
    one, two = TrainConfig(), TrainConfig()
    one.lr.append(1.0)
    assert two.lr == OPTIONS["lr"].default == [0.05]


# ---------------------------------------------------------------------- (b) allowed values
def test_allowed_values_are_the_constants_of_their_home_modules():
    assert sorted(CHOICES) == sorted(HOME)
    for name, constant in HOME.items():
        assert OPTIONS[name].allowed is constant, name
        assert OPTIONS[name].default in constant, name
    assert tuple(estimators.ESTIMATORS) == estimators.EP_ESTIMATORS + ("bptt", "implicit")
    assert tuple(activations.ACTIVATIONS) == ("hard_sigmoid", "half_hard_sigmoid")


@pytest.mark.parametrize("name", sorted(HOME))
def test_cli_rejects_a_value_outside_the_choices_in_one_line(name, tmp_path, capsys):
    assert main(["train", OPTIONS[name].flag, "no-such-value", "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    allowed = ", ".join(HOME[name])
    assert f"config key {name!r} has value 'no-such-value'; expected one of {allowed}" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", sorted(HOME))
def test_every_allowed_value_is_accepted(name):
    for value in HOME[name]:
        assert getattr(config_from_mapping({name: value}), name) == value


def _outside_and_edge(opt):
    """A value just outside the declared range, and the nearest value inside it."""
    step = 1 if opt.type is int else 1e-3
    if opt.gt is not None:
        return opt.gt, opt.gt + step
    if opt.ge is not None:
        return opt.ge - step, opt.ge
    if opt.lt is not None:
        return opt.lt, opt.lt - step
    return opt.le + step, opt.le


@pytest.mark.parametrize("name", RANGED)
def test_a_value_outside_the_range_is_rejected_and_its_edge_accepted(name, tmp_path, capsys):
    opt = OPTIONS[name]
    outside, edge = _outside_and_edge(opt)
    flag_value = opt.as_flag([outside] if opt.type is list else outside)
    assert main(["train", opt.flag, flag_value, "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert f"config key {name!r} has value " in line and line.endswith(f"; expected {opt.expected}")
    assert repr([float(outside)] if opt.type is list else opt.type(outside)) in line
    value = [edge] if opt.type is list else edge
    assert getattr(config_from_mapping({name: value}), name) == value


@pytest.mark.parametrize("name, value, expected", [
    ("beta", 0.0, "a finite number > 0"),
    ("T1", 0, "an integer >= 1"),
    ("T_eval", -1, "an integer >= 0"),
    ("test_fraction", 1.0, "a number in (0, 1)"),
    ("momentum", 1.0, "a number in [0, 1)"),
    ("weight_decay", -1e-9, "a finite number >= 0"),
    ("weight_decay", float("nan"), "a finite number >= 0"),
    ("lr", [0.1, 0.0], "a finite number > 0 or a list of such numbers"),
    ("lr", [], "a finite number > 0 or a list of such numbers"),
    # issue 15: NaN and inf pass no float option, and these bounds were missing
    ("beta", float("inf"), "a finite number > 0"),
    ("lr", [0.1, float("inf")], "a finite number > 0 or a list of such numbers"),
    ("lr_min", -1.0, "a finite number >= 0"),
    ("lr_min", float("nan"), "a finite number >= 0"),
    ("weight_decay", float("inf"), "a finite number >= 0"),
    ("seed", -1, "an integer >= 0"),
    ("cosine_epochs", -2, "an integer >= -1"),
    ("local_grid", 0, "an integer >= 1"),
])
def test_range_messages_read_as_before(name, value, expected):
    with pytest.raises(ConfigError) as info:
        dataclasses.replace(TrainConfig(), **{name: value}).validate()
    assert str(info.value) == f"config key {name!r} has value {value!r}; expected {expected}"


@pytest.mark.parametrize("name, value, expected", [
    ("T2", "six", "an integer"), ("beta", True, "a number"), ("augment", "maybe", "true or false"),
    ("lr", "0.1,fast", "a number or a comma list"), ("lr", [0.1, "fast"], "a number or a list of numbers"),
    ("dataset", 1.5, "a string"),
])
def test_coercion_messages_name_the_key_the_value_and_the_type(name, value, expected):
    with pytest.raises(ConfigError) as info:
        config_from_mapping({name: value})
    assert str(info.value) == f"config key {name!r} has value {value!r}; expected {expected}"


def test_coercion_of_strings_as_flags_give_them():
    cfg = config_from_mapping({"T1": "7", "augment": "Yes", "lr": "0.1, 0.2", "beta": "1", "kd_layers": [1, 3]})
    assert (cfg.T1, cfg.augment, cfg.lr, cfg.beta, cfg.kd_layers) == (7, True, [0.1, 0.2], 1.0, "1,3")
    assert type(cfg.beta) is float


# ---------------------------------------------------------------------- (c) config.toml round trip
AWKWARD = {
    "dataset": "synthetic", "data_root": 'C:\\data "cifar"\tü/😀', "download": True, "augment": True,
    "augment_padding": 0, "augment_flip": False, "augment_padding_mode": "zeros", "test_fraction": 0.1 + 0.2,
    "val_fraction": 0.0,
    "arch": "c4m-f8", "readout": "mse", "activation": "hard_sigmoid", "dtype": "float64", "weight_scale": 1e-300,
    "init": "delta-orthogonal", "init_radius": 1.25, "feedback": 0.1 + 0.2,
    "estimator": "implicit", "beta": 0.125, "T1": 1, "T2": 123456789, "T_eval": 7, "schedule": "gauss-seidel",
    "settle_tol": 1e-9, "check_every": 1, "nudged_phase": "difference", "unconverged": "skip",
    "asymmetry_limit": 0.1 + 0.2, "shards": 2, "epochs": 2, "batch_size": 1,
    "lr": [0.25, 1e-7, 3.0], "momentum": 0.0, "weight_decay": 0.0, "lr_min": -0.0, "cosine_epochs": -1,
    "local_layers": "1,3", "local_weight": 2.5, "local_grid": 3, "local_loss": "mse", "kd_layers": "none",
    "kd_weight": 0.3333333333333333, "kd_normalisation": "sum", "kd_schedule": "cosine",
    "kd_targets": "standardised", "output_kd_weight": 0.5, "temperature": 1e3,
    "signal_init": "uniform", "teacher_epochs": 0, "teacher_lr": 0.07, "teacher_batch_size": 5,
    "teacher_weight_scale": 4.0, "teacher": "C:\\teachers\\t.npz", "backend": "array_api_strict", "seed": 2**40 + 1,
    "out": 'runs/a "b" \\ c\nd\x7f\x01 ß', "progress": "bar", "checkpoint_every": 3,
    "checkpoint_batches": 17, "checkpoint_minutes": 0.5,
}


def test_dump_load_round_trips_every_field_exactly(tmp_path):
    assert list(AWKWARD) == list(OPTIONS)
    defaults = TrainConfig()
    assert all(AWKWARD[k] != getattr(defaults, k) for k in AWKWARD)  # every field differs from its default
    # asymmetry_limit > 0 needs the symmetric estimator (Eq. 4.9): each of the two is awkward in one round trip
    for awkward in ({**AWKWARD, "asymmetry_limit": 0.0}, {**AWKWARD, "estimator": "symmetric"}):
        cfg = TrainConfig(**awkward).validate()
        path = tmp_path / "config.toml"
        path.write_text(dump_toml(cfg), encoding="utf-8")
        back = config_from_mapping(load_toml(path))
        assert back == cfg
        for name in OPTIONS:
            assert type(getattr(back, name)) is type(getattr(cfg, name)), name
        assert str(back.lr_min) == "-0.0"


def test_config_toml_is_flat_commented_and_keeps_the_old_value_lines():
    text = dump_toml(TrainConfig())
    lines = [line for line in text.splitlines() if line.strip()]
    keys = [line.split(" = ")[0] for line in lines if not line.startswith("#")]
    assert keys == list(OPTIONS)
    assert not any(line.startswith("[") for line in lines)
    for i, line in enumerate(lines):
        if not line.startswith("#"):  # the comment right above names the option's help, default and rule
            assert lines[i - 1] == "# " + OPTIONS[line.split(" = ")[0]].describe()
    assert "# nudging strength β of Eq. 3.6" in text and "(default 0.5; a finite number > 0)" in text


# what the code before OPTIONS wrote into config.toml (flat, no comments): it must still load
OLD_CONFIG_TOML = '''dataset = "synthetic"
data_root = ""
download = false
augment = true
augment_padding = 4
augment_flip = true
augment_padding_mode = "edge"
test_fraction = 0.2
arch = "digits"
readout = "softmax"
activation = "half_hard_sigmoid"
dtype = "float32"
weight_scale = 1.0
estimator = "symmetric"
beta = 0.25
T1 = 30
T2 = 10
T_eval = 3
epochs = 30
batch_size = 32
lr = [0.1, 0.02]
momentum = 0.5
weight_decay = 0.0005
lr_min = 1e-05
cosine_epochs = 0
local_layers = "all"
local_weight = 0.1
local_grid = 2
local_loss = "ce"
kd_layers = "1,2"
kd_weight = 1.0
kd_normalisation = "mean"
output_kd_weight = 0.0
temperature = 4.0
signal_init = "zeros"
teacher_epochs = 20
teacher_lr = 0.05
teacher_batch_size = 32
teacher_weight_scale = 2.0
teacher = ""
backend = "numpy"
seed = 0
out = "runs/a \\"b\\""
progress = "auto"
checkpoint_every = 1
'''


def test_a_config_toml_of_the_earlier_format_still_loads(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(OLD_CONFIG_TOML, encoding="utf-8")
    cfg = config_from_mapping(load_toml(path))
    expected = TrainConfig(dataset="synthetic", lr=[0.1, 0.02], kd_layers="1,2", out='runs/a "b"', augment=True,
                           T_eval=3, beta=0.25, momentum=0.5)
    assert cfg == expected
    new_value_lines = [line for line in dump_toml(cfg).splitlines() if line and not line.startswith("#")]
    old_keys = {line.split(" = ")[0] for line in OLD_CONFIG_TOML.splitlines()}
    # the key = value lines are written as before; options added since (settling, Eq. 3.14; shards, Eq. 4.7;
    # init, Eq. 3.16; nudged_phase, Eq. 4.8; asymmetry_limit, Eq. 4.9; kd_schedule and kd_targets, SPEC §6)
    # take their defaults
    assert [line for line in new_value_lines if line.split(" = ")[0] in old_keys] == OLD_CONFIG_TOML.splitlines()
    assert {line.split(" = ")[0] for line in new_value_lines} - old_keys == {"schedule", "settle_tol", "check_every",
                                                                                     "shards", "val_fraction",
                                                                                     "checkpoint_batches",
                                                                                     "checkpoint_minutes", "init",
                                                                                     "init_radius", "feedback",
                                                                                     "nudged_phase", "unconverged",
                                                                                     "asymmetry_limit", "kd_schedule",
                                                                                     "kd_targets"}


# ---------------------------------------------------------------------- (d) --help
def _help(command):
    env = {**os.environ, "COLUMNS": "1000"}  # no wrapping: each flag's help is one piece of text
    proc = subprocess.run([sys.executable, "-m", "pyeqprop.cli", command, "--help"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    entries, current = {}, None
    for line in proc.stdout.splitlines():
        m = re.match(r"  (--[\w-]+)( \S+)?(.*)$", line)
        if m:
            current = m.group(1)
            entries[current] = (m.group(2) or "").strip() + " |" + m.group(3)
        elif current and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


@pytest.mark.parametrize("command", ["train", "teacher"])
def test_help_lists_every_flag_with_its_help_default_and_allowed_values(command):
    entries = _help(command)
    assert {"--config", "--resume"} <= set(entries)
    for opt in OPTIONS.values():
        assert opt.flag in entries, opt.flag
        text = entries[opt.flag]
        shown = f"[{opt.metavar}]" if opt.type is bool else opt.metavar  # a boolean flag alone means true
        assert text.startswith(shown + " |"), (opt.flag, text)
        assert opt.help in text, (opt.flag, text)
        assert opt.describe() in text, (opt.flag, text)
    assert "one of " + ", ".join(PADDING_MODES) in entries["--augment-padding-mode"]
    assert "default 'symmetric'; one of symmetric, one-sided, random-sign, bptt" in entries["--estimator"]
    assert "default 0.05; a finite number > 0" in entries["--lr"]


def test_building_the_parser_does_not_import_the_data_package():
    code = ("import sys\nfrom pyeqprop.cli import build_parser\nbuild_parser()\n"
            "print('pyeqprop.data' in sys.modules, 'pyeqprop.train.config' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "True"]
