"""The conformance vectors for ports (docs/conformance.md; every case cites its SPEC.md equations).

(a) The current code reproduces the committed vectors within their tolerances, so a change of
    behaviour shows up as a diff of ``pyeqprop/conformance/vectors`` (package data).
(b) Regeneration is deterministic: twice in a row gives byte-identical files. Against the
    committed files, inputs, parameters and integer outputs must match bit for bit; float
    outputs (and inputs computed by a teacher) within their derived tolerance, because a
    different BLAS may sum in another order. On the machine that wrote the vectors they are
    bitwise equal too (the CLI test below reports max|err| 0 for the default adapter).
(c) ``pyeqprop conformance`` with the default adapter passes every case and never imports torch.
(d) Deliberately wrong adapters fail exactly the cases that exercise their bug: the checker can fail.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pyeqprop import ops
from pyeqprop.cli import main as cli_main
from pyeqprop.conformance import (
    PROTOCOL,
    PYEQPROP,
    PyeqpropAdapter,
    default_vectors_dir,
    format_result,
    load_case,
    load_manifest,
    run_conformance,
    write_vectors,
)

VECTORS = default_vectors_dir()
SPEC = Path(__file__).resolve().parents[1] / "SPEC.md"


@pytest.fixture(scope="module")
def manifest():
    return load_manifest(VECTORS)


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("vectors")
    write_vectors(out)
    return out


def _failed(results):
    return sorted(r.case for r in results if r.status == "fail")


# ----------------------------------------------------------------------------- (a) current code
def test_current_code_reproduces_committed_vectors(manifest):
    """Every case of the committed vectors passes against pyeqprop itself (all equations they cite)."""
    results = run_conformance(PYEQPROP, VECTORS)
    assert [r.case for r in results] == sorted(manifest["cases"])
    bad = [format_result(r) for r in results if r.status != "pass"]
    assert not bad, "pyeqprop no longer reproduces its conformance vectors:\n" + "\n".join(bad)


def test_vectors_cover_the_protocol_and_cite_the_spec(manifest):
    """Each protocol method has cases; each case cites equations SPEC.md defines; the set is small."""
    methods = {e["method"] for e in manifest["cases"].values()}
    assert methods == set(PROTOCOL)
    defined = set(re.findall(r"^### \((\d+\.\d+[a-z]?)\)", SPEC.read_text(encoding="utf-8"), flags=re.M))
    for name, e in manifest["cases"].items():
        assert e["equations"] and set(e["equations"]) <= defined, f"{name} cites {e['equations']}"
        assert (VECTORS / e["file"]).is_file()
        for key, tol in e["tolerance"].items():
            assert tol["rtol"] == 0.0 and tol["atol"] >= 0.0 and tol["depth"] <= 256, (name, key)
    assert sorted(p.name for p in VECTORS.glob("*.npz")) == sorted(e["file"] for e in manifest["cases"].values())
    total = sum(p.stat().st_size for p in VECTORS.iterdir())
    assert total < 1_000_000, f"vectors take {total} bytes"


def test_tolerances_are_far_below_any_real_error(manifest):
    """A tolerance must not let a wrong port through: every atol is below 1e-6 of its output's size."""
    for name, e in manifest["cases"].items():
        arrays = load_case(VECTORS, e)
        for key, tol in e["tolerance"].items():
            a = arrays[f"expected/{key}"]
            if a.dtype.kind == "f" and tol["atol"] > 0:
                assert tol["atol"] <= 1e-6 * float(np.max(np.abs(a))), (name, key, tol["atol"])


# ----------------------------------------------------------------------------- (b) regeneration
def test_regeneration_is_deterministic(regenerated, tmp_path):
    """Writing the vectors twice gives byte-identical files (no timestamps, sorted keys)."""
    write_vectors(tmp_path)
    first = sorted(p.name for p in regenerated.iterdir())
    assert first == sorted(p.name for p in tmp_path.iterdir())
    for name in first:
        assert (regenerated / name).read_bytes() == (tmp_path / name).read_bytes(), name


def _same_json(a, b, path=""):
    """Equal JSON, floats within a relative 1e-9 (tolerances and margins are sums of |terms|: BLAS may
    change their last bits, never more)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), path
        assert math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0), f"{path}: {a!r} != {b!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _same_json(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            _same_json(u, v, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def test_regeneration_matches_committed_vectors(regenerated, manifest):
    """Regenerated vectors equal the committed ones: drawn inputs, parameters and integer outputs bit for
    bit; float outputs within their tolerance; teacher-computed inputs within twice their rounding bound."""
    new = load_manifest(regenerated)
    _same_json(manifest, new)
    bitwise = total = 0
    for name, entry in manifest["cases"].items():
        old_a, new_a = load_case(VECTORS, entry), load_case(regenerated, new["cases"][name])
        assert sorted(old_a) == sorted(new_a), name
        computed = entry["notes"].get("computed_inputs", {})
        for key, a in old_a.items():
            b = new_a[key]
            assert a.dtype == b.dtype and a.shape == b.shape, (name, key)
            if key.startswith("expected/") and a.dtype.kind == "f":
                total += 1
                bitwise += int(np.array_equal(a, b))
                atol = entry["tolerance"][key[len("expected/"):]]["atol"]
                assert np.max(np.abs(a - b), initial=0.0) <= atol, (name, key)
            elif key.startswith("inputs/") and key[len("inputs/"):] in computed:
                assert np.max(np.abs(a - b), initial=0.0) <= 2.0 * computed[key[len("inputs/"):]], (name, key)
            else:
                assert np.array_equal(a, b), f"{name}: {key} differs bitwise"
    assert total > 0 and bitwise <= total


# ----------------------------------------------------------------------------- (c) the CLI
def test_cli_default_adapter_passes_every_case_without_torch(manifest):
    """``pyeqprop conformance`` (pyeqprop's own adapter): one PASS line per case, exit 0; torch never imported."""
    code = ("import sys; from pyeqprop.cli import main; rc = main(['conformance']); "
            "assert 'torch' not in sys.modules, 'pyeqprop imported torch'; sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    n = len(manifest["cases"])
    assert len(lines) == n + 1
    assert all(line.startswith("PASS ") for line in lines[:-1]), r.stdout
    assert lines[-1].startswith(f"{n} passed, 0 failed, 0 skipped")


def test_cli_exits_1_when_an_adapter_fails(tmp_path, monkeypatch, capsys):
    """``--adapter module:object`` loads a port; one wrong method makes its cases FAIL and the exit status 1."""
    (tmp_path / "kink_port.py").write_text(textwrap.dedent("""
        import numpy as np
        from pyeqprop.conformance import PyeqpropAdapter

        class Port(PyeqpropAdapter):
            def hard_sigmoid_grad(self, u):  # torch.clamp's autograd convention: 1 at the kinks
                return ((u >= 0) & (u <= 1)).astype(np.float64)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = cli_main(["conformance", "--adapter", "kink_port:Port", "--vectors", str(VECTORS)])
    out = capsys.readouterr().out.splitlines()
    assert rc == 1
    assert [line.split()[1] for line in out if line.startswith("FAIL")] == ["hard_sigmoid_grad"]
    assert "1 failed" in out[-1]


def test_partial_adapter_skips_what_it_lacks(manifest):
    """An adapter with only ``conv2d`` passes the conv2d cases and skips the rest as not implemented."""
    class OnlyConv:
        conv2d = PyeqpropAdapter.conv2d

    results = run_conformance(OnlyConv(), VECTORS)
    conv = {n for n, e in manifest["cases"].items() if e["method"] == "conv2d"}
    assert {r.case for r in results if r.status == "pass"} == conv
    assert all(r.status == "skip" and "not implemented" in format_result(r) for r in results if r.case not in conv)


def test_float32_results_fail():
    """A port that computes in float32 fails even where its values are close: the protocol is float64."""
    class Float32(PyeqpropAdapter):
        def linear(self, x, w, b):
            return super().linear(x, w, b).astype(np.float32)

    results = run_conformance(Float32(), VECTORS, only={"linear_bias", "linear_nobias_batch1"})
    assert [r.status for r in results] == ["fail", "fail"]
    assert all("expected float64" in r.message for r in results)


# ----------------------------------------------------------------------------- (d) wrong adapters
def _pad_or_crop(a, axis, before, after):
    """Zero-pad (positive) or crop (negative) ``a`` along ``axis``."""
    sl = [slice(None)] * a.ndim
    sl[axis] = slice(max(-before, 0), a.shape[axis] - max(-after, 0))
    a = a[tuple(sl)]
    widths = [(0, 0)] * a.ndim
    widths[axis] = (max(before, 0), max(after, 0))
    return np.pad(a, widths)


def transpose_by_convolution(g, w, stride, padding, output_size, *, flip_padding=True):
    """conv2d_transpose as a convolution of the stride-dilated g with the flipped, transposed kernel,
    padded by k − 1 − p (``flip_padding=False``: by p, the classic bug; right only when p = k − 1 − p)."""
    n, o, ho, wo = g.shape
    _, c, kh, kw = w.shape
    gd = np.zeros((n, o, (ho - 1) * stride[0] + 1, (wo - 1) * stride[1] + 1))
    gd[:, :, ::stride[0], ::stride[1]] = g
    for axis, k, p, size in ((2, kh, padding[0], output_size[0]), (3, kw, padding[1], output_size[1])):
        pad = k - 1 - p if flip_padding else p
        extra = size - (gd.shape[axis] + 2 * pad - k + 1)  # PyTorch's output_padding when the padding is right
        gd = _pad_or_crop(gd, axis, pad, pad + extra)
    wf = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))  # (c, o, k_h, k_w)
    return ops.conv2d(gd, wf)


class TransposeWithoutFlippedPadding(PyeqpropAdapter):
    def conv2d_transpose(self, g, w, stride, padding, output_size):
        return transpose_by_convolution(g, w, stride, padding, output_size, flip_padding=False)


class UnpoolAssigns(PyeqpropAdapter):
    """max_unpool2d by assignment (as torch.nn.functional.max_unpool2d): a shared index keeps one value."""

    def max_unpool2d(self, y, indices, kernel_size, stride, output_size):
        n, c = y.shape[:2]
        z = np.zeros((n, c, output_size[0] * output_size[1]))
        np.put_along_axis(z, indices.reshape(n, c, -1), y.reshape(n, c, -1), axis=2)
        return z.reshape(n, c, *output_size)


class TiesToLast(PyeqpropAdapter):
    """max_pool2d that breaks ties towards the last maximum of the window (``>=`` instead of ``>``)."""

    def max_pool2d(self, x, kernel_size, stride):
        n, c, h, w = x.shape
        (kh, kw), (sh, sw) = kernel_size, stride
        ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
        i, j = np.arange(ho)[:, None], np.arange(wo)[None, :]
        y = np.full((n, c, ho, wo), -np.inf)
        idx = np.zeros((n, c, ho, wo), dtype=np.int64)
        for a in range(kh):
            for b in range(kw):
                v = x[:, :, a:a + sh * (ho - 1) + 1:sh, b:b + sw * (wo - 1) + 1:sw]  # (n, c, h', w')
                take = v >= y
                y = np.where(take, v, y)
                idx = np.where(take, (sh * i + a) * w + sw * j + b, idx)
        return y, idx


class InclusiveKinks(PyeqpropAdapter):
    def hard_sigmoid_grad(self, u):
        return ((u >= 0) & (u <= 1)).astype(np.float64)

    def half_hard_sigmoid_grad(self, u):
        return 0.5 * ((u >= 0) & (u <= 2)).astype(np.float64)


class DeltaAtFreeArgmax(PyeqpropAdapter):
    """The δ step (Eq. 4.8) with every max pool kept at s⁰'s argmax: Δu from the linear map at s⁰
    (``jacobian_vector`` at frozen argmaxes) plus the nudge at s⁰ + δ, the bug the argmax brackets fix."""

    def crnn_delta_step(self, spec, params, x, state, delta, y, beta):
        net = self._net(spec, params)
        s0 = list(state)
        plus = [a + d for a, d in zip(s0, delta)]
        free = net.drive(x, s0)
        du = net.jacobian_vector(list(delta), free.indices)
        force = [a - b for a, b in zip(net.drive(x, plus, net.nudge(x, y, beta)).u, net.drive(x, plus).u)]
        return [net.act.fn(u + d + f) - net.act.fn(u) for u, d, f in zip(free.u, du, force)]


def _transpose_bug_cases(manifest):
    out = set()
    for name, e in manifest["cases"].items():
        if e["method"] == "conv2d_transpose":
            k = e["arrays"]["inputs/w"]["shape"][2:]
            p = e["args"]["padding"]
            if any(p[i] != k[i] - 1 - p[i] for i in range(2)):
                out.add(name)
    return out


WRONG = {
    "transpose_padding_not_flipped": (TransposeWithoutFlippedPadding, _transpose_bug_cases),
    "unpool_assigns": (UnpoolAssigns, lambda m: {n for n, e in m["cases"].items()
                                                 if e["method"] == "max_unpool2d" and e["notes"]["shared_indices"]}),
    "ties_to_last": (TiesToLast, lambda m: {n for n, e in m["cases"].items()
                                            if e["method"] == "max_pool2d" and e["notes"]["tied_windows"]}),
    "inclusive_kinks": (InclusiveKinks, lambda m: {"hard_sigmoid_grad", "half_hard_sigmoid_grad"}),
    "delta_at_free_argmax": (DeltaAtFreeArgmax, lambda m: {n for n, e in m["cases"].items()
                                                           if e["method"] == "crnn_delta_step"
                                                           and e["notes"]["moved_argmaxes"]}),
}


@pytest.mark.parametrize("bug", sorted(WRONG))
def test_wrong_adapter_fails_exactly_the_right_cases(manifest, bug):
    """Each bug fails the cases that exercise it, with an error far above the tolerance, and nothing else."""
    cls, expected = WRONG[bug]
    want = expected(manifest)
    assert want, f"{bug}: no case exercises this bug"
    results = run_conformance(cls(), VECTORS)
    assert _failed(results) == sorted(want), "\n".join(format_result(r) for r in results if r.status == "fail")
    assert all(r.status == "pass" for r in results if r.case not in want)
    for r in results:
        if r.case in want and r.max_abs_error is not None and r.atol:
            assert r.max_abs_error > 1e6 * r.atol, format_result(r)


def test_transpose_by_flipped_convolution_is_right(manifest):
    """Positive control for the bug above: with the flipped padding k − 1 − p the same route passes."""
    class Right(PyeqpropAdapter):
        def conv2d_transpose(self, g, w, stride, padding, output_size):
            return transpose_by_convolution(g, w, stride, padding, output_size, flip_padding=True)

    names = {n for n, e in manifest["cases"].items() if e["method"] == "conv2d_transpose"}
    results = run_conformance(Right(), VECTORS, only=names)
    assert len(results) == len(names) and all(r.status == "pass" for r in results), \
        "\n".join(format_result(r) for r in results)
    assert _transpose_bug_cases(manifest) < names  # some cases have p = k − 1 − p, some do not


def test_manifest_is_plain_json():
    """The manifest parses with the standard library alone and names one npz per case."""
    m = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))
    assert m["format"] == "pyeqprop-conformance/1" and m["dtype"] == "float64"
    assert all(e["file"] == f"{name}.npz" for name, e in m["cases"].items())
