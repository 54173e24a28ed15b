"""Training configuration: one flat dataclass, filled from defaults, a TOML file and flags.

A TOML config holds the same keys as :class:`TrainConfig`, either at top level or inside
tables (``[ep]``, ``[optim]``, …: table names are only for grouping and are ignored). An
unknown key or a value of the wrong type is a :class:`ConfigError` naming the key and value.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields

__all__ = ["TrainConfig", "ConfigError", "load_toml", "config_from_mapping", "dump_toml"]


class ConfigError(ValueError):
    """A malformed configuration: names the key, the value, and what was expected."""


@dataclass
class TrainConfig:
    # data
    dataset: str = "digits"
    data_root: str = ""
    download: bool = False
    augment: bool = False  # random crop (augment_padding) and horizontal flip (augment_flip)
    augment_padding: int = 4
    augment_flip: bool = True
    augment_padding_mode: str = "edge"  # edge | zeros
    test_fraction: float = 0.2
    # model
    arch: str = "digits"
    readout: str = "softmax"
    activation: str = "half_hard_sigmoid"
    dtype: str = "float32"
    weight_scale: float = 1.0
    # EP
    estimator: str = "symmetric"
    beta: float = 0.5
    T1: int = 30
    T2: int = 10
    T_eval: int = 0  # 0: use T1
    # optimizer (Eqs. 8.1-8.3)
    epochs: int = 30
    batch_size: int = 32
    lr: list = field(default_factory=lambda: [0.05])
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_min: float = 1e-5
    cosine_epochs: int = 0  # 0: anneal over all epochs; -1: constant learning rate
    # intermediate signals (Eq. 6.1)
    local_layers: str = "all"
    local_weight: float = 0.1
    local_grid: int = 2
    local_loss: str = "ce"
    kd_layers: str = "all"
    kd_weight: float = 1.0
    kd_normalisation: str = "mean"
    output_kd_weight: float = 0.0
    temperature: float = 4.0
    signal_init: str = "zeros"  # zeros | uniform: how heads and maps start (Eq. 6.7)
    # teacher (backprop, Eqs. 7.1-7.3)
    teacher_epochs: int = 20
    teacher_lr: float = 0.05
    teacher_batch_size: int = 32
    teacher_weight_scale: float = 2.0  # deep teachers with clipped activations need > 1 to train
    teacher: str = ""  # path to a saved teacher; empty: train one and cache it in the run folder
    # run
    backend: str = "numpy"
    seed: int = 0
    out: str = ""
    progress: str = "auto"  # auto | bar | none
    checkpoint_every: int = 1

    def validate(self) -> "TrainConfig":
        def bad(key, expected):
            raise ConfigError(f"config key {key!r} has value {getattr(self, key)!r}; expected {expected}")

        choices = {
            "readout": ("mse", "softmax"),
            "activation": ("hard_sigmoid", "half_hard_sigmoid"),
            "dtype": ("float32", "float64"),
            "estimator": ("symmetric", "one-sided", "random-sign", "bptt"),
            "local_loss": ("ce", "mse"),
            "kd_normalisation": ("mean", "sum"),
            "backend": ("numpy", "cupy", "array_api_strict"),
            "progress": ("auto", "bar", "none"),
            "augment_padding_mode": ("edge", "zeros"),
            "signal_init": ("zeros", "uniform"),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, "one of " + ", ".join(allowed))
        for key in ("beta", "weight_scale", "temperature", "teacher_lr", "teacher_weight_scale"):
            if not getattr(self, key) > 0:
                bad(key, "a number > 0")
        for key in ("T1", "T2", "epochs", "batch_size", "teacher_batch_size", "checkpoint_every"):
            if getattr(self, key) < 1:
                bad(key, "an integer >= 1")
        for key in ("T_eval", "teacher_epochs", "augment_padding"):
            if getattr(self, key) < 0:
                bad(key, "an integer >= 0")
        if not 0.0 < self.test_fraction < 1.0:
            bad("test_fraction", "a number in (0, 1)")
        if not 0.0 <= self.momentum < 1.0:
            bad("momentum", "a number in [0, 1)")
        if self.weight_decay < 0:
            bad("weight_decay", "a number >= 0")
        if not self.lr or any(not v > 0 for v in self.lr):
            bad("lr", "a positive number or a list of positive numbers (one per layer)")
        for key in ("local_weight", "kd_weight", "output_kd_weight"):
            if getattr(self, key) < 0:
                bad(key, "a number >= 0")
        return self

    @property
    def augment_options(self) -> dict:
        """Keyword arguments of :func:`pyeqprop.data.augment.augment` for this config."""
        return {"padding": self.augment_padding, "flip": self.augment_flip, "padding_mode": self.augment_padding_mode}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def eval_steps(self) -> int:
        return self.T_eval or self.T1


_TYPES = {f.name: f for f in fields(TrainConfig)}


def _coerce(key, value):
    default = getattr(TrainConfig(), key)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r} has value {value!r}; expected true or false")
    if isinstance(default, list):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return [float(value)]
        if isinstance(value, str):
            try:
                return [float(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ConfigError(f"config key {key!r} has value {value!r}; expected a number or a comma list") from None
        if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        raise ConfigError(f"config key {key!r} has value {value!r}; expected a number or a list of numbers")
    if isinstance(default, int):
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
            raise ConfigError(f"config key {key!r} has value {value!r}; expected an integer")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r} has value {value!r}; expected a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key {key!r} has value {value!r}; expected a number") from None
    if isinstance(default, str):
        if isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise ConfigError(f"config key {key!r} has value {value!r}; expected a string")
        return str(value)
    return value


def _flatten(mapping, prefix=""):
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + key + ".")
        else:
            yield key, prefix + key, value


def config_from_mapping(mapping: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Overlay ``mapping`` (possibly nested in tables) on ``base`` (defaults), validating each key."""
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, full, value in _flatten(mapping):
        key = key.replace("-", "_")
        if key not in _TYPES:
            raise ConfigError(f"unknown config key {full!r}; known keys: {', '.join(sorted(_TYPES))}")
        setattr(cfg, key, _coerce(key, value))
    return cfg.validate()


def load_toml(path) -> dict:
    """Read a TOML file into a dict; a syntax error is a ConfigError naming the file."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def dump_toml(cfg: TrainConfig) -> str:
    """The effective configuration as flat TOML (what the run folder's config.toml holds)."""
    return "".join(f"{k} = {_toml_value(v)}\n" for k, v in cfg.to_dict().items())
