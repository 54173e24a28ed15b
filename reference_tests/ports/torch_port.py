"""A worked example port: the conformance protocol implemented with PyTorch, independently of pyeqprop.

Nothing here imports pyeqprop. It is written from SPEC.md alone: primitives through
``torch.nn.functional``; the CRNN's Φ (Eq. 3.2) built from torch ops, with ∂Φ^β/∂s and
∂Φ^β/∂θ taken by ``torch.autograd.grad`` (where pyeqprop derives them by hand); EP
(Eqs. 4.1-4.3) on top of those; BPTT (Eqs. 5.1-5.4) by autograd through the unrolled
dynamics; the costs of §6 and the teacher of §7 by autograd.

Run the vectors through it::

    PYTHONPATH=reference_tests/ports pyeqprop conformance --adapter torch_port:ADAPTER

(The tensors are tiny; with ``OMP_NUM_THREADS=1`` or ``torch.set_num_threads(1)`` the run takes
under a second instead of many seconds of thread contention.)

Where a port needs care (each is a case in the vectors):

* ``max_unpool2d`` must scatter-*add*: ``F.max_unpool2d`` *assigns*, so with overlapping
  windows (stride < kernel) two windows with the same argmax keep one value instead of
  their sum. Here: ``scatter_add_`` on the flattened (h·w) planes.
* Pooling indices are flat ``u·w + v`` positions in each (n, c) plane, first maximum on
  ties: exactly what ``F.max_pool2d(..., return_indices=True)`` returns on CPU.
* ``conv2d_transpose`` takes the forward input size explicitly; PyTorch needs it as
  ``output_padding = h − ((h' − 1)·s − 2p + k)`` (0 ≤ output_padding < s).
* ρ' is 0 at the kinks (SPEC.md 2.9-2.10); the autograd of ``torch.clamp`` is 1 there, so
  ``hard_sigmoid_grad`` is written as an explicit mask. (BPTT through ``clamp`` is still
  right here: no pre-activation of the vectors lies at a kink.)
* The weight gradient ``torch.nn.grad.conv2d_weight`` drops the input rows a strided
  convolution never reads, as Eq. 2.4 does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["TorchPort", "ADAPTER"]

DT = torch.float64


def _t(a):
    """NumPy -> torch (float64 for real arrays, int64 for integers)."""
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        return torch.from_numpy(a.astype(np.int64))
    return torch.from_numpy(np.array(a, dtype=np.float64))


def _n(t):
    """torch -> NumPy."""
    return t.detach().cpu().numpy()


def _largest_divisor_at_most(n, g):
    return max(d for d in range(1, min(n, g) + 1) if n % d == 0)


class _Net:
    """A CRNN (SPEC.md §3) rebuilt from the manifest's resolved layers, with Φ in torch ops."""

    def __init__(self, spec, params):
        self.spec = spec
        self.layers = spec["layers"]
        self.readout = spec["readout"]
        self.K = spec["num_classes"]
        self.names = list(params)
        self.P = {k: _t(v) for k, v in params.items()}
        self.half = spec["activation"] == "half_hard_sigmoid"

    def rho(self, u):
        return torch.clamp(0.5 * u if self.half else u, 0.0, 1.0)

    def bottom_up(self, l, a, P):
        """B_l(a) (Eq. 3.1)."""
        ly = self.layers[l]
        W, b = P[f"{ly['name']}.weight"], P[f"{ly['name']}.bias"]
        if ly["kind"] == "conv":
            z = F.conv2d(a, W, b, padding=ly["padding"])
            if ly["pool"] == "max":
                return F.max_pool2d(z, 2, 2)
            if ly["pool"] == "avg":
                return F.avg_pool2d(z, 2, 2)
            return z
        return F.linear(a.flatten(1), W, b)

    def phi(self, x, s, P):
        """Φ(x, s; θ) per sample (Eq. 3.2)."""
        total = 0.0
        for l in range(len(self.layers)):
            below = x if l == 0 else s[l - 1]
            total = total + (self.bottom_up(l, below, P) * s[l]).flatten(1).sum(1)
        return total

    def cost(self, s, y, P):
        """C per sample: ½‖s_L − onehot(y)‖² (Eq. 3.3) or cross-entropy of the softmax readout (Eq. 3.4)."""
        if self.readout == "mse":
            return 0.5 * ((s[-1] - F.one_hot(y, self.K).to(DT)) ** 2).sum(1)
        ro = self.spec["readout_layer"]["name"]
        z = F.linear(s[-1].flatten(1), P[f"{ro}.weight"], P[f"{ro}.bias"])
        return F.cross_entropy(z, y, reduction="none")

    def phi_beta(self, x, s, y, beta, P):
        """Φ^β = Φ − βC (Eq. 3.6)."""
        out = self.phi(x, s, P)
        return out - beta * self.cost(s, y, P) if beta != 0.0 else out

    def dphi_ds(self, x, s, y, beta, P, create_graph=False):
        s = [si if si.requires_grad else si.detach().requires_grad_(True) for si in s]
        return torch.autograd.grad(self.phi_beta(x, s, y, beta, P).sum(), s, create_graph=create_graph)

    def step(self, x, s, y, beta):
        """s ← ρ(∂Φ^β/∂s) (Eqs. 3.7-3.8)."""
        return [self.rho(u).detach() for u in self.dphi_ds(x, s, y, beta, self.P)]

    def dphi_dtheta(self, x, s, y, beta):
        """Σ_batch ∂Φ^β/∂θ, zeros for parameters Φ^β does not depend on (Eq. 3.9)."""
        P = {k: v.clone().requires_grad_(True) for k, v in self.P.items()}
        s = [si.detach() for si in s]
        g = torch.autograd.grad(self.phi_beta(x, s, y, beta, P).sum(), [P[k] for k in self.names], allow_unused=True)
        return {k: (torch.zeros_like(self.P[k]) if gk is None else gk) for k, gk in zip(self.names, g)}

    def zeros(self, n):
        return [torch.zeros((n, *shape), dtype=DT) for shape in self.spec["state_shapes"]]

    def settle(self, x, T, y=None, beta=0.0, s=None):
        s = self.zeros(x.shape[0]) if s is None else s
        for _ in range(int(T)):
            s = self.step(x, s, y, beta)
        return s


class TorchPort:
    """The adapter protocol of pyeqprop.conformance, in PyTorch (float64, CPU)."""

    name = "torch"

    # ------------------------------------------------------------------ primitives
    def conv2d(self, x, w, b, stride, padding):
        return _n(F.conv2d(_t(x), _t(w), None if b is None else _t(b), stride=stride, padding=padding))

    def conv2d_transpose(self, g, w, stride, padding, output_size):
        g, w = _t(g), _t(w)
        k = w.shape[2:]
        op = [output_size[i] - ((g.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + k[i]) for i in range(2)]
        return _n(F.conv_transpose2d(g, w, stride=stride, padding=padding, output_padding=op))

    def conv2d_weight_grad(self, x, g, kernel_size, stride, padding):
        x, g = _t(x), _t(g)
        shape = (g.shape[1], x.shape[1], *kernel_size)
        return _n(torch.nn.grad.conv2d_weight(x, shape, g, stride=stride, padding=padding))

    def max_pool2d(self, x, kernel_size, stride):
        y, idx = F.max_pool2d(_t(x), kernel_size, stride, return_indices=True)
        return _n(y), _n(idx).astype(np.int64)

    def max_unpool2d(self, y, indices, kernel_size, stride, output_size):
        y, idx = _t(y), _t(indices)
        n, c = y.shape[:2]
        z = torch.zeros((n, c, output_size[0] * output_size[1]), dtype=DT)
        z.scatter_add_(2, idx.flatten(2), y.flatten(2))  # not F.max_unpool2d: shared indices must add up
        return _n(z.view(n, c, *output_size))

    def max_pool2d_select(self, x, indices, kernel_size, stride):
        x, idx = _t(x), _t(indices)
        return _n(torch.gather(x.flatten(2), 2, idx.flatten(2)).view(idx.shape))

    def avg_pool2d(self, x, kernel_size, stride):
        return _n(F.avg_pool2d(_t(x), kernel_size, stride))

    def avg_unpool2d(self, y, kernel_size, stride, output_size):
        y = _t(y)
        z = torch.zeros((*y.shape[:2], *output_size), dtype=DT, requires_grad=True)
        (g,) = torch.autograd.grad(F.avg_pool2d(z, kernel_size, stride), z, grad_outputs=y)  # the adjoint is a VJP
        return _n(g)

    def linear(self, x, w, b):
        return _n(F.linear(_t(x), _t(w), None if b is None else _t(b)))

    def linear_transpose(self, g, w):
        return _n(_t(g) @ _t(w))

    def linear_weight_grad(self, x, g):
        return _n(_t(g).T @ _t(x))

    def hard_sigmoid(self, u):
        return _n(torch.clamp(_t(u), 0.0, 1.0))

    def hard_sigmoid_grad(self, u):
        u = _t(u)
        return _n(((u > 0) & (u < 1)).to(DT))

    def half_hard_sigmoid(self, u):
        return _n(torch.clamp(0.5 * _t(u), 0.0, 1.0))

    def half_hard_sigmoid_grad(self, u):
        u = _t(u)
        return _n(0.5 * ((u > 0) & (u < 2)).to(DT))

    # ------------------------------------------------------------------ the CRNN
    def crnn_phi(self, spec, params, x, state, y, beta):
        net = _Net(spec, params)
        with torch.no_grad():
            return _n(net.phi_beta(_t(x), [_t(s) for s in state], _t(y), beta, net.P))

    def crnn_step(self, spec, params, x, state, y, beta):
        net = _Net(spec, params)
        return [_n(s) for s in net.step(_t(x), [_t(s) for s in state], _t(y), beta)]

    def crnn_delta_step(self, spec, params, x, state, delta, y, beta):
        """ρ(u^β(s⁰ + δ)) − ρ(u(s⁰)) (Eq. 4.8) by two plain steps: in float64 the state form is exact enough."""
        net = _Net(spec, params)
        x, y = _t(x), _t(y)
        s0 = [_t(s) for s in state]
        plus = net.step(x, [a + _t(d) for a, d in zip(s0, delta)], y, beta)
        free = net.step(x, s0, y, 0.0)
        return [_n(a - b) for a, b in zip(plus, free)]

    def crnn_dphi_dtheta(self, spec, params, x, state, y, beta):
        net = _Net(spec, params)
        return {k: _n(v) for k, v in net.dphi_dtheta(_t(x), [_t(s) for s in state], _t(y), beta).items()}

    def crnn_settle(self, spec, params, x, T):
        return [_n(s) for s in _Net(spec, params).settle(_t(x), T)]

    def ep_gradients(self, spec, params, x, y, beta, T1, T2, estimator, sign):
        """Free phase, nudged phase(s), and the estimator (Eqs. 4.1-4.3)."""
        net = _Net(spec, params)
        x, y = _t(x), _t(y)
        n = x.shape[0]
        s0 = net.settle(x, T1)  # free phase from zero
        if estimator == "symmetric":
            sp = net.settle(x, T2, y, beta, s0)
            sm = net.settle(x, T2, y, -beta, s0)
            gp, gm = net.dphi_dtheta(x, sp, y, beta), net.dphi_dtheta(x, sm, y, -beta)
            return {k: _n(-(gp[k] - gm[k]) / (2.0 * beta * n)) for k in gp}
        if estimator == "random-sign":
            beta = sign * beta  # the drawn sign is part of the case
        elif estimator != "one-sided":
            raise ValueError(f"unknown estimator {estimator!r}")
        sb = net.settle(x, T2, y, beta, s0)
        gb, g0 = net.dphi_dtheta(x, sb, y, beta), net.dphi_dtheta(x, s0, y, 0.0)
        return {k: _n(-(gb[k] - g0[k]) / (beta * n)) for k in gb}

    def bptt_gradients(self, spec, params, x, y, T):
        """Autograd through T unrolled free steps (Eq. 5.1): ∂/∂θ of (1/n) Σ_n C(s_T)."""
        net = _Net(spec, params)
        x, y = _t(x), _t(y)
        P = {k: v.clone().requires_grad_(True) for k, v in net.P.items()}
        s = [si.requires_grad_(True) for si in net.zeros(x.shape[0])]
        for _ in range(int(T)):
            s = [net.rho(u) for u in net.dphi_ds(x, s, y, 0.0, P, create_graph=True)]
        loss = net.cost(s, y, P).mean()
        g = torch.autograd.grad(loss, [P[k] for k in net.names], allow_unused=True)
        return {k: _n(torch.zeros_like(P[k]) if gk is None else gk) for k, gk in zip(net.names, g)}

    # ------------------------------------------------------------------ costs (§6)
    @staticmethod
    def _value_and_grads(value_fn, tensors):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        value = value_fn(*leaves)
        grads = torch.autograd.grad(value.sum(), leaves)
        return (_n(value), *[_n(g) for g in grads])

    def local_error_cost(self, s, y, weight, bias, grid, loss):
        y = _t(y)
        K = weight.shape[0]

        def value(s, W, b):
            v = s
            if s.dim() == 4:
                h, w = s.shape[2:]
                pool = (h // _largest_divisor_at_most(h, grid), w // _largest_divisor_at_most(w, grid))
                v = F.avg_pool2d(s, pool, pool) if pool != (1, 1) else s
            z = F.linear(v.flatten(1), W, b)
            if loss == "ce":
                return F.cross_entropy(z, y, reduction="none")
            return 0.5 * ((z - F.one_hot(y, K).to(DT)) ** 2).sum(1)

        return self._value_and_grads(value, [_t(s), _t(weight), _t(bias)])

    def distillation_cost(self, s, t, weight, bias, normalisation):
        t = _t(t)
        if t.dim() == 4 and t.shape[2:] != s.shape[2:]:
            k = (t.shape[2] // s.shape[2], t.shape[3] // s.shape[3])
            t = F.avg_pool2d(t, k, k)
        scale = 1.0 / t[0].numel() if normalisation == "mean" else 1.0

        def value(s, W, b):
            m = F.conv2d(s, W, b) if s.dim() == 4 else F.linear(s, W, b)
            return 0.5 * scale * ((m - t) ** 2).flatten(1).sum(1)

        return self._value_and_grads(value, [_t(s), _t(weight), _t(bias)])

    def output_distillation_cost(self, z_s, z_t, temperature):
        q = torch.softmax(_t(z_t) / temperature, dim=1)

        def value(z):
            return -(temperature ** 2) * (q * torch.log_softmax(z / temperature, dim=1)).sum(1)

        return self._value_and_grads(value, [_t(z_s)])

    # ------------------------------------------------------------------ teacher (§7)
    def teacher_loss_and_grads(self, spec, params, x, y):
        names = list(params)
        P = {k: _t(v).requires_grad_(True) for k, v in params.items()}
        half = spec["activation"] == "half_hard_sigmoid"
        a = _t(x)
        for ly in spec["layers"]:
            W, b = P[f"{ly['name']}.weight"], P[f"{ly['name']}.bias"]
            if ly["kind"] == "conv":
                p = F.conv2d(a, W, b, padding=ly["padding"])
                if ly["pool"] == "max":
                    p = F.max_pool2d(p, 2, 2)
                elif ly["pool"] == "avg":
                    p = F.avg_pool2d(p, 2, 2)
            else:
                p = F.linear(a.flatten(1), W, b)
            a = torch.clamp(0.5 * p if half else p, 0.0, 1.0)
        ro = spec["readout_layer"]["name"]
        loss = F.cross_entropy(F.linear(a.flatten(1), P[f"{ro}.weight"], P[f"{ro}.bias"]), _t(y))
        g = torch.autograd.grad(loss, [P[k] for k in names])
        return float(loss.detach()), {k: _n(gk) for k, gk in zip(names, g)}


ADAPTER = TorchPort()
