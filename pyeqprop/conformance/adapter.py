"""The adapter protocol a port implements, pyeqprop's own adapter, and the conformance runner.

An *adapter* is any object with some of the methods below. Each takes and returns NumPy
arrays (float64 for real values, int64 for labels and pooling indices); pairs such as
``stride`` arrive as tuples of two ints, ``spec`` as a dict, ``params`` as a dict of arrays
keyed by PyTorch names. Methods are called positionally, in the order shown. A method that
is absent, or raises ``NotImplementedError``, makes its cases "skip (not implemented)".
A method with several outputs returns them as a tuple in the order shown (or a dict keyed
by those names).

Primitives (SPEC.md §2; shapes: n batch, c/o channels, NCHW / OIHW)::

    conv2d(x, w, b, stride, padding) -> y                    b may be None          (2.1)
    conv2d_transpose(g, w, stride, padding, output_size) -> z                       (2.3)
    conv2d_weight_grad(x, g, kernel_size, stride, padding) -> dw                    (2.4)
    max_pool2d(x, kernel_size, stride) -> (y, indices)        flat u·w + v, first max (2.6)
    max_unpool2d(y, indices, kernel_size, stride, output_size) -> z   scatter-ADD   (2.7)
    max_pool2d_select(x, indices, kernel_size, stride) -> y                         (2.7a)
    avg_pool2d(x, kernel_size, stride) -> y                                         (2.8)
    avg_unpool2d(y, kernel_size, stride, output_size) -> z                          (2.8)
    linear(x, w, b) -> y;  linear_transpose(g, w) -> z;  linear_weight_grad(x, g) -> dw   (2.11)
    hard_sigmoid(u), hard_sigmoid_grad(u), half_hard_sigmoid(u), half_hard_sigmoid_grad(u) -> y
                                                   ρ' is 0 at the kinks themselves  (2.9, 2.10)

Model level (SPEC.md §3-5). ``spec`` holds ``arch`` (the spec string), ``input_shape``,
``num_classes``, ``readout`` ("mse" | "softmax"), ``activation``, and the resolved
``layers`` (name, kind, channels, kernel, padding, pool, sizes), ``readout_layer`` and
``state_shapes``, so a port need not parse the spec string. ``state`` is a list of the
layer states s_1 … s_L; ``y`` int64 labels; gradients are dicts keyed like ``params``::

    crnn_phi(spec, params, x, state, y, beta) -> phi (n,)                Φ^β     (3.2, 3.6)
    crnn_step(spec, params, x, state, y, beta) -> state                  one step (3.7, 3.8)
    crnn_delta_step(spec, params, x, state, delta, y, beta) -> delta     one step in δ = s − s⁰ (4.8)
        state: s⁰; returns ρ(u^β(s⁰ + δ)) − ρ(u(s⁰)) (u(s⁰) the free drive, β = 0), every max pool
        at its own argmax (at s⁰ + δ in the first term, at s⁰ in the second)
    crnn_dphi_dtheta(spec, params, x, state, y, beta) -> grads           Σ_batch ∂Φ^β/∂θ (3.9)
    crnn_settle(spec, params, x, T) -> state                             T free steps from 0 (3.8)
    ep_gradients(spec, params, x, y, beta, T1, T2, estimator, sign) -> grads      (4.1-4.3)
        estimator "one-sided" | "symmetric" | "random-sign"; sign is +1 or −1 for
        "random-sign" (the drawn sign, given explicitly) and None otherwise
    bptt_gradients(spec, params, x, y, T) -> grads                                 (5.1-5.4)

Costs (SPEC.md §6; values per sample (n,), state gradients per sample, parameter gradients
summed over the batch)::

    local_error_cost(s, y, weight, bias, grid, loss) -> (value, grad_s, grad_weight, grad_bias)  (6.2-6.3)
    distillation_cost(s, t, weight, bias, normalisation) -> (value, grad_s, grad_weight, grad_bias) (6.4-6.5)
        t: the raw teacher features, average-pooled inside to the student's size when larger
    output_distillation_cost(z_s, z_t, temperature) -> (value, grad_z)                            (6.6)

Teacher (SPEC.md §7)::

    teacher_loss_and_grads(spec, params, x, y) -> (loss, grads)          batch-mean CE (7.1-7.3)

:data:`PYEQPROP` implements every method with pyeqprop itself. :func:`run_conformance`
runs every case of a vectors directory against an adapter; ``pyeqprop conformance
--adapter package.module:object`` does the same from the command line.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .format import default_vectors_dir, load_case, load_manifest

__all__ = ["PROTOCOL", "PyeqpropAdapter", "PYEQPROP", "Result", "run_conformance", "run_conformance_cli",
           "load_adapter", "format_result", "DEFAULT_ADAPTER"]

DEFAULT_ADAPTER = "pyeqprop.conformance.adapter:PYEQPROP"

# method -> (positional argument names, outputs as (name, kind)); kind: array | list | dict | scalar
PROTOCOL = {
    "conv2d": (("x", "w", "b", "stride", "padding"), (("y", "array"),)),
    "conv2d_transpose": (("g", "w", "stride", "padding", "output_size"), (("z", "array"),)),
    "conv2d_weight_grad": (("x", "g", "kernel_size", "stride", "padding"), (("dw", "array"),)),
    "max_pool2d": (("x", "kernel_size", "stride"), (("y", "array"), ("indices", "array"))),
    "max_unpool2d": (("y", "indices", "kernel_size", "stride", "output_size"), (("z", "array"),)),
    "max_pool2d_select": (("x", "indices", "kernel_size", "stride"), (("y", "array"),)),
    "avg_pool2d": (("x", "kernel_size", "stride"), (("y", "array"),)),
    "avg_unpool2d": (("y", "kernel_size", "stride", "output_size"), (("z", "array"),)),
    "linear": (("x", "w", "b"), (("y", "array"),)),
    "linear_transpose": (("g", "w"), (("z", "array"),)),
    "linear_weight_grad": (("x", "g"), (("dw", "array"),)),
    "hard_sigmoid": (("u",), (("y", "array"),)),
    "hard_sigmoid_grad": (("u",), (("y", "array"),)),
    "half_hard_sigmoid": (("u",), (("y", "array"),)),
    "half_hard_sigmoid_grad": (("u",), (("y", "array"),)),
    "crnn_phi": (("spec", "params", "x", "state", "y", "beta"), (("phi", "array"),)),
    "crnn_step": (("spec", "params", "x", "state", "y", "beta"), (("state", "list"),)),
    "crnn_delta_step": (("spec", "params", "x", "state", "delta", "y", "beta"), (("delta", "list"),)),
    "crnn_dphi_dtheta": (("spec", "params", "x", "state", "y", "beta"), (("grads", "dict"),)),
    "crnn_settle": (("spec", "params", "x", "T"), (("state", "list"),)),
    "ep_gradients": (("spec", "params", "x", "y", "beta", "T1", "T2", "estimator", "sign"), (("grads", "dict"),)),
    "bptt_gradients": (("spec", "params", "x", "y", "T"), (("grads", "dict"),)),
    "local_error_cost": (("s", "y", "weight", "bias", "grid", "loss"),
                         (("value", "array"), ("grad_s", "array"), ("grad_weight", "array"), ("grad_bias", "array"))),
    "distillation_cost": (("s", "t", "weight", "bias", "normalisation"),
                          (("value", "array"), ("grad_s", "array"), ("grad_weight", "array"), ("grad_bias", "array"))),
    "output_distillation_cost": (("z_s", "z_t", "temperature"), (("value", "array"), ("grad_z", "array"))),
    "teacher_loss_and_grads": (("spec", "params", "x", "y"), (("loss", "scalar"), ("grads", "dict"))),
}


# =========================================================================== pyeqprop's own adapter
class _FixedFeatures:
    """A teacher-feature provider returning stored features / logits (``TeacherFeatures`` protocol)."""

    def __init__(self, feats=None, logits=None):
        self.value = (feats, logits)

    def get(self, x):
        return self.value


class PyeqpropAdapter:
    """Every protocol method, computed by pyeqprop on NumPy in float64 (the reference)."""

    name = "pyeqprop"

    # ---------------------------------------------------------------- primitives
    def conv2d(self, x, w, b, stride, padding):
        from .. import ops
        return ops.conv2d(x, w, b, stride=stride, padding=padding)

    def conv2d_transpose(self, g, w, stride, padding, output_size):
        from .. import ops
        return ops.conv2d_transpose(g, w, stride=stride, padding=padding, output_size=output_size)

    def conv2d_weight_grad(self, x, g, kernel_size, stride, padding):
        from .. import ops
        return ops.conv2d_weight_grad(x, g, kernel_size=kernel_size, stride=stride, padding=padding)

    def max_pool2d(self, x, kernel_size, stride):
        from .. import ops
        return ops.max_pool2d(x, kernel_size=kernel_size, stride=stride)

    def max_unpool2d(self, y, indices, kernel_size, stride, output_size):
        from .. import ops
        return ops.max_unpool2d(y, indices, kernel_size=kernel_size, stride=stride, output_size=output_size)

    def max_pool2d_select(self, x, indices, kernel_size, stride):
        from .. import ops
        return ops.max_pool2d_select(x, indices, kernel_size=kernel_size, stride=stride)

    def avg_pool2d(self, x, kernel_size, stride):
        from .. import ops
        return ops.avg_pool2d(x, kernel_size=kernel_size, stride=stride)

    def avg_unpool2d(self, y, kernel_size, stride, output_size):
        from .. import ops
        return ops.avg_unpool2d(y, kernel_size=kernel_size, stride=stride, output_size=output_size)

    def linear(self, x, w, b):
        from .. import ops
        return ops.linear(x, w, b)

    def linear_transpose(self, g, w):
        from .. import ops
        return ops.linear_transpose(g, w)

    def linear_weight_grad(self, x, g):
        from .. import ops
        return ops.linear_weight_grad(x, g)

    def hard_sigmoid(self, u):
        from .. import ops
        return ops.hard_sigmoid(u)

    def hard_sigmoid_grad(self, u):
        from .. import ops
        return ops.hard_sigmoid_grad(u)

    def half_hard_sigmoid(self, u):
        from .. import ops
        return ops.half_hard_sigmoid(u)

    def half_hard_sigmoid_grad(self, u):
        from .. import ops
        return ops.half_hard_sigmoid_grad(u)

    # ---------------------------------------------------------------- the CRNN
    @staticmethod
    def _net(spec, params):
        from ..model.crnn import CRNN

        net = CRNN(spec["arch"], tuple(spec["input_shape"]), num_classes=spec["num_classes"], readout=spec["readout"],
                   activation=spec["activation"], dtype="float64", xp="numpy")
        if set(params) != set(net.params):
            raise ValueError(f"parameters {sorted(params)} do not match the network's {sorted(net.params)}")
        for k in net.params:
            net.params[k] = np.asarray(params[k], dtype=np.float64)
        return net

    def crnn_phi(self, spec, params, x, state, y, beta):
        net = self._net(spec, params)
        return net.phi(x, list(state), net.nudge(x, y, beta))

    def crnn_step(self, spec, params, x, state, y, beta):
        net = self._net(spec, params)
        return net.step(x, list(state), net.nudge(x, y, beta))

    def crnn_delta_step(self, spec, params, x, state, delta, y, beta):
        net = self._net(spec, params)
        nudge = net.nudge(x, y, beta)
        return net.delta_update(x, net.free_base(x, list(state), nudge), list(delta), nudge)[0]

    def crnn_dphi_dtheta(self, spec, params, x, state, y, beta):
        net = self._net(spec, params)
        return net.dphi_dtheta(x, list(state), net.nudge(x, y, beta))

    def crnn_settle(self, spec, params, x, T):
        from ..learning.settle import settle
        return settle(self._net(spec, params), x, T).state

    def ep_gradients(self, spec, params, x, y, beta, T1, T2, estimator, sign):
        from ..learning.estimators import ep_gradients
        return ep_gradients(self._net(spec, params), x, y, beta=beta, T1=T1, T2=T2, estimator=estimator,
                            sign=None if sign is None else int(sign))

    def bptt_gradients(self, spec, params, x, y, T):
        from ..learning.bptt import bptt_gradients
        return bptt_gradients(self._net(spec, params), x, y, T=T)

    # ---------------------------------------------------------------- costs
    def local_error_cost(self, s, y, weight, bias, grid, loss):
        from ..learning.signals import LocalErrorHead
        head = LocalErrorHead(0, s.shape[1:], weight.shape[0], grid=grid, loss=loss, name="head")
        params = {"head.weight": weight, "head.bias": bias}
        ctx = head.prepare(params, s, y)
        g = head.param_grads(params, [s], ctx)
        return (head.value(params, [s], ctx), head.state_grads(params, [s], ctx)[0], g["head.weight"],
                g["head.bias"])

    def distillation_cost(self, s, t, weight, bias, normalisation):
        from ..learning.signals import DistillationMap
        term = DistillationMap(0, s.shape[1:], t.shape[1:], _FixedFeatures([t]), normalisation=normalisation,
                               name="kd")
        params = {"kd.weight": weight, "kd.bias": bias}
        ctx = term.prepare(params, None, None)
        g = term.param_grads(params, [s], ctx)
        return term.value(params, [s], ctx), term.state_grads(params, [s], ctx)[0], g["kd.weight"], g["kd.bias"]

    def output_distillation_cost(self, z_s, z_t, temperature):
        from ..learning.signals import OutputDistillation
        from ..model.readout import MSEOutput
        term = OutputDistillation(MSEOutput(0, z_s.shape[1]), _FixedFeatures(None, z_t), temperature=temperature)
        ctx = term.prepare({}, None, None)
        return term.value({}, [z_s], ctx), term.state_grads({}, [z_s], ctx)[0]

    # ---------------------------------------------------------------- teacher
    def teacher_loss_and_grads(self, spec, params, x, y):
        from ..model.teacher import Teacher
        t = Teacher(spec["arch"], tuple(spec["input_shape"]), num_classes=spec["num_classes"],
                    activation=spec["activation"], dtype="float64", xp="numpy")
        if set(params) != set(t.params):
            raise ValueError(f"parameters {sorted(params)} do not match the teacher's {sorted(t.params)}")
        for k in t.params:
            t.params[k] = np.asarray(params[k], dtype=np.float64)
        return t.loss_and_grads(x, y)


PYEQPROP = PyeqpropAdapter()
"""pyeqprop itself as an adapter: the default of ``pyeqprop conformance``."""


# =========================================================================== the runner
@dataclass
class Result:
    """The outcome of one case. ``status``: "pass", "fail" or "skip".

    ``max_abs_error`` / ``max_rel_error`` / ``atol`` describe the output with the largest
    error relative to its tolerance (``worst_output``); the relative error is normwise,
    max|actual − expected| / max|expected|.
    """

    case: str
    method: str
    status: str
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    atol: float | None = None
    worst_output: str | None = None
    message: str = ""


def _resolve(ref, arrays, args):
    kind, _, name = ref.partition("/")
    if kind == "args":
        v = args[name]
        if isinstance(v, list) and all(isinstance(i, int) for i in v):
            return tuple(v)
        return v
    if kind == "params":
        pre = "params/"
        if name:
            return arrays[pre + name].copy()
        return {k[len(pre):]: v.copy() for k, v in arrays.items() if k.startswith(pre)}
    if kind == "inputs":
        key = f"inputs/{name}"
        if key in arrays:
            return arrays[key].copy()
        items = sorted(((int(k.rsplit("/", 1)[1]), v) for k, v in arrays.items() if k.startswith(key + "/")))
        if not items:
            raise KeyError(f"no stored input {name!r}")
        return [v.copy() for _, v in items]
    raise KeyError(f"bad reference {ref!r}")


def _normalise_outputs(method, ret):
    """The adapter's return value as {flattened output key: array}."""
    outs = PROTOCOL[method][1]
    if len(outs) == 1:
        parts = [ret]
    elif isinstance(ret, dict) and set(ret) == {o for o, _ in outs}:
        parts = [ret[o] for o, _ in outs]
    else:
        parts = list(ret)
        if len(parts) != len(outs):
            raise ValueError(f"{method} must return {len(outs)} outputs {[o for o, _ in outs]}, got {len(parts)}")
    flat = {}
    for (name, kind), v in zip(outs, parts):
        if kind == "list":
            for i, a in enumerate(v):
                flat[f"{name}/{i}"] = a
        elif kind == "dict":
            for k, a in dict(v).items():
                flat[f"{name}/{k}"] = a
        else:
            flat[name] = v
    return flat


def _compare(key, actual, expected, tol):
    """(abs error, rel error, message or '') of one output."""
    a = np.asarray(actual)
    if a.shape != expected.shape:
        return math.inf, math.inf, f"{key}: shape {a.shape}, expected {expected.shape}"
    if expected.dtype.kind in "iu":
        if a.dtype.kind not in "iu":
            return math.inf, math.inf, f"{key}: dtype {a.dtype}, expected integers"
        diff = np.abs(a.astype(np.int64) - expected)
        bad = int(np.count_nonzero(diff))
        if bad == 0:
            return 0.0, 0.0, ""
        err = float(diff.max())
        return err, err / max(float(np.max(np.abs(expected))), 1.0), f"{key}: {bad} of {a.size} entries differ"
    if a.dtype != np.float64:
        return math.inf, math.inf, f"{key}: dtype {a.dtype}, expected float64"
    if not np.all(np.isfinite(a)):
        return math.inf, math.inf, f"{key}: non-finite values"
    err = float(np.max(np.abs(a - expected))) if a.size else 0.0
    scale = float(np.max(np.abs(expected))) if a.size else 0.0
    rel = err / scale if scale > 0 else (0.0 if err == 0 else math.inf)
    msg = "" if err <= tol["atol"] else f"{key}: max|err| {err:.3e} > atol {tol['atol']:.3e}"
    return err, rel, msg


def run_case(adapter, name, entry, vectors_dir) -> Result:
    """Run one case of a manifest against ``adapter``."""
    method = entry["method"]
    fn = getattr(adapter, method, None)
    if fn is None:
        return Result(name, method, "skip", message=f"not implemented: {method}")
    arrays = load_case(vectors_dir, entry)
    try:
        call = [_resolve(r, arrays, entry["args"]) for r in entry["call"]]
        ret = fn(*call)
    except NotImplementedError as exc:
        return Result(name, method, "skip", message=f"not implemented: {method}" + (f" ({exc})" if str(exc) else ""))
    except Exception as exc:  # a port's error is a failure of that case, reported, not a crash of the run
        return Result(name, method, "fail", message=f"raised {type(exc).__name__}: {exc}")
    try:
        got = _normalise_outputs(method, ret)
    except Exception as exc:
        return Result(name, method, "fail", message=f"bad return value: {exc}")
    expected = {k[len("expected/"):]: v for k, v in arrays.items() if k.startswith("expected/")}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        return Result(name, method, "fail", message=f"outputs missing {missing}, unexpected {extra}")
    worst, msgs = None, []
    for key in sorted(expected):
        tol = entry["tolerance"][key]
        err, rel, msg = _compare(key, got[key], expected[key], tol)
        if msg:
            msgs.append(msg)
        ratio = math.inf if msg and not err <= tol["atol"] else (err / tol["atol"] if tol["atol"] > 0 else
                                                                 (0.0 if err == 0 else math.inf))
        if worst is None or ratio > worst[0] or (ratio == worst[0] and err > worst[1]):
            worst = (ratio, err, rel, tol["atol"], key)
    _, err, rel, atol, key = worst
    return Result(name, method, "fail" if msgs else "pass", err, rel, atol, key, "; ".join(msgs))


def run_conformance(adapter, vectors_dir=None, *, only=None) -> list:
    """Run every case (or those named in ``only``) of ``vectors_dir`` against ``adapter``.

    Returns a list of :class:`Result`, in manifest order (sorted by case name).
    """
    vectors_dir = Path(vectors_dir) if vectors_dir is not None else default_vectors_dir()
    manifest = load_manifest(vectors_dir)
    results = []
    for name in sorted(manifest["cases"]):
        if only is not None and name not in only:
            continue
        results.append(run_case(adapter, name, manifest["cases"][name], vectors_dir))
    return results


def format_result(r: Result) -> str:
    """One line: status, case, worst abs / rel error and the tolerance of that output."""
    if r.status == "skip":
        return f"SKIP  {r.case:<40} skipped ({r.message})"
    head = f"{r.status.upper():<5} {r.case:<40}"
    if r.max_abs_error is None or (r.status == "fail" and r.worst_output is None):
        return f"{head} {r.message}"
    line = f"{head} max|err| {r.max_abs_error:.2e}  rel {r.max_rel_error:.2e}  tol {r.atol:.2e}  ({r.worst_output})"
    return line + (f"  {r.message}" if r.message else "")


def load_adapter(spec: str | None):
    """The adapter named ``package.module:object`` (an instance, or a class instantiated without arguments)."""
    spec = spec or DEFAULT_ADAPTER
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"--adapter must look like package.module:object, got {spec!r}")
    module = importlib.import_module(mod_name)
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {mod_name!r} has no attribute {attr!r}") from None
    return obj() if isinstance(obj, type) else obj


def run_conformance_cli(ns) -> int:
    """``pyeqprop conformance [--adapter MODULE:OBJECT] [--vectors DIR]``: one line per case; exit 1 on any failure."""
    adapter = load_adapter(getattr(ns, "adapter", None))
    vectors = getattr(ns, "vectors", None)
    results = run_conformance(adapter, vectors)
    for r in results:
        print(format_result(r))
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "skip")}
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped "
          f"({len(results)} cases, vectors {Path(vectors) if vectors else default_vectors_dir()})")
    if counts["pass"] == 0 and counts["fail"] == 0:
        print("warning: the adapter implements none of the protocol's methods")
    return 1 if counts["fail"] else 0
