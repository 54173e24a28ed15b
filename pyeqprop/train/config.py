"""Training configuration: every option declared once, everything else derived from it.

Each field of :class:`TrainConfig` is one option. Its name, type and default are the
dataclass field's; :func:`option` adds a one-line help text and what values it allows: a
tuple (or mapping) of names imported from the module that defines them, or a range. From
that one declaration (collected in :data:`OPTIONS`, one :class:`Option` per field) come

- :meth:`TrainConfig.validate`: allowed values and ranges;
- :func:`config_from_mapping`: coercion of TOML values and command-line strings by type;
- :func:`dump_toml`: the run folder's ``config.toml``, each key under a ``# help`` comment;
- the flags of ``pyeqprop train`` / ``pyeqprop teacher`` and their ``--help``
  (:mod:`pyeqprop.cli`).

A TOML config holds the same keys as :class:`TrainConfig`, either at top level or inside
tables (``[ep]``, ``[optim]``, …: table names are only for grouping and are ignored). An
unknown key or a value of the wrong type is a :class:`ConfigError` naming the key and value.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType

from ..backend import BACKENDS, DTYPES, ENV_VAR
from ..learning.shards import CPU_BACKENDS
from ..model.readout import READOUTS
from ..learning.estimators import ESTIMATORS
from ..learning.settle import CHECK_EVERY, SCHEDULES, Settling
from ..learning.signals import KD_NORMALISATIONS, KD_SCHEDULES, KD_TARGETS, LOCAL_LOSSES, SIGNAL_INITS
from ..ops.activations import ACTIVATIONS
from .progress import PROGRESS_MODES

__all__ = ["TrainConfig", "Option", "OPTIONS", "Imported", "option", "declarations", "ConfigError", "load_toml",
           "config_from_mapping", "dump_toml", "parse_bool"]


class ConfigError(ValueError):
    """A malformed configuration: names the key, the value, and what was expected."""


@dataclass(frozen=True)
class Imported:
    """A constant named by its module and attribute, imported when first needed.

    For allowed values defined in a module that the command line must not import at
    start-up (``pyeqprop --help`` stays fast): ``Imported("pyeqprop.data.augment", "PADDING_MODES")``.
    """

    module: str
    name: str

    def get(self):
        """The constant itself (the very object its module defines)."""
        return getattr(importlib.import_module(self.module), self.name)


def option(default, help: str, *, choices=None, gt=None, ge=None, lt=None, le=None):
    """Declare one :class:`TrainConfig` field: its default, help text and allowed values.

    Parameters
    ----------
    default : bool, int, float, str, list of float, or a function returning one
        The default value (a list is copied for every new config; a function is called for every
        new config, e.g. to read an environment variable).
    help : str
        One line: what the option does, its unit or meaning, and its symbol and equation in
        SPEC.md where it has one ("β of Eq. 3.6").
    choices : tuple, Mapping or Imported, optional
        The allowed values (a mapping: its keys), imported from the module that defines them.
    gt, ge, lt, le : float, optional
        Bounds of a number (of each number of a list): > gt, >= ge, < lt, <= le.

    Returns
    -------
    dataclasses.Field
        The field, with the declaration in its ``metadata``.
    """
    metadata = {"help": help, "choices": choices, "gt": gt, "ge": ge, "lt": lt, "le": le}
    if callable(default):  # read when each config is made (an environment variable)
        return field(default_factory=default, metadata=metadata)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _default_backend() -> str:
    """``$PYEQPROP_BACKEND`` when set (checked against the choices by :meth:`TrainConfig.validate`), else numpy."""
    return os.environ.get(ENV_VAR, "").strip() or "numpy"


@dataclass
class TrainConfig:
    """Everything one ``pyeqprop train`` job needs; see :data:`OPTIONS` (or ``pyeqprop train --help``).

    Equation numbers refer to SPEC.md. Build one with keywords (unset keys take their
    defaults), from a mapping with :func:`config_from_mapping`, and check it with :meth:`validate`.
    """

    # data
    dataset: str = option("digits", "data set: one of pyeqprop.data.DATASETS (case, '-' and '_' are ignored)")
    data_root: str = option("", "CIFAR folder or archive location; empty: $PYEQPROP_DATA, then the default search")
    download: bool = option(False, "CIFAR: download the archive into the data folder when it is not found")
    augment: bool = option(False, "augment training batches: random crop (augment_padding), "
                                  "then random horizontal flip (augment_flip)")
    augment_padding: int = option(4, "padding p of the random crop, in pixels (0: no crop)", ge=0)
    augment_flip: bool = option(True, "with augment: flip each training image horizontally with probability 1/2")
    augment_padding_mode: str = option("edge", "what the random crop sees outside the image: "
                                               "the nearest edge pixel, or zeros",
                                       choices=Imported("pyeqprop.data.augment", "PADDING_MODES"))
    test_fraction: float = option(0.2, "held-out fraction of the stratified train/test split "
                                       "(CIFAR has an official test set and ignores it)", gt=0, lt=1)
    val_fraction: float = option(0.1, "fraction of the training split held out, stratified and seeded, as the "
                                      "validation split that chooses best.npz (0: none, no best.npz)", ge=0, lt=1)
    # model
    arch: str = option("digits", "architecture: a spec string such as c16m-c32m (conv tokens "
                                 "c<ch>[k<k>][p<p>][m|a], fc tokens f<units>; SPEC §3) or a preset name")
    readout: str = option("softmax", "output: a dynamical output layer with cost ½‖s_L − onehot(y)‖² (mse, "
                                     "Eq. 3.3) or a softmax readout (Eq. 3.4)", choices=READOUTS)
    activation: str = option("half_hard_sigmoid", "activation ρ: clip(u, 0, 1) (Eq. 2.9) "
                                                  "or clip(u/2, 0, 1) (Eq. 2.10)", choices=ACTIVATIONS)
    dtype: str = option("float32", "floating dtype of states, parameters and data", choices=DTYPES)
    weight_scale: float = option(1.0, "factor on the student's initial weight range ±1/√fan_in (Eq. 3.10); "
                                      "init uniform only", gt=0)
    init: str = option("uniform", "the student's initialisation: uniform (Eq. 3.10), or orthogonal / "
                                  "delta-orthogonal weights calibrated to the spectral radius init_radius (Eq. 3.16)",
                       choices=Imported("pyeqprop.model.params", "NETWORK_INITS"))
    init_radius: float = option(0.85, "with an orthogonal init: the spectral radius r of the linearised settling "
                                      "step it is calibrated to (Eqs. 3.16-3.17)", gt=0)
    feedback: float = option(1.0, "feedback gain ω of the top-down term (Eq. 3.18): layer l's energy weight is "
                                  "ω^(l−L); 1: the plain network of Eqs. 3.2-3.8", gt=0, le=1)
    # EP
    estimator: str = option("symmetric", "gradient estimator: one-sided (Eq. 4.1), symmetric (Eq. 4.2) or "
                                         "random-sign EP (Eq. 4.3); or the exact gradients bptt (Eq. 5.4, "
                                         "T = T1) and implicit (at the free fixed point, Eq. 5.7)",
                            choices=ESTIMATORS)
    beta: float = option(0.5, "nudging strength β of Eq. 3.6 (its sign is set by the estimator)", gt=0)
    T1: int = option(30, "free-phase steps T1 of the dynamics (Eq. 3.8), from s = 0; with settle_tol > 0 "
                         "the most steps", ge=1)
    T2: int = option(10, "nudged-phase steps T2 (§4), from the free state; with settle_tol > 0 the most steps",
                     ge=1)
    T_eval: int = option(0, "free steps when testing (the most, with settle_tol > 0); 0: T1", ge=0)
    schedule: str = option("synchronous", "update schedule of every phase: all layers at once (synchronous, "
                                          "Eq. 3.8) or odd layers, then even layers (gauss-seidel, Eq. 3.13)",
                           choices=SCHEDULES)
    settle_tol: float = option(0.0, "settle every phase until its residual r_t ≤ settle_tol (Eq. 3.14), at most "
                                    "T1/T2 steps; 0: exactly T1/T2 steps", ge=0)
    check_every: int = option(CHECK_EVERY, "steps between two residual checks when settle_tol > 0 (one host "
                                           "transfer each, Eq. 3.14)", ge=1)
    nudged_phase: str = option("state", "variables the nudged phases settle in: the state s (Eqs. 3.8, 3.13) or "
                                        "its difference from the free state, δ = s − s⁰ (Eq. 4.8: δ is not "
                                        "rounded to the float spacing of s; settle_tol then bounds the nudged "
                                        "residual in gradient units)",
                               choices=Imported("pyeqprop.learning.settle", "NUDGED_FORMS"))
    unconverged: str = option("apply", "a batch's update when one of its phases stopped at T1/T2 above settle_tol "
                                       "(Eq. 3.14): apply it, or skip the batch (no step, momentum untouched; "
                                       "metrics.jsonl counts it in skipped_updates)",
                              choices=Imported("pyeqprop.train.step", "UNCONVERGED_POLICIES"))
    asymmetry_limit: float = option(0.0, "skip a batch's update when some layer's response asymmetry "
                                         "‖δ⁺ + δ⁻‖ / ‖δ⁺ − δ⁻‖ of the two nudged phases exceeds this (Eq. 4.9: O(β) "
                                         "where the response is smooth, near 1 where a phase left for another "
                                         "fixed point; symmetric estimator only; metrics.jsonl counts it in "
                                         "skipped_asymmetric); 0: off", ge=0)
    shards: int = option(1, "contiguous sub-batches whose phases settle in parallel threads, one BLAS thread "
                            "each, combined by Eq. 4.7 (host backends; 2 uses both cores of a 2-core machine); "
                            "1: the whole batch in one thread", ge=1)
    # optimizer (Eqs. 8.1-8.3)
    epochs: int = option(30, "training epochs of the student", ge=1)
    batch_size: int = option(32, "samples n per mini-batch of the student", ge=1)
    lr: list[float] = option([0.05], "learning rate η_0 of Eq. 8.2: one for all parameters, or a comma list "
                                     "with one per layer (neuron layers, then the readout; Eq. 8.3)", gt=0)
    momentum: float = option(0.9, "momentum μ of SGD (Eq. 8.1); the teacher's SGD uses it too", ge=0, lt=1)
    weight_decay: float = option(5e-4, "weight decay wd of Eq. 8.1, added to the gradient", ge=0)
    lr_min: float = option(1e-5, "final learning rate η_min of the cosine schedule (Eq. 8.2)", ge=0)
    cosine_epochs: int = option(0, "epochs E of the cosine schedule (Eq. 8.2); 0: all epochs; "
                                   "-1: constant learning rate", ge=-1)
    # intermediate signals (Eq. 6.1)
    local_layers: str = option("all", "layers A with a local error head (Eq. 6.1): all (every conv layer), "
                                      "lower (the first half), none, or 1-based conv layer numbers such as 1,3")
    local_weight: float = option(0.1, "weight λ_l of every local error cost (Eq. 6.1)", ge=0)
    local_grid: int = option(2, "pooling grid g of a local error head (Eq. 6.2)", ge=1)
    local_loss: str = option("ce", "local error cost C^loc_l (Eq. 6.3): cross-entropy (ce) or squared error (mse)",
                             choices=LOCAL_LOSSES)
    kd_layers: str = option("all", "layers D distilled from the teacher (Eq. 6.1): all (every conv layer), "
                                   "lower (the first half), none, or 1-based conv layer numbers such as 1,3")
    kd_weight: float = option(1.0, "weight γ_l of every distillation cost (Eq. 6.1)", ge=0)
    kd_normalisation: str = option("mean", "distillation cost C^kd_l (Eq. 6.5): divided by the teacher's "
                                           "feature count |t_l| (mean) or not (sum)", choices=KD_NORMALISATIONS)
    kd_schedule: str = option("constant", "distillation weights over the epochs (Eq. 6.8): constant, or "
                                          "cosine (γ_l and κ times ½(1 + cos(π e/E)) in epoch e of E)",
                              choices=KD_SCHEDULES)
    kd_targets: str = option("raw", "distillation targets (Eq. 6.9): the teacher's features (raw), or each channel "
                                    "standardised by its mean and std over the training split (standardised)",
                             choices=KD_TARGETS)
    output_kd_weight: float = option(0.0, "weight κ of output distillation (Eqs. 6.1, 6.6); 0: off", ge=0)
    temperature: float = option(4.0, "temperature τ of output distillation (Eq. 6.6)", gt=0)
    signal_init: str = option("zeros", "how local error heads and distillation maps start: "
                                       "at zero (Eq. 6.7) or uniform by Eq. 3.10", choices=SIGNAL_INITS)
    # teacher (backprop, Eqs. 7.1-7.3)
    teacher_epochs: int = option(20, "epochs of backprop training of the teacher (Eq. 7.3)", ge=0)
    teacher_lr: float = option(0.05, "learning rate of the teacher's SGD (Eq. 8.1)", gt=0)
    teacher_batch_size: int = option(32, "samples per mini-batch of the teacher", ge=1)
    teacher_weight_scale: float = option(2.0, "factor on the teacher's initial weight range (§7.1): "
                                              "deep teachers with clipped activations need > 1 to train", gt=0)
    teacher: str = option("", "path of a saved teacher (.npz); empty: train one and cache it in the run folder")
    # run
    backend: str = option(_default_backend, "array backend the job runs on; the default is $PYEQPROP_BACKEND "
                                            "when it is set, else numpy", choices=BACKENDS)
    seed: int = option(0, "seed of the initial parameters (Eq. 3.10), the split, the batch order "
                          "and the augmentation", ge=0)
    out: str = option("", "run folder; empty: runs/<dataset>-<date>-<time>")
    progress: str = option("auto", "progress bar on stderr: auto (when it is a terminal), bar (always) "
                                   "or none", choices=PROGRESS_MODES)
    checkpoint_every: int = option(1, "save latest.npz every this many epochs (and after the last)", ge=1)
    checkpoint_batches: int = option(0, "also save latest.npz within an epoch after every this many batches "
                                        "since the last save; 0: off", ge=0)
    checkpoint_minutes: float = option(0.0, "also save latest.npz within an epoch once this many minutes have "
                                            "passed since the last save (checked after each batch); 0: off", ge=0)

    def validate(self) -> "TrainConfig":
        """Check every value against its declaration; returns ``self``.

        Raises
        ------
        ConfigError
            For the first value outside its allowed values or range, naming the key, the
            value and what was expected.
        """
        for opt in OPTIONS.values():
            try:
                opt.check(getattr(self, opt.name))
            except ConfigError as exc:
                if opt.name == "backend" and self.backend == _default_backend() != "numpy":
                    raise ConfigError(f"{exc} (the value comes from ${ENV_VAR})") from None
                raise
        if self.shards > 1 and self.backend not in CPU_BACKENDS:
            raise ConfigError(f"config key 'shards' has value {self.shards!r}; expected 1 with backend "
                              f"{self.backend!r}, which runs every operation on its device (threads over shards "
                              f"need a host backend: {', '.join(CPU_BACKENDS)})")
        if self.estimator == "bptt" and self.settle_tol > 0:
            raise ConfigError(f"config key 'settle_tol' has value {self.settle_tol!r}; expected 0 with estimator "
                              "'bptt', which differentiates exactly T1 steps (the implicit estimator gives the "
                              "gradient at the settled fixed point)")
        if self.asymmetry_limit > 0 and self.estimator != "symmetric":
            raise ConfigError(f"config key 'asymmetry_limit' has value {self.asymmetry_limit!r}; expected 0 with "
                              f"estimator {self.estimator!r}: the asymmetry (Eq. 4.9) compares the two nudged "
                              "phases of the symmetric estimator")
        return self

    @property
    def augment_options(self) -> dict:
        """Keyword arguments of :func:`pyeqprop.data.augment.augment` for this config."""
        return {"padding": self.augment_padding, "flip": self.augment_flip, "padding_mode": self.augment_padding_mode}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def settling(self) -> Settling:
        """How every phase settles (Eqs. 3.8, 3.13, 3.14)."""
        return Settling(self.schedule, self.settle_tol, self.check_every, self.nudged_phase)

    @property
    def eval_steps(self) -> int:
        return self.T_eval or self.T1


_NOUNS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          list: "a number or a list of numbers"}
_METAVARS = {bool: "BOOL", int: "INT", float: "NUM", str: "STR", list: "NUM[,NUM...]"}


@dataclass(frozen=True)
class Option:
    """One configuration key, as declared on :class:`TrainConfig` (see :func:`option`).

    Attributes
    ----------
    name : str
        The key; on the command line ``--`` followed by the name with ``_`` as ``-``.
    type : type
        ``bool``, ``int``, ``float``, ``str`` or ``list`` (a list of floats).
    default : object
        The default value.
    help : str
        The one-line help text.
    choices : tuple, Mapping, Imported or None
        The allowed values as declared; :attr:`allowed` resolves an :class:`Imported`.
    gt, ge, lt, le : float or None
        Bounds of a number (of each element of a list).
    """

    name: str
    type: type
    default: object
    help: str
    choices: object = None
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def metavar(self) -> str:
        return _METAVARS[self.type]

    @property
    def allowed(self):
        """The allowed values (the object their home module defines), or None for any value of the type."""
        return self.choices.get() if isinstance(self.choices, Imported) else self.choices

    @property
    def restriction(self) -> str | None:
        """What the value must be beyond its type ("one of a, b", "a number > 0", …), or None."""
        if self.choices is not None:
            return "one of " + ", ".join(str(v) for v in self.allowed)
        # each bound: (interval bracket, comparison, value)
        lower = ("(", ">", self.gt) if self.gt is not None else ("[", ">=", self.ge) if self.ge is not None else None
        upper = (")", "<", self.lt) if self.lt is not None else ("]", "<=", self.le) if self.le is not None else None
        if lower is None and upper is None:
            return None
        noun = "an integer" if self.type is int else "a number"
        if self.type is not int and upper is None:  # inf would pass a lower bound alone: say it must be finite
            noun = "a finite number"
        if lower and upper:
            text = f"{noun} in {lower[0]}{lower[2]:g}, {upper[2]:g}{upper[0]}"
        else:
            _, op, v = lower or upper
            text = f"{noun} {op} {v:g}"
        return text + " or a list of such numbers" if self.type is list else text

    @property
    def expected(self) -> str:
        """What a valid value is, as the error messages say it."""
        return self.restriction or _NOUNS[self.type]

    def describe(self) -> str:
        """The help text with the default and any allowed values or range (for ``--help`` and config.toml)."""
        shown = repr(self.default) if self.type is str else self.as_flag(self.default)
        rule = self.restriction
        return f"{self.help} (default {shown}" + (f"; {rule})" if rule else ")")

    def _in_range(self, v) -> bool:
        if self.type is not int and not math.isfinite(v):  # NaN and ±inf: no float option allows them
            return False
        return ((self.gt is None or v > self.gt) and (self.ge is None or v >= self.ge)
                and (self.lt is None or v < self.lt) and (self.le is None or v <= self.le))

    def check(self, value) -> None:
        """Raise :class:`ConfigError` unless ``value`` is allowed (the type is :meth:`coerce`'s concern)."""
        if self.choices is not None:
            try:
                ok = value in self.allowed
            except TypeError:  # an unhashable value tested against a mapping's keys
                ok = False
        elif self.type is list:
            ok = isinstance(value, (list, tuple)) and bool(value) and all(self._in_range(v) for v in value)
        elif self.type in (int, float):
            ok = self._in_range(value)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"config key {self.name!r} has value {value!r}; expected {self.expected}")

    def coerce(self, value):
        """``value`` (from TOML or a command-line string) as this option's type, or a :class:`ConfigError`."""
        def bad(expected):
            return ConfigError(f"config key {self.name!r} has value {value!r}; expected {expected}")

        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if self.type is bool:
            try:
                return parse_bool(value)
            except ConfigError:
                raise bad("true or false") from None
        if self.type is list:
            if is_number:
                return [float(value)]
            if isinstance(value, str):
                try:
                    return [float(v) for v in value.split(",") if v.strip()]
                except ValueError:
                    raise bad("a number or a comma list") from None
            if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                return [float(v) for v in value]
            raise bad("a number or a list of numbers")
        if self.type is int:
            if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str)
                                                                          and value.lstrip("-").isdigit())):
                raise bad("an integer")
            return int(value)
        if self.type is float:
            if isinstance(value, bool):
                raise bad("a number")
            try:
                return float(value)
            except (TypeError, ValueError):
                raise bad("a number") from None
        if isinstance(value, list):  # str: a TOML list such as kd_layers = [1, 3]
            value = ",".join(str(v) for v in value)
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise bad("a string")
        return str(value)

    def as_flag(self, value) -> str:
        """``value`` as it is typed after the flag (a list as a comma list)."""
        if self.type is bool:
            return "true" if value else "false"
        if self.type is list:
            return ",".join(str(v) for v in value)
        return str(value)

    def as_toml(self, value) -> str:
        """``value`` as a TOML literal that :meth:`coerce` reads back to an equal value."""
        if self.type is bool:
            return "true" if value else "false"
        if self.type is list:
            return "[" + ", ".join(repr(float(v)) for v in value) + "]"
        if self.type is float:
            return repr(float(value))
        if self.type is int:
            return repr(int(value))
        return _toml_string(str(value))


def parse_bool(text) -> bool:
    """A boolean written as on the command line or in TOML: true/false, 1/0, yes/no (any case).

    The one spelling of booleans for every subcommand: ``--flag`` alone is true (argparse's
    ``nargs="?", const=True``), ``--flag true`` and ``--flag false`` say it. Raises
    :class:`ConfigError` for anything else.
    """
    if isinstance(text, bool):
        return text
    if isinstance(text, str) and text.strip().lower() in _TRUE + _FALSE:
        return text.strip().lower() in _TRUE
    raise ConfigError(f"expected true or false, got {text!r}")


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def declarations(cls) -> Mapping[str, Option]:
    """The :class:`Option` of every field of the dataclass ``cls``, in field order (``TypeError`` for an
    undeclared field)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} must be declared with option(...)")
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = typing.get_origin(hints[f.name]) or hints[f.name]
        out[f.name] = Option(name=f.name, type=kind, default=default, **f.metadata)
    return MappingProxyType(out)


OPTIONS: Mapping[str, Option] = declarations(TrainConfig)
"""Every option of :class:`TrainConfig` by name, in declaration order."""


def _flatten(mapping, prefix=""):
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _flatten(value, prefix + key + ".")
        else:
            yield key, prefix + key, value


def config_from_mapping(mapping: dict, base: TrainConfig | None = None) -> TrainConfig:
    """Overlay ``mapping`` (possibly nested in tables) on ``base`` (defaults), validating each key.

    Keys may use ``-`` for ``_``. Values are coerced by :meth:`Option.coerce`: strings are
    accepted for every type (as command-line flags give them).
    """
    cfg = dataclasses.replace(base) if base is not None else TrainConfig()
    for key, full, value in _flatten(mapping):
        key = key.replace("-", "_")
        if key not in OPTIONS:
            raise ConfigError(f"unknown config key {full!r}; known keys: {', '.join(sorted(OPTIONS))}")
        setattr(cfg, key, OPTIONS[key].coerce(value))
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


_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def _toml_string(s: str) -> str:
    """A TOML basic string holding ``s``, in ASCII (other characters as \\uXXXX or \\UXXXXXXXX)."""
    out = []
    for ch in s:
        code = ord(ch)
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return '"' + "".join(out) + '"'


def dump_toml(cfg: TrainConfig) -> str:
    """The effective configuration as flat TOML (what the run folder's config.toml holds).

    One ``key = value`` line per option, in declaration order, under a comment with its
    help text, default and allowed values. Written as UTF-8 (the comments use SPEC.md's symbols).
    """
    lines = ["# pyeqprop train configuration; read back by --config FILE or --resume RUN"]
    for opt in OPTIONS.values():
        lines += ["", f"# {opt.describe()}", f"{opt.name} = {opt.as_toml(getattr(cfg, opt.name))}"]
    return "\n".join(lines) + "\n"
