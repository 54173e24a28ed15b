"""`pyeqprop study depth`: the table, the figures and the per-layer gradients it writes (a tiny run)."""
from __future__ import annotations

import json

from pyeqprop.cli import main


def test_depth_study_writes_table_and_figures(tmp_path):
    out = tmp_path / "study"
    rc = main(["study", "depth", "--epochs", "1", "--teacher-epochs", "1", "--T1", "6", "--T2", "3",
               "--shallow", "c4m", "--deep", "c4-c4m-c4-c4", "--settings", "ep,ep+local,bptt", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    settings = {(r["depth"], r["setting"]) for r in rows}
    for depth in ("shallow", "deep"):
        for s in ("ep", "ep+local", "bptt", "teacher (backprop, feed-forward)"):
            assert (depth, s) in settings
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["seconds"] >= 0.0
    # per-layer gradient magnitudes: one value per conv layer, for every setting incl. BPTT (Eq. 5.4)
    assert len(res["layer_grads"]["deep"]["ep"]) == 4
    assert len(res["layer_grads"]["shallow"]["bptt"]) == 1
    # Eq. 4.5's delay: with T2 = 3 the output nudge reaches s_2 of the 4-layer net but not s_1, so
    # plain EP gives conv1 exactly nothing, while a local head on s_1 and BPTT over T1 = 6 steps do
    deep = res["layer_grads"]["deep"]
    assert deep["ep"][0] == 0.0 and deep["ep"][1] > 0.0
    assert deep["ep+local"][0] > 0.0 and deep["bptt"][0] > 0.0
    table = (out / "results.md").read_text()
    assert table.startswith("| depth |") and "ep+local" in table
    for name in ("curves.png", "layer_grads.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_depth_study_rejects_unknown_setting(tmp_path, capsys):
    rc = main(["study", "depth", "--settings", "ep,magic", "--out", str(tmp_path / "s")])
    assert rc == 2
    assert "magic" in capsys.readouterr().err
