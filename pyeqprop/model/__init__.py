"""The CRNN model, its dynamics, EP estimators and BPTT (SPEC.md §3-5)."""
from .arch import PRESETS, ArchError, Architecture, parse_arch, preset_spec
from .bptt import BPTTResult, bptt, bptt_gradients
from .crnn import CRNN
from .ep import ESTIMATORS, EPResult, ep_estimate, ep_gradients
from .settle import Settled, settle
from .teacher import Teacher

__all__ = ["CRNN", "settle", "Settled", "ep_gradients", "ep_estimate", "EPResult", "ESTIMATORS",
           "bptt", "bptt_gradients", "BPTTResult", "Teacher", "parse_arch", "preset_spec", "PRESETS", "ArchError",
           "Architecture"]
