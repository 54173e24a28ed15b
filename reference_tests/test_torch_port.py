"""A worked example port (``reference_tests/ports/torch_port.py``, PyTorch) passes the conformance vectors.

The port is written from SPEC.md without importing pyeqprop: primitives through
``torch.nn.functional``, Φ in torch ops with ∂Φ/∂s and ∂Φ/∂θ by autograd, EP (free phase,
nudged phases, Eqs. 4.1-4.3), BPTT by autograd through the unrolled dynamics (Eqs. 5.1-5.4),
the costs of §6 and the teacher of §7. It implements every protocol method, so every case
must pass. The last test shows that the two PyTorch conveniences a port is tempted by
(``F.max_unpool2d``, the autograd of ``clamp``) break the cases built to catch them.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the example port needs PyTorch")

from pyeqprop.conformance import default_vectors_dir, format_result, load_manifest, run_conformance  # noqa: E402

HERE = Path(__file__).resolve().parent
VECTORS = default_vectors_dir()


def _load_port():
    spec = importlib.util.spec_from_file_location("torch_port", HERE / "ports" / "torch_port.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


port = _load_port()


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors are tiny: one intra-op thread is ~30× faster than several on a loaded 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_torch_port_passes_every_case():
    """Every case (primitives, Φ, steps, settling, the three EP estimators, BPTT, costs, teacher) passes."""
    results = run_conformance(port.ADAPTER, VECTORS)
    assert len(results) == len(load_manifest(VECTORS)["cases"])
    bad = [format_result(r) for r in results if r.status != "pass"]
    assert not bad, "\n".join(bad)
    # an independent implementation sums in another order: its errors are nonzero but within the bounds
    assert any(r.max_abs_error > 0 for r in results)


def test_torch_conveniences_fail_the_cases_built_for_them():
    """F.max_unpool2d overwrites shared indices; clamp's autograd gives ρ' = 1 at the kinks: both fail."""
    F = torch.nn.functional
    manifest = load_manifest(VECTORS)

    class Naive(port.TorchPort):
        def max_unpool2d(self, y, indices, kernel_size, stride, output_size):
            z = F.max_unpool2d(torch.from_numpy(y), torch.from_numpy(indices), kernel_size, stride,
                               output_size=output_size)
            return z.numpy()

        def hard_sigmoid_grad(self, u):
            t = torch.from_numpy(u).requires_grad_(True)
            (g,) = torch.autograd.grad(torch.clamp(t, 0.0, 1.0).sum(), t)
            return g.numpy()

    names = {n for n, e in manifest["cases"].items() if e["method"] in ("max_unpool2d", "hard_sigmoid_grad")}
    results = run_conformance(Naive(), VECTORS, only=names)
    failed = sorted(r.case for r in results if r.status == "fail")
    want = sorted(n for n in names if n == "hard_sigmoid_grad" or manifest["cases"][n]["notes"]["shared_indices"])
    assert failed == want, "\n".join(format_result(r) for r in results)
    assert np.all([r.status == "pass" for r in results if r.case not in want])
