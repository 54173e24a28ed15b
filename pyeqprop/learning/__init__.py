"""Learning algorithms on the CRNN's energy protocol: settling, EP and BPTT estimators, intermediate signals.

Everything here uses the network only through its public protocol (SPEC.md Eq. 3.12):
``init_state``, ``nudge``, ``drive``/``step``/``update``, ``dphi_dtheta`` and, for BPTT and the
equilibrium gradient, the frozen-argmax linear parts ``hessian_vector`` and ``dphi_dtheta_tangent``.
"""
from .bptt import BPTTResult, bptt, bptt_gradients
from .estimators import EP_ESTIMATORS, ESTIMATORS, Estimate, draw_sign, ep_estimate, ep_gradients, estimate
from .implicit import equilibrium_gradient
from .lyapunov import lyapunov
from .settle import SCHEDULES, Settled, Settling, predict, residual, settle
from .signals import SignalConfig, attach_signals

__all__ = ["settle", "Settled", "Settling", "SCHEDULES", "residual", "predict", "equilibrium_gradient", "lyapunov",
           "ESTIMATORS", "EP_ESTIMATORS", "Estimate", "estimate", "ep_estimate", "ep_gradients", "draw_sign", "bptt",
           "bptt_gradients", "BPTTResult", "SignalConfig", "attach_signals"]
