"""Learning algorithms on the CRNN's energy protocol: settling, EP and BPTT estimators, intermediate signals.

Everything here uses the network only through its public protocol (SPEC.md Eq. 3.12):
``init_state``, ``nudge``, ``drive``/``step``, ``dphi_dtheta`` and, for BPTT, the
frozen-argmax linear parts ``hessian_vector`` and ``dphi_dtheta_tangent``.
"""
from .bptt import BPTTResult, bptt, bptt_gradients
from .estimators import EP_ESTIMATORS, ESTIMATORS, Estimate, draw_sign, ep_estimate, ep_gradients, estimate
from .settle import Settled, predict, residual, settle
from .signals import SignalConfig, attach_signals

__all__ = ["settle", "Settled", "residual", "predict", "ESTIMATORS", "EP_ESTIMATORS", "Estimate", "estimate",
           "ep_estimate", "ep_gradients", "draw_sign", "bptt", "bptt_gradients", "BPTTResult", "SignalConfig",
           "attach_signals"]
