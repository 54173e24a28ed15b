"""The EP student of a training job: the CRNN a config describes, its intermediate signals and its rates."""
from __future__ import annotations

import math
import os

from ..backend import backend_name
from ..learning.signals import SignalConfig, attach_signals, standardise_targets
from ..model.arch import parse_arch
from ..model.crnn import CRNN
from ..model.layers import make_layers, param_specs
from ..model.readout import make_readout
from .config import ConfigError
from .optim import per_layer_lrs

__all__ = ["make_signal_config", "build_network", "build_student", "prepare_targets", "learning_rates",
           "memory_estimate", "check_memory", "STATE_COPIES", "PARAM_COPIES"]

PARAM_COPIES = 4
"""Parameter-sized arrays a training step holds: θ, the momentum buffer, the estimate and its scaled copy."""
STATE_COPIES = 9
"""State-sized arrays per sample a training step holds: three phases (free, ±β), each its state s, its drive u
and the bottom-up terms B_l (Eq. 3.7)."""


def make_signal_config(cfg) -> SignalConfig:
    """The intermediate signals (Eq. 6.1) a :class:`~pyeqprop.train.config.TrainConfig` asks for."""
    return SignalConfig(local_layers=cfg.local_layers, local_weight=cfg.local_weight, local_grid=cfg.local_grid,
                        local_loss=cfg.local_loss, kd_layers=cfg.kd_layers, kd_weight=cfg.kd_weight,
                        kd_normalisation=cfg.kd_normalisation, output_kd_weight=cfg.output_kd_weight,
                        temperature=cfg.temperature, init=cfg.signal_init)


def memory_estimate(cfg, input_shape, num_classes) -> dict:
    """Bytes a training step of ``cfg`` needs, from the architecture's shapes alone (nothing is allocated).

    Returns ``{"params": …, "states": …, "total": …}``: :data:`PARAM_COPIES` copies of the parameters
    (plus the float64 draw of the largest tensor at initialisation, Eq. 3.10) and :data:`STATE_COPIES`
    copies of the states s_1 … s_L of one batch of ``cfg.batch_size``. An estimate of the order of
    magnitude, for refusing a job that cannot fit before it starts.
    """
    arch = parse_arch(cfg.arch, input_shape, num_classes, cfg.readout)
    specs = param_specs(make_layers(arch.layers)) + make_readout(cfg.readout, arch, num_classes).param_specs()
    itemsize = 4 if cfg.dtype == "float32" else 8
    sizes = [math.prod(spec.shape) for spec in specs]
    params = PARAM_COPIES * itemsize * sum(sizes) + 8 * max(sizes, default=0)
    states = STATE_COPIES * itemsize * cfg.batch_size * sum(math.prod(shape) for shape in arch.state_shapes)
    return {"params": params, "states": states, "total": params + states}


def _memory_available(xp) -> int | None:
    """Total memory of the device ``xp`` computes on (the GPU's for CuPy, RAM otherwise); None if unknown."""
    try:
        if backend_name(xp) == "cupy":
            import cupy

            return int(cupy.cuda.Device().mem_info[1])
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ImportError, AttributeError, ValueError, OSError):
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError


def check_memory(cfg, input_shape, num_classes, xp) -> None:
    """Raise :class:`~pyeqprop.train.config.ConfigError` naming the sizes when :func:`memory_estimate`
    exceeds the device's total memory (a ``MemoryError`` deep inside the first allocation otherwise)."""
    need = memory_estimate(cfg, input_shape, num_classes)
    have = _memory_available(xp)
    if have is not None and need["total"] > have:
        raise ConfigError(f"arch {cfg.arch!r} needs about {_size(need['total'])} to train at batch size "
                          f"{cfg.batch_size} in {cfg.dtype} (parameters {_size(need['params'])}, states "
                          f"{_size(need['states'])}), more than the {_size(have)} of memory on this "
                          f"{'GPU' if backend_name(xp) == 'cupy' else 'machine'}; choose a smaller --arch or "
                          "--batch-size")


def build_network(cfg, input_shape, num_classes, xp) -> CRNN:
    """The bare CRNN of ``cfg`` (layers and readout, Eq. 3.10), before any intermediate signal is attached.

    Checked first: that it fits in memory (:func:`check_memory`), that ``weight_scale`` is 1 unless the
    init is uniform (Eq. 3.16), and that ``cfg.lr`` has one rate or one per layer (Eq. 8.3), so a job
    fails before its teacher trains, not after.
    """
    check_memory(cfg, input_shape, num_classes, xp)
    if cfg.init != "uniform" and cfg.weight_scale != 1.0:
        raise ConfigError(f"config key 'weight_scale' has value {cfg.weight_scale!r}; expected 1 with init "
                          f"{cfg.init!r}, which is scaled by init_radius (Eq. 3.16)")
    net = CRNN(cfg.arch, input_shape, num_classes=num_classes, readout=cfg.readout, activation=cfg.activation,
               dtype=cfg.dtype, xp=xp, seed=cfg.seed, weight_scale=cfg.weight_scale, init=cfg.init,
               radius=None if cfg.init == "uniform" else cfg.init_radius, feedback=cfg.feedback)
    try:
        per_layer_lrs(net.params, cfg.lr, layer_of=net.param_owners())
    except ValueError as exc:
        raise ConfigError(f"config key 'lr' has value {cfg.lr!r}: {exc}") from None
    return net


def build_student(cfg, input_shape, num_classes, xp, teacher=None) -> CRNN:
    """The CRNN of ``cfg`` with its local heads and distillation maps (Eq. 6.1); KD needs ``teacher``."""
    net = build_network(cfg, input_shape, num_classes, xp)
    attach_signals(net, make_signal_config(cfg), teacher)
    return net


def prepare_targets(net, cfg, x_train) -> None:
    """The distillation targets ``cfg`` asks for: with ``kd_targets = "standardised"``, each map's
    per-channel statistics over the training split ``x_train`` (Eq. 6.9); raw targets need nothing."""
    if cfg.kd_targets == "standardised":
        standardise_targets(net, x_train)


def learning_rates(net, cfg) -> dict[str, float]:
    """Per-parameter base rates (Eq. 8.3): one for all, or one per layer (neuron layers, then the readout).

    A local head or distillation map takes the rate of the layer it reads.
    """
    return per_layer_lrs(net.params, cfg.lr, layer_of=net.param_owners())
