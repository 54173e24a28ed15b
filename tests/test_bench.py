"""The benchmark commands honour their flags (backend, dtype, quick, peer, threads) and count FLOPs right.

Timings themselves are never asserted (the machine is shared): only what the table says it measured.
"""
from __future__ import annotations

import pytest

from pyeqprop.bench.ep import ep_step_flops
from pyeqprop.cli import main


def test_bench_ops_runs_on_the_backend_and_dtype_asked_for(capsys):
    assert main(["bench", "ops", "--quick", "--repeats", "1", "--backend", "array_api_strict",
                 "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "backend array_api_strict, float64, batch 4" in out
    assert "float64 GEMM (256x256 matmul)" in out
    assert "torch" not in out.split("\n", 3)[2]  # no peer line without --peer
    rows = [line for line in out.splitlines() if line.startswith("q")]
    assert len(rows) == 10 and all(line.split()[-1] == "-" for line in rows)  # no "vs torch" without the peer


def test_bench_ops_times_the_torch_peer_when_asked(capsys):
    pytest.importorskip("torch")  # the test extra installs it
    assert main(["bench", "ops", "--quick", "--repeats", "1", "--peer", "torch", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "interleaved with torch" in out and "threads used 1" in out and "cpu, 1 threads" in out
    rows = [line for line in out.splitlines() if line.startswith("q")]
    assert all(float(line.split()[-1]) > 0 for line in rows)


def test_bench_ops_rejects_an_unknown_backend(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "ops", "--backend", "jax"])
    assert e.value.code == 2
    assert "invalid choice: 'jax'" in capsys.readouterr().err


def test_bench_ep_reports_one_and_two_threads_and_the_floor(capsys):
    assert main(["bench", "ep", "--quick", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("digits") and len(line.split()) == 12]
    assert [r[4] for r in rows] == ["1", "2"]
    assert rows[0][6] == "-" and rows[1][6] != "-"  # the BLAS-threaded contender exists at 2 threads only
    assert all(0 < float(r[11]) for r in rows)  # floor / ours


def test_ep_step_flops_counts_each_product():
    """c4m-c6m on 1×8×8, n = 2: F_1 = 2·2·8·8·9·1·4, F_2 = 2·2·4·4·9·4·6 (Eq. 2.1's products); B_1 once,
    2F_2 per step for T1 + 2T2 steps, the two phases' argmax at layer 2 (2F_2), one weight pass at layer 1 and
    two at layer 2."""
    F1, F2 = 2 * 2 * 8 * 8 * 9 * 1 * 4, 2 * 2 * 4 * 4 * 9 * 4 * 6
    T1, T2 = 7, 3
    assert ep_step_flops("c4m-c6m", (1, 8, 8), 2, T1, T2) == F1 + (T1 + 2 * T2) * 2 * F2 + 2 * F2 + F1 + 2 * F2


def test_bench_precision_tells_the_two_nudged_forms_apart_on_the_deep_net():
    """The precision bench's deep case (ω = 0.1, SPEC 3.18): with nudged phases in s, float32 rounding is
    all of conv1's estimate (error above its own size); in δ = s − s⁰ (Eq. 4.8) what is left is the float32
    run's own settling (free phase and δ to 3e-7, against 1e-10 in float64), at least 1000 times smaller
    there. No rounding bound applies to that remainder: the two dtypes settle to different tolerances."""
    from pyeqprop.bench.precision import CASES, precision_table

    arch, shape, _, network = CASES["digits-8conv"]
    state, _ = precision_table(arch, shape, 8, nudged="state", network=network)
    diff, phases = precision_table(arch, shape, 8, nudged="difference", network=network)
    assert all(c for ph in phases.values() for _, c, _ in ph)
    assert state["conv1.weight"] > 1.0
    assert diff["conv1.weight"] < 1e-3 * state["conv1.weight"]
