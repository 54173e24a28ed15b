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
