"""Conformance cases: deterministic float64 inputs, pyeqprop's outputs, and each output's scale.

Each :class:`~pyeqprop.conformance.format.Case` is one call of one adapter method (protocol in
:mod:`.adapter`) on fixed arrays, with the outputs pyeqprop computes and, for every output
array, an absolute tolerance (:mod:`.tolerances`). :func:`build_cases` constructs them all;
:func:`~pyeqprop.conformance.format.write_vectors` stores them.

Inputs come from ``numpy.random.default_rng(seed)`` with the seed stored per case;
parameters are stored explicitly under their PyTorch names, so a port loads them instead
of reproducing pyeqprop's initialisation (Eq. 3.10). Each builder computes its outputs'
scale S (the largest Σ|terms| of an element: the same computation on absolute values, the
argmaxes frozen at the reference's) and rounding depth; single-stage outputs get
atol = γ·S, chained stages the propagated bound of :mod:`.tolerances`.
"""
from __future__ import annotations

import math

import numpy as np

from .. import ops
from ..model.readout import MSEOutput
from ..ops.softmax import log_softmax, onehot
from ..testing.propagation import CRNNBounds, amax, softmax_rel_error, teacher_forward_bounds
from ..testing.rounding import GAMMA
from .format import Case
from .tolerances import bound_entry, bptt_tolerance, ep_tolerance, exact_entry, teacher_tolerance, tol_entry

__all__ = ["build_cases", "spec_dict", "MODEL_CONFIGS", "TEACHER_CONFIGS"]


# =========================================================================== primitives (§2)
def _pair(v):
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def _conv_cases():
    """conv2d / conv2d_transpose / conv2d_weight_grad in several geometries (Eqs. 2.1-2.4)."""
    # (tag, n, c, o, (h, w), (k_h, k_w), stride, padding, bias, output-size offset for the transpose)
    geoms = [
        ("s1_p0", 2, 3, 4, (7, 6), (3, 3), 1, 0, True, 0),
        ("s1_p1", 2, 3, 4, (7, 6), (3, 3), 1, 1, True, 0),
        ("s2_p1", 2, 3, 4, (7, 6), (3, 3), 2, 1, True, 1),
        ("s2_p2_k2x3", 2, 2, 3, (8, 7), (2, 3), 2, 2, True, 0),
        ("s21_p21_k3x2", 2, 2, 3, (6, 7), (3, 2), (2, 1), (2, 1), True, 1),
        ("batch1_nobias_k1", 1, 3, 2, (5, 4), (1, 1), 1, 0, False, 0),
        ("batch1_s2_p0_k4", 1, 2, 3, (9, 9), (4, 4), 2, 0, False, 1),
    ]
    cases = []
    for i, (tag, n, c, o, (h, w), (kh, kw), stride, padding, with_bias, extra) in enumerate(geoms):
        seed = 100 + i
        rng = np.random.default_rng(seed)
        s, p = _pair(stride), _pair(padding)
        x = rng.uniform(-1.0, 1.0, (n, c, h, w))
        W = rng.uniform(-1.0, 1.0, (o, c, kh, kw))
        b = rng.uniform(-1.0, 1.0, (o,)) if with_bias else None
        y = ops.conv2d(x, W, b, stride=s, padding=p)
        S = ops.conv2d(np.abs(x), np.abs(W), None if b is None else np.abs(b), stride=s, padding=p)
        desc_geo = f"n={n}, c={c}, o={o}, {h}×{w} input, {kh}×{kw} kernel, stride {tuple(s)}, padding {tuple(p)}"
        inputs = {"x": x, "w": W}
        if b is not None:
            inputs["b"] = b
        cases.append(Case(
            f"conv2d_{tag}", "conv2d", ["2.1", "2.2"],
            f"cross-correlation, {desc_geo}" + ("" if b is not None else ", no bias"),
            ["inputs/x", "inputs/w", "inputs/b" if b is not None else "args/b", "args/stride", "args/padding"],
            {"stride": s, "padding": p, **({} if b is not None else {"b": None})}, inputs, {}, {"y": y},
            {"y": tol_entry(amax(S), c * kh * kw + 1)}, seed))
        # transposed convolution: g of the forward output's shape; output_size the largest or smallest admissible h
        ho, wo = y.shape[2], y.shape[3]
        lo_h, lo_w = (ho - 1) * s[0] + kh - 2 * p[0], (wo - 1) * s[1] + kw - 2 * p[1]
        out_hw = [max(lo_h, 1) + min(extra, s[0] - 1), max(lo_w, 1) + min(extra, s[1] - 1)]
        g = rng.uniform(-1.0, 1.0, (n, o, ho, wo))
        z = ops.conv2d_transpose(g, W, stride=s, padding=p, output_size=out_hw)
        Sz = ops.conv2d_transpose(np.abs(g), np.abs(W), stride=s, padding=p, output_size=out_hw)
        op = [out_hw[0] - lo_h, out_hw[1] - lo_w]
        cases.append(Case(
            f"conv2d_transpose_{tag}", "conv2d_transpose", ["2.2", "2.3"],
            f"adjoint of conv2d in x, {desc_geo}, output_size {tuple(out_hw)} (PyTorch output_padding {tuple(op)})",
            ["inputs/g", "inputs/w", "args/stride", "args/padding", "args/output_size"],
            {"stride": s, "padding": p, "output_size": out_hw}, {"g": g, "w": W}, {}, {"z": z},
            {"z": tol_entry(amax(Sz), o * kh * kw + 1)}, seed))
        # weight gradient: the forward geometry with x and g
        dw = ops.conv2d_weight_grad(x, g, kernel_size=(kh, kw), stride=s, padding=p)
        Sw = ops.conv2d_weight_grad(np.abs(x), np.abs(g), kernel_size=(kh, kw), stride=s, padding=p)
        cases.append(Case(
            f"conv2d_weight_grad_{tag}", "conv2d_weight_grad", ["2.4"], f"adjoint of conv2d in w, {desc_geo}",
            ["inputs/x", "inputs/g", "args/kernel_size", "args/stride", "args/padding"],
            {"kernel_size": [kh, kw], "stride": s, "padding": p}, {"x": x, "g": g}, {}, {"dw": dw},
            {"dw": tol_entry(amax(Sw), n * ho * wo + 1)}, seed))
    return cases


def _window_cover(h, k, s):
    """Largest number of windows (one axis) that cover one input position."""
    ho = (h - k) // s + 1
    counts = np.zeros(h, dtype=int)
    for i in range(ho):
        counts[s * i:s * i + k] += 1
    return int(counts.max())


def _pool_cases():
    """max_pool2d (+ indices), max_unpool2d, max_pool2d_select, avg_pool2d, avg_unpool2d (Eqs. 2.5-2.8)."""
    # (tag, shape, kernel, stride, integer-valued inputs (ties))
    geoms = [
        ("2x2s2", (2, 3, 6, 8), (2, 2), (2, 2), False),
        ("2x2s2_odd", (1, 2, 7, 5), (2, 2), (2, 2), False),
        ("3x3s2_overlap", (2, 2, 7, 9), (3, 3), (2, 2), False),
        ("2x2s2_ties", (2, 3, 6, 6), (2, 2), (2, 2), True),
        ("3x3s2_overlap_ties", (2, 2, 9, 7), (3, 3), (2, 2), True),
        ("3x2s1_overlap_ties", (1, 2, 5, 6), (3, 2), (1, 1), True),
    ]
    cases = []
    for i, (tag, shape, k, s, ties) in enumerate(geoms):
        seed = 200 + i
        rng = np.random.default_rng(seed)
        n, c, h, w = shape
        if ties:
            x = rng.integers(0, 3, shape).astype(np.float64)  # values in {0, 1, 2}: ties in most windows
        else:
            x = rng.uniform(-1.0, 1.0, shape)
        y, idx = ops.max_pool2d(x, kernel_size=k, stride=s)
        ho, wo = y.shape[2:]
        ntie = int(sum(np.sum(x[:, :, s[0] * a:s[0] * a + k[0], s[1] * b:s[1] * b + k[1]].reshape(n, c, -1)
                              == y[:, :, a, b][:, :, None], axis=2).__gt__(1).sum()
                       for a in range(ho) for b in range(wo)))
        overlap = s[0] < k[0] or s[1] < k[1]
        geo = f"{shape} input, {k[0]}×{k[1]} window, stride {s}" + (", windows overlap" if overlap else "")
        tie_note = f", integer values in {{0, 1, 2}}: {ntie} of {y.size} windows have tied maxima" if ties else ""
        kargs = {"kernel_size": list(k), "stride": list(s)}
        cases.append(Case(
            f"max_pool2d_{tag}", "max_pool2d", ["2.5", "2.6"], f"max pooling with flat argmax indices, {geo}{tie_note}",
            ["inputs/x", "args/kernel_size", "args/stride"], kargs, {"x": x}, {},
            {"y": y, "indices": idx}, {"y": exact_entry(), "indices": exact_entry()}, seed,
            {"tied_windows": ntie}))
        # unpooling at these indices (overlapping windows may share an index: a scatter-add)
        g = rng.uniform(-1.0, 1.0, y.shape)
        z = ops.max_unpool2d(g, idx, kernel_size=k, stride=s, output_size=(h, w))
        Sz = ops.max_unpool2d(np.abs(g), idx, kernel_size=k, stride=s, output_size=(h, w))
        flat = idx.reshape(n * c, -1)
        dup = int(sum(len(r) - len(np.unique(r)) for r in flat))
        depth = _window_cover(h, k[0], s[0]) * _window_cover(w, k[1], s[1]) - 1
        cases.append(Case(
            f"max_unpool2d_{tag}", "max_unpool2d", ["2.7"],
            f"scatter-add of g to the max-pool indices of the matching max_pool2d case, {geo}; "
            f"{dup} indices are shared by several windows" + (" (their values must add up)" if dup else ""),
            ["inputs/y", "inputs/indices", "args/kernel_size", "args/stride", "args/output_size"],
            {**kargs, "output_size": [h, w]}, {"y": g, "indices": idx}, {}, {"z": z},
            {"z": tol_entry(amax(Sz), depth) if dup else exact_entry()}, seed, {"shared_indices": dup}))
        if tag in ("3x3s2_overlap_ties", "2x2s2"):
            xs = rng.uniform(-1.0, 1.0, shape)
            ysel = ops.max_pool2d_select(xs, idx, kernel_size=k, stride=s)
            cases.append(Case(
                f"max_pool2d_select_{tag}", "max_pool2d_select", ["2.7a"],
                f"selection x[indices] at the indices of max_pool2d_{tag} (a different x), {geo}",
                ["inputs/x", "inputs/indices", "args/kernel_size", "args/stride"], kargs,
                {"x": xs, "indices": idx}, {}, {"y": ysel}, {"y": exact_entry()}, seed))
        if not ties:
            ya = ops.avg_pool2d(x, kernel_size=k, stride=s)
            Sa = ops.avg_pool2d(np.abs(x), kernel_size=k, stride=s)
            cases.append(Case(
                f"avg_pool2d_{tag}", "avg_pool2d", ["2.5", "2.8"], f"average pooling, {geo}",
                ["inputs/x", "args/kernel_size", "args/stride"], kargs, {"x": x}, {}, {"y": ya},
                {"y": tol_entry(amax(Sa), k[0] * k[1] + 1)}, seed))
            za = ops.avg_unpool2d(g, kernel_size=k, stride=s, output_size=(h, w))
            Sza = ops.avg_unpool2d(np.abs(g), kernel_size=k, stride=s, output_size=(h, w))
            cases.append(Case(
                f"avg_unpool2d_{tag}", "avg_unpool2d", ["2.8"],
                f"adjoint of average pooling, {geo}, output_size ({h}, {w})",
                ["inputs/y", "args/kernel_size", "args/stride", "args/output_size"], {**kargs, "output_size": [h, w]},
                {"y": g}, {}, {"z": za},
                {"z": tol_entry(amax(Sza), _window_cover(h, k[0], s[0]) * _window_cover(w, k[1], s[1]) + 1)}, seed))
    return cases


def _linear_cases():
    cases = []
    for i, (tag, n, fin, fout, with_bias) in enumerate([("bias", 3, 7, 5, True), ("nobias_batch1", 1, 12, 4, False)]):
        seed = 300 + i
        rng = np.random.default_rng(seed)
        x = rng.uniform(-1.0, 1.0, (n, fin))
        W = rng.uniform(-1.0, 1.0, (fout, fin))
        b = rng.uniform(-1.0, 1.0, (fout,)) if with_bias else None
        g = rng.uniform(-1.0, 1.0, (n, fout))
        y = ops.linear(x, W, b)
        S = ops.linear(np.abs(x), np.abs(W), None if b is None else np.abs(b))
        inputs = {"x": x, "w": W, **({"b": b} if b is not None else {})}
        cases.append(Case(
            f"linear_{tag}", "linear", ["2.11"],
            f"y = x wᵀ + b, x ({n}, {fin}), w ({fout}, {fin})" + ("" if b is not None else ", no bias"),
            ["inputs/x", "inputs/w", "inputs/b" if b is not None else "args/b"], {} if b is not None else {"b": None},
            inputs, {}, {"y": y}, {"y": tol_entry(amax(S), fin + 1)}, seed))
        cases.append(Case(
            f"linear_transpose_{tag}", "linear_transpose", ["2.11"], f"z = g w, g ({n}, {fout}), w ({fout}, {fin})",
            ["inputs/g", "inputs/w"], {}, {"g": g, "w": W}, {}, {"z": ops.linear_transpose(g, W)},
            {"z": tol_entry(amax(np.abs(g) @ np.abs(W)), fout)}, seed))
        cases.append(Case(
            f"linear_weight_grad_{tag}", "linear_weight_grad", ["2.11"],
            f"Δw = gᵀ x, x ({n}, {fin}), g ({n}, {fout})",
            ["inputs/x", "inputs/g"], {}, {"x": x, "g": g}, {}, {"dw": ops.linear_weight_grad(x, g)},
            {"dw": tol_entry(amax(np.abs(g).T @ np.abs(x)), n)}, seed))
    return cases


def _activation_cases():
    """Both activations and their derivatives on random values plus the kinks and their neighbours."""
    rng = np.random.default_rng(400)
    special = np.array([0.0, 1.0, 2.0, -0.0, 0.5, 1.5, -1.0, 3.0,
                        np.nextafter(0.0, 1.0), np.nextafter(0.0, -1.0), np.nextafter(1.0, 0.0), np.nextafter(1.0, 2.0),
                        np.nextafter(2.0, 1.0), np.nextafter(2.0, 3.0), 1e-300, -1e-300])
    u = np.concatenate([special, rng.uniform(-1.0, 3.0, 48)]).reshape(2, 4, 8)
    cases = []
    for name, eq, kinks in (("hard_sigmoid", "2.9", "0 and 1"), ("half_hard_sigmoid", "2.10", "0 and 2")):
        fn, grad = getattr(ops, name), getattr(ops, name + "_grad")
        cases.append(Case(name, name, [eq], f"ρ(u) on random values, the kinks ({kinks}) and their float64 neighbours",
                          ["inputs/u"], {}, {"u": u}, {}, {"y": fn(u)}, {"y": exact_entry()}, 400))
        cases.append(Case(f"{name}_grad", f"{name}_grad", [eq],
                          f"ρ'(u): 0 at the kinks ({kinks}) themselves, nonzero strictly between them",
                          ["inputs/u"], {}, {"u": u}, {}, {"y": grad(u)}, {"y": exact_entry()}, 400))
    return cases


# =========================================================================== model helpers
def spec_dict(net) -> dict:
    """What a port needs to rebuild ``net`` (a CRNN or Teacher): the constructor arguments and
    the resolved layers (so a port need not parse the spec string)."""
    def layer_dict(ly, role):
        if ly.kind == "conv":
            return {"name": ly.name, "kind": "conv", "role": role, "in_channels": ly.in_channels,
                    "out_channels": ly.out_channels, "kernel": ly.kernel, "padding": ly.padding, "stride": 1,
                    "pool": ly.pool, "pool_kernel": 2 if ly.pool != "none" else 1, "in_hw": list(ly.in_hw),
                    "conv_hw": list(ly.conv_hw), "out_hw": list(ly.out_hw)}
        return {"name": ly.name, "kind": "fc", "role": role, "in_features": ly.in_features,
                "out_features": ly.out_features}

    readout = getattr(net, "readout", "softmax")
    readout = readout if isinstance(readout, str) else "softmax"
    layers = list(net.arch.layers)
    roles = ["hidden"] * len(layers)
    if net.arch.readout is None:
        roles[-1] = "output"
    return {
        "arch": net.arch.spec,
        "input_shape": list(net.input_shape),
        "num_classes": net.num_classes,
        "readout": readout,
        "activation": net.activation,
        "layers": [layer_dict(ly, r) for ly, r in zip(layers, roles)],
        "readout_layer": None if net.arch.readout is None else layer_dict(net.arch.readout, "readout"),
        "state_shapes": [list(s) for s in net.arch.state_shapes],
    }


# =========================================================================== model cases (§3-5)
MODEL_CONFIGS = {
    # name: (arch, input_shape, num_classes, readout, activation, batch, seed, contraction target)
    # The weights are scaled so that the 2-norm Lipschitz bound of one free step is about the target
    # (pyeqprop.diagnostics.contracting_weight_scale): the dynamics contract, so rounding errors stay bounded.
    "mse": ("c3m-c4-f5", (2, 6, 6), 3, "mse", "hard_sigmoid", 2, 11, 0.8),
    "softmax": ("c3a-c4m", (2, 4, 8), 3, "softmax", "half_hard_sigmoid", 2, 12, 0.8),
}
BETA = 0.25
T_SETTLE = 8
T1, T2 = 10, 4
T_BPTT = 6


def _model(cfg_name):
    from ..diagnostics import contracting_weight_scale
    from ..model.crnn import CRNN

    arch, shape, K, readout, act, n, seed, target = MODEL_CONFIGS[cfg_name]
    base = CRNN(arch, shape, num_classes=K, readout=readout, activation=act, dtype="float64", xp="numpy", seed=seed)
    # rounded to 3 digits: the scale comes from an SVD, whose last bits may differ across LAPACK builds;
    # rounded, every parameter is an exact elementwise function of the seed
    ws = float(f"{contracting_weight_scale(base, target=target):.3g}")
    net = CRNN(arch, shape, num_classes=K, readout=readout, activation=act, dtype="float64", xp="numpy", seed=seed,
               weight_scale=ws)
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, (n, *shape))
    y = rng.integers(0, K, n).astype(np.int64)
    state = [rng.uniform(0.0, 1.0, sh) for sh in net.state_shapes(n)]
    return net, x, y, state, seed, ws


def _params(net):
    return {k: np.array(v) for k, v in net.params.items()}


def _model_args(net, **kw):
    return {"spec": spec_dict(net), **kw}


def _init_note(seed, ws) -> dict:
    return {"init": f"CRNN(..., dtype='float64', seed={seed}, weight_scale={ws}) (Eq. 3.10); inputs x uniform "
                    f"[0, 1), labels and random states from numpy.random.default_rng({seed})"}


def _model_cases():
    from ..learning.bptt import bptt
    from ..learning.estimators import ep_estimate
    from ..learning.settle import settle

    cases = []
    for cfg in MODEL_CONFIGS:
        net, x, y, state, seed, ws = _model(cfg)
        first = len(cases)
        n = x.shape[0]
        params = _params(net)
        bd = CRNNBounds(net, x, y)
        what = f"'{net.arch.spec}' on {tuple(net.input_shape)} inputs, {net.readout} readout, {net.activation}, n={n}"
        common = {"x": x, "y": y}
        ctx = net.prepare(x, y)

        # ---- Φ^β at a random state (Eqs. 3.1-3.6)
        idx = bd.indices(state)
        bd.check_state(state)
        phi = net.phi(x, state, net.nudge(x, y, BETA))
        S_phi = sum((bd.bottom_up_abs(l, bd.lowers(state)[l], idx[l]) * np.abs(state[l])).reshape(n, -1).sum(axis=1)
                    for l in range(bd.L))
        if net.readout == "mse":
            c_abs = 0.5 * ((np.abs(state[-1]) + bd.onehot) ** 2).sum(axis=1)
        else:
            z_abs = np.abs(state[-1]).reshape(n, -1) @ bd.P[f"{net.arch.readout.name}.weight"].T \
                + bd.P[f"{net.arch.readout.name}.bias"]
            c_abs = 2.0 * z_abs.max(axis=1) + math.log(net.num_classes) + 2.0
        S_phi = S_phi + BETA * c_abs
        cases.append(Case(
            f"crnn_phi_{cfg}", "crnn_phi", ["3.1", "3.2", "3.3" if net.readout == "mse" else "3.4", "3.6"],
            f"Φ^β per sample at a random state in [0, 1), β = {BETA}; {what}",
            ["args/spec", "params", "inputs/x", "inputs/state", "inputs/y", "args/beta"], _model_args(net, beta=BETA),
            {**common, "state": state}, params, {"phi": phi},
            {"phi": tol_entry(amax(S_phi), bd.phi_depth)}, seed, bd.conditioning()))

        # ---- one dynamics step, free and nudged (Eqs. 3.7-3.8)
        for beta in (0.0, BETA):
            new = net.step(x, state, net.nudge(x, y, beta))
            uabs = bd.drive_abs(state, idx, beta)
            tag = "free" if beta == 0.0 else "nudged"
            cases.append(Case(
                f"crnn_step_{tag}_{cfg}", "crnn_step", ["3.7", "3.8"],
                f"one synchronous step s ← ρ(∂Φ^β/∂s) from a random state, β = {beta}; {what}",
                ["args/spec", "params", "inputs/x", "inputs/state", "inputs/y", "args/beta"],
                _model_args(net, beta=beta), {**common, "state": state}, params, {"state": new},
                {f"state/{l}": tol_entry(bd.rho * amax(uabs[l]), bd.drive_depth) for l in range(bd.L)}, seed))

        # ---- one step in difference variables δ = s − s⁰ (Eqs. 4.8, 2.12)
        cases.append(_delta_step_case(cfg, net, x, y, state, seed, what))

        # ---- ∂Φ^β/∂θ at the random state (Eq. 3.9)
        g = net.dphi_dtheta(x, state, net.nudge(x, y, BETA))
        gabs = bd.dphi_abs(state, idx)
        cabs, _ = bd.cost_param_bound(state, 0.0)
        tol = {}
        for k in g:
            S = gabs[k] if k in gabs else BETA * cabs[k]
            tol[f"grads/{k}"] = tol_entry(amax(S), bd.grad_depth)
        cases.append(Case(
            f"crnn_dphi_dtheta_{cfg}", "crnn_dphi_dtheta", ["3.9"],
            f"Σ_batch ∂Φ^β/∂θ at a random state, β = {BETA} (cost-only parameters: −β ∂C/∂θ); {what}",
            ["args/spec", "params", "inputs/x", "inputs/state", "inputs/y", "args/beta"], _model_args(net, beta=BETA),
            {**common, "state": state}, params, {"grads": g}, tol, seed))

        # ---- free settling (Eqs. 3.8, 3.11)
        bd_s = CRNNBounds(net, x, y)
        states, _, errs, uerrs = bd_s.run(T_SETTLE, 0.0, None)
        scale = bd_s.drive_scale  # the largest Σ|terms| of any u_t
        ref = settle(net, x, T_SETTLE).state
        for a, b in zip(ref, states[-1]):
            assert np.array_equal(a, b)
        cases.append(Case(
            f"crnn_settle_{cfg}", "crnn_settle", ["3.8", "3.11"],
            f"free phase: T = {T_SETTLE} steps from s = 0, β = 0; {what}",
            ["args/spec", "params", "inputs/x", "args/T"], _model_args(net, T=T_SETTLE), {"x": x}, params,
            {"state": ref}, {f"state/{l}": bound_entry(errs[-1], scale, bd_s.drive_depth) for l in range(bd_s.L)},
            seed, bd_s.conditioning()))

        # ---- EP estimators (Eqs. 4.1-4.3)
        for est in ("one-sided", "symmetric", "random-sign"):
            rng, sign_seed = None, None
            if est == "random-sign":
                # the first seed from seed + 500 on whose first draw is ≥ ½: sign −1, unlike one-sided
                sign_seed = next(k for k in range(seed + 500, seed + 600) if np.random.default_rng(k).random() >= 0.5)
                rng = np.random.default_rng(sign_seed)
            res = ep_estimate(net, x, y, beta=BETA, T1=T1, T2=T2, estimator=est, rng=rng)
            sign = None if est != "random-sign" else int(np.sign(res.betas[0]))
            if est == "random-sign":
                assert sign == -1, "pick a seed whose first draw gives the sign −1"
            tol, cond = ep_tolerance(net, x, y, ctx, est, res, beta=BETA, T1=T1, T2=T2)
            if sign_seed is not None:
                cond["sign_drawn_from"] = f"numpy.random.default_rng({sign_seed}).random() >= 0.5"
            cases.append(Case(
                f"ep_{est.replace('-', '_')}_{cfg}", "ep_gradients", ["4.1"] if est == "one-sided" else
                (["4.2"] if est == "symmetric" else ["4.1", "4.3"]),
                f"{est} EP estimate of ∇θ (1/n)Σ C: T1 = {T1} free steps from 0, T2 = {T2} nudged steps, "
                f"β = {BETA}" + (f", sign {sign:+d} given explicitly (one-sided with β → {sign}·β)" if sign else "")
                + f"; {what}",
                ["args/spec", "params", "inputs/x", "inputs/y", "args/beta", "args/T1", "args/T2", "args/estimator",
                 "args/sign"],
                _model_args(net, beta=BETA, T1=T1, T2=T2, estimator=est, sign=sign), common, params,
                {"grads": res.grads}, tol, seed, cond))

        # ---- BPTT (Eqs. 5.1-5.4)
        br = bptt(net, x, y, T=T_BPTT, per_step=True)
        tol, cond = bptt_tolerance(net, x, y, br, T=T_BPTT)
        cases.append(Case(
            f"bptt_{cfg}", "bptt_gradients", ["5.1", "5.2", "5.3", "5.4"],
            f"exact gradient of (1/n)Σ C(s_T) after T = {T_BPTT} free steps from 0; {what}",
            ["args/spec", "params", "inputs/x", "inputs/y", "args/T"], _model_args(net, T=T_BPTT), common, params,
            {"grads": br.grads}, tol, seed, cond))
        for c in cases[first:]:
            c.notes = {**_init_note(seed, ws), **c.notes}
    return cases


DELTA_SIZE = 0.3  # δ uniform in [−0.3, 0.3): large enough to move some max-pool argmaxes of s⁰ + δ


def _delta_step_case(cfg, net, x, y, s0, seed, what):
    """δ' = ρ(u^β(s⁰ + δ)) − ρ(u(s⁰)) at a random s⁰ and δ (Eq. 4.8), the pools at their own argmaxes.

    Tolerance: pyeqprop forms Δu = u^β(s⁰ + δ) − u(s⁰) from δ (ΔB with the argmax brackets of
    layers whose pool moved) and δ' = ρ(u⁰ + Δu) − ρ(u⁰) by Eq. 2.12; a port may instead evaluate both
    drives and subtract. With S⁺, S⁰ the Σ|terms| of u^β(s⁰ + δ) and u(s⁰) and γ_d the depth's bound,
    u⁰ is within γ_d S⁰ and Δu within γ_d (S⁺ + 2S⁰) (conv(δ) has terms below S⁺ + S⁰, a bracket
    z⁰[argmax⁺] − z⁰[argmax⁰] adds S⁰), so u⁰ + Δu is within γ_d (S⁺ + 3S⁰); ρ is ρ'-Lipschitz,
    so δ' is within ρ' γ_d (S⁺ + 4S⁰), the state form's ρ' γ_d (S⁺ + S⁰) included. Two such results
    differ by at most γ = 2γ_d times ρ'(S⁺ + 4S⁰) (:mod:`.tolerances`). Both states' argmax gaps are
    asserted above TIE_SAFETY times twice their bounds, so every computation picks the same windows.
    """
    rng = np.random.default_rng(seed + 700)
    delta = [rng.uniform(-DELTA_SIZE, DELTA_SIZE, s.shape) for s in s0]
    plus = [a + b for a, b in zip(s0, delta)]
    nudge = net.nudge(x, y, BETA)
    base = net.free_base(x, s0, nudge)
    out = net.delta_update(x, base, delta, nudge)[0]
    bd = CRNNBounds(net, x, y)
    idx0, idx_plus = bd.indices(s0), bd.indices(plus)
    for st in (s0, plus):
        bd.check_state(st)
    assert bd.min_gap > 2.0, f"argmax gap {bd.min_gap} of {cfg}: draw another δ"
    moved = sum(int(np.count_nonzero(a != b)) for a, b in zip(idx0, idx_plus) if a is not None)
    s_plus = bd.drive_abs(plus, idx_plus, BETA)
    s_zero = bd.drive_abs(s0, idx0, 0.0)
    tol = {f"delta/{l}": tol_entry(bd.rho * amax(s_plus[l] + 4.0 * s_zero[l]), bd.drive_depth + 2)
           for l in range(bd.L)}
    return Case(
        f"crnn_delta_step_{cfg}", "crnn_delta_step", ["4.8", "2.12"],
        f"one synchronous step in δ = s − s⁰: ρ(u^β(s⁰ + δ)) − ρ(u(s⁰)) at random s⁰ in [0, 1) and δ in "
        f"[−{DELTA_SIZE}, {DELTA_SIZE}), β = {BETA}, each pool at its own argmax ({moved} argmaxes of s⁰ + δ "
        f"differ from s⁰'s); {what}",
        ["args/spec", "params", "inputs/x", "inputs/state", "inputs/delta", "inputs/y", "args/beta"],
        _model_args(net, beta=BETA), {"x": x, "y": y, "state": s0, "delta": delta}, _params(net), {"delta": out},
        tol, seed, {**bd.conditioning(), "moved_argmaxes": moved, "delta_drawn_from": f"numpy.random.default_rng("
                                                                                      f"{seed + 700})"})


# =========================================================================== intermediate signals (§6)
def _uniform_params(rng, specs):
    """Parameters uniform in ±1/√fan_in (the range of Eq. 3.10), drawn in order from ``rng``."""
    return {sp.name: rng.uniform(-1.0 / math.sqrt(sp.fan_in), 1.0 / math.sqrt(sp.fan_in), sp.shape) for sp in specs}


def _local_cases():
    from ..learning.signals import LocalErrorHead

    configs = [
        # tag, state shape (n, …), K, grid, loss
        ("ce_conv_grid2", (3, 4, 6, 6), 5, 2, "ce"),
        ("mse_conv_grid1x2", (2, 3, 5, 4), 4, 2, "mse"),
        ("ce_fc", (3, 7), 4, 2, "ce"),
    ]
    cases = []
    for i, (tag, shape, K, grid, loss) in enumerate(configs):
        seed = 600 + i
        rng = np.random.default_rng(seed)
        head = LocalErrorHead(0, shape[1:], K, grid=grid, loss=loss, name="head1")
        params = _uniform_params(rng, head.param_specs())
        s = rng.uniform(0.0, 1.0, shape)
        y = rng.integers(0, K, shape[0]).astype(np.int64)
        ctx = head.prepare(params, s, y)
        states = [s]
        value = head.value(params, states, ctx)
        gs = head.state_grads(params, states, ctx)[0]
        gp = head.param_grads(params, states, ctx)
        # scales (module docstring): v = vec(avgpool(s)), h = A v + a, δ = ∂C/∂h
        A, a = np.abs(params["head1.weight"]), np.abs(params["head1.bias"])
        v = head.pooled(s)
        v_abs = head.pooled(np.abs(s))
        h = head.logits(params, states)
        h_abs = v_abs @ A.T + a  # (n, K)
        Y = onehot(y, K, np.float64)
        if loss == "ce":
            p = np.exp(log_softmax(h))
            r = np.array([softmax_rel_error(float(m), K) for m in h_abs.max(axis=1)])  # (n,)
            delta = p - Y
            d_err = p * r[:, None]  # |Δδ| ≤ p_k r
            val_tol = GAMMA * (2.0 * h_abs.max(axis=1) + math.log(K) + 3.0)
        else:
            delta = h - Y
            d_err = GAMMA * h_abs
            val_tol = GAMMA * ((h_abs + Y) ** 2).sum(axis=1)
        kk = 1 if head.pool is None else head.pool[0] * head.pool[1]
        dz = d_err @ A + GAMMA * (np.abs(delta) @ A)  # (n, F) error of δ A
        if head.pool is None:
            gs_err = dz
        else:
            c, hh, ww = shape[1:]
            gs_err = ops.avg_unpool2d(dz.reshape(shape[0], c, hh // head.pool[0], ww // head.pool[1]),
                                      kernel_size=head.pool, stride=head.pool, output_size=(hh, ww))
        gw_err = d_err.T @ v_abs + 2.0 * GAMMA * (np.abs(delta).T @ v_abs)
        gb_err = d_err.sum(axis=0) + GAMMA * np.abs(delta).sum(axis=0)
        depth = A.shape[1] + kk + shape[0] + K + 8
        F = A.shape[1]
        desc = (f"local error head (grid {grid}: pool {head.pool}, {F} features, K = {K}, loss {loss}) on a state of "
                f"shape {shape}: value per sample, ∂C/∂s, Σ_batch ∂C/∂θ")
        cases.append(Case(
            f"local_error_{tag}", "local_error_cost", ["6.2", "6.3"], desc,
            ["inputs/s", "inputs/y", "params/head1.weight", "params/head1.bias", "args/grid", "args/loss"],
            {"grid": grid, "loss": loss}, {"s": s, "y": y}, params,
            {"value": value, "grad_s": gs, "grad_weight": gp["head1.weight"], "grad_bias": gp["head1.bias"]},
            {"value": bound_entry(amax(val_tol), amax(val_tol) / GAMMA, depth),
             "grad_s": bound_entry(amax(gs_err), amax(gs_err) / GAMMA, depth),
             "grad_weight": bound_entry(amax(gw_err), amax(gw_err) / GAMMA, depth),
             "grad_bias": bound_entry(amax(gb_err), amax(gb_err) / GAMMA, depth)}, seed,
            {"pool": None if head.pool is None else list(head.pool), "features": F, "v_shape": list(v.shape)}))
    return cases


def _distillation_cases():
    from ..learning.signals import DistillationMap, TeacherFeatures
    from ..model.teacher import Teacher

    configs = [
        # tag, teacher arch, teacher input, teacher layer (0-based), student state shape (n, …), normalisation, seed
        ("conv_same_size_mean", "c4m-c5", (1, 8, 8), 0, (3, 3, 4, 4), "mean", 700),
        ("conv_pooled_sum", "c4-c5m", (1, 8, 8), 0, (2, 3, 4, 4), "sum", 701),
        ("fc_mean", "c2m-f6", (1, 6, 6), 1, (3, 5), "mean", 702),
    ]
    cases = []
    for tag, tarch, tshape, tl, sshape, norm, seed in configs:
        rng = np.random.default_rng(seed)
        teacher = Teacher(tarch, tshape, num_classes=4, dtype="float64", xp="numpy", seed=seed)
        n = sshape[0]
        x = rng.uniform(0.0, 1.0, (n, *tshape))
        tfeat_shape = tuple(teacher.feature_shapes(1)[tl][1:])
        term = DistillationMap(0, sshape[1:], tfeat_shape, TeacherFeatures(teacher), teacher_layer=tl,
                               normalisation=norm, name="kd1")
        params = _uniform_params(rng, term.param_specs())
        s = rng.uniform(0.0, 1.0, sshape)
        t_raw = np.array(teacher.features(x)[tl])
        ctx = term.prepare(params, x, None)  # the teacher's features, pooled to the student's size
        states = [s]
        value = term.value(params, states, ctx)
        gs = term.state_grads(params, states, ctx)[0]
        gp = term.param_grads(params, states, ctx)
        M, m = np.abs(params["kd1.weight"]), np.abs(params["kd1.bias"])
        scale = term.scale()
        if term.conv:
            tp = term.teacher_pool
            t_abs = ops.avg_pool2d(np.abs(t_raw), kernel_size=tp, stride=tp) if tp != (1, 1) else np.abs(t_raw)
            res_abs = ops.conv2d(np.abs(s), M, m) + t_abs
            gs_abs = ops.conv2d_transpose(res_abs, M, output_size=s.shape)
            gw_abs = ops.conv2d_weight_grad(np.abs(s), res_abs, kernel_size=1)
            gb_abs = res_abs.sum(axis=(0, 2, 3))
            kk = tp[0] * tp[1]
            red = max(M.shape[0], M.shape[1], n * sshape[2] * sshape[3])
        else:
            res_abs = np.abs(s) @ M.T + m + np.abs(t_raw)
            gs_abs = res_abs @ M
            gw_abs = res_abs.T @ np.abs(s)
            gb_abs = res_abs.sum(axis=0)
            kk = 1
            red = max(M.shape[0], M.shape[1], n)
        v_abs = (res_abs ** 2).reshape(n, -1).sum(axis=1)
        depth = red + kk + int(np.prod(ctx.shape[1:])) + 8
        desc = (f"distillation map ({norm} normalisation) from a student state {sshape} to the features of a real "
                f"Teacher('{tarch}', {tshape}, seed={seed}) layer {tl + 1} of shape {tuple(t_raw.shape)}"
                + (f", average-pooled by {term.teacher_pool}" if term.conv and term.teacher_pool != (1, 1) else "")
                + "; the raw teacher features are the input t")
        cases.append(Case(
            f"distillation_{tag}", "distillation_cost", ["6.4", "6.5", "7.4"], desc,
            ["inputs/s", "inputs/t", "params/kd1.weight", "params/kd1.bias", "args/normalisation"],
            {"normalisation": norm}, {"s": s, "t": t_raw}, params,
            {"value": value, "grad_s": gs, "grad_weight": gp["kd1.weight"], "grad_bias": gp["kd1.bias"]},
            {"value": tol_entry(scale * amax(v_abs), depth), "grad_s": tol_entry(2.0 * scale * amax(gs_abs), depth),
             "grad_weight": tol_entry(2.0 * scale * amax(gw_abs), depth),
             "grad_bias": tol_entry(2.0 * scale * amax(gb_abs), depth)}, seed,
            {"teacher": {"arch": tarch, "input_shape": list(tshape), "num_classes": 4, "seed": seed,
                         "layer": tl + 1, "activation": "hard_sigmoid"},
             "teacher_input_seed": seed, "elements_per_sample": term.elements,
             "computed_inputs": {"t": teacher_forward_bounds(teacher, x)[0][tl + 1]}}))
    return cases


def _output_distillation_cases():
    from ..learning.signals import OutputDistillation, TeacherFeatures
    from ..model.teacher import Teacher

    seed, K, n, tau = 800, 5, 3, 4.0
    rng = np.random.default_rng(seed)
    teacher = Teacher("c3m", (1, 6, 6), num_classes=K, dtype="float64", xp="numpy", seed=seed)
    x = rng.uniform(0.0, 1.0, (n, 1, 6, 6))
    zs = rng.normal(0.0, 2.0, (n, K))
    zt = np.array(teacher.logits(x))
    term = OutputDistillation(MSEOutput(0, K), TeacherFeatures(teacher), temperature=tau)
    ctx = term.prepare({}, x, None)
    value = term.value({}, [zs], ctx)
    gz = term.state_grads({}, [zs], ctx)[0]
    ps = np.exp(log_softmax(zs / tau))
    q = np.exp(log_softmax(zt / tau))
    r_s = np.array([softmax_rel_error(float(v), K) for v in np.abs(zs / tau).max(axis=1)])
    r_t = np.array([softmax_rel_error(float(v), K) for v in np.abs(zt / tau).max(axis=1)])
    logp = -log_softmax(zs / tau)  # ≥ 0
    # value = τ² Σ q (−log p): errors of log p (≤ r_s), of q (≤ q r_t), and the K-term sum
    v_err = tau ** 2 * (r_s + (r_t + GAMMA) * (q * logp).sum(axis=1))
    g_err = tau * (ps * r_s[:, None] + q * r_t[:, None] + GAMMA * np.abs(ps - q))
    depth = K + 8
    return [Case(
        "output_distillation", "output_distillation_cost", ["6.6"],
        f"output distillation at temperature {tau}: student logits z_s (normal, σ = 2) against the logits of a real "
        f"Teacher('c3m', (1, 6, 6), K = {K}, seed={seed}); value per sample and ∂C/∂z_s",
        ["inputs/z_s", "inputs/z_t", "args/temperature"], {"temperature": tau}, {"z_s": zs, "z_t": zt}, {},
        {"value": value, "grad_z": gz},
        {"value": bound_entry(amax(v_err), amax(v_err) / GAMMA, depth),
         "grad_z": bound_entry(amax(g_err), amax(g_err) / GAMMA, depth)}, seed,
        {"teacher": {"arch": "c3m", "input_shape": [1, 6, 6], "num_classes": K, "seed": seed},
         "computed_inputs": {"z_t": teacher_forward_bounds(teacher, x)[1]}})]


# =========================================================================== the teacher (§7)
TEACHER_CONFIGS = {
    # name: (arch, input_shape, num_classes, activation, batch, seed)
    "max_avg_fc": ("c3m-c4a-f5", (1, 8, 8), 4, "hard_sigmoid", 3, 31),
    "nopool_max": ("c4p0-c3m", (2, 6, 6), 3, "half_hard_sigmoid", 2, 32),
}


def _teacher_cases():
    from ..model.teacher import Teacher

    cases = []
    for name, (arch, shape, K, act, n, seed) in TEACHER_CONFIGS.items():
        t = Teacher(arch, shape, num_classes=K, activation=act, dtype="float64", xp="numpy", seed=seed)
        rng = np.random.default_rng(seed)
        x = rng.uniform(0.0, 1.0, (n, *shape))
        y = rng.integers(0, K, n).astype(np.int64)
        loss, grads = t.loss_and_grads(x, y)
        tol, notes = teacher_tolerance(t, x, y)
        spec = spec_dict(t)
        cases.append(Case(
            f"teacher_{name}", "teacher_loss_and_grads", ["7.1", "7.2", "7.3"],
            f"one backprop step of the teacher '{arch}' on {shape} inputs ({act}, K = {K}, n = {n}): "
            "the batch-mean cross-entropy and its gradient",
            ["args/spec", "params", "inputs/x", "inputs/y"], {"spec": spec}, {"x": x, "y": y},
            {k: np.array(v) for k, v in t.params.items()}, {"loss": np.float64(loss), "grads": grads}, tol, seed,
            notes))
    return cases


# =========================================================================== all cases
def build_cases() -> list:
    """Every conformance case, in a fixed order (names are unique)."""
    cases = (_conv_cases() + _pool_cases() + _linear_cases() + _activation_cases() + _model_cases()
             + _local_cases() + _distillation_cases() + _output_distillation_cases() + _teacher_cases())
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "duplicate case names"
    return cases
