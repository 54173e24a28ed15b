"""The model: architectures, layer objects, the CRNN's energy and the feed-forward teacher (SPEC.md §3, §7).

``model`` never imports :mod:`pyeqprop.learning` or anything above it: learning algorithms
use the CRNN through its public energy protocol (SPEC.md Eq. 3.12).
"""
from .arch import PRESETS, ArchError, Architecture, parse_arch, preset_spec
from .crnn import CRNN, Drive, Nudge
from .layers import ConvMap, DenseMap
from .params import ParamSpec
from .readout import READOUTS, MSEOutput, SoftmaxReadout
from .teacher import Teacher

__all__ = ["CRNN", "Nudge", "Drive", "Teacher", "ConvMap", "DenseMap", "ParamSpec", "READOUTS",
           "MSEOutput", "SoftmaxReadout", "parse_arch", "preset_spec", "PRESETS", "ArchError", "Architecture"]
