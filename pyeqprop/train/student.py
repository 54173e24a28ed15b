"""The EP student of a training job: the CRNN a config describes, its intermediate signals and its rates."""
from __future__ import annotations

from ..learning.signals import SignalConfig, attach_signals
from ..model.crnn import CRNN
from .optim import per_layer_lrs

__all__ = ["make_signal_config", "build_network", "build_student", "learning_rates"]


def make_signal_config(cfg) -> SignalConfig:
    """The intermediate signals (Eq. 6.1) a :class:`~pyeqprop.train.config.TrainConfig` asks for."""
    return SignalConfig(local_layers=cfg.local_layers, local_weight=cfg.local_weight, local_grid=cfg.local_grid,
                        local_loss=cfg.local_loss, kd_layers=cfg.kd_layers, kd_weight=cfg.kd_weight,
                        kd_normalisation=cfg.kd_normalisation, output_kd_weight=cfg.output_kd_weight,
                        temperature=cfg.temperature, init=cfg.signal_init)


def build_network(cfg, input_shape, num_classes, xp) -> CRNN:
    """The bare CRNN of ``cfg`` (layers and readout, Eq. 3.10), before any intermediate signal is attached."""
    return CRNN(cfg.arch, input_shape, num_classes=num_classes, readout=cfg.readout, activation=cfg.activation,
                dtype=cfg.dtype, xp=xp, seed=cfg.seed, weight_scale=cfg.weight_scale)


def build_student(cfg, input_shape, num_classes, xp, teacher=None) -> CRNN:
    """The CRNN of ``cfg`` with its local heads and distillation maps (Eq. 6.1); KD needs ``teacher``."""
    net = build_network(cfg, input_shape, num_classes, xp)
    attach_signals(net, make_signal_config(cfg), teacher)
    return net


def learning_rates(net, cfg) -> dict[str, float]:
    """Per-parameter base rates (Eq. 8.3): one for all, or one per layer (neuron layers, then the readout).

    A local head or distillation map takes the rate of the layer it reads.
    """
    return per_layer_lrs(net.params, cfg.lr, layer_of=net.param_owners())
