"""`pyeqprop study depth`: the table, the figures and the per-layer gradients it writes (a tiny run)."""
from __future__ import annotations

import json
import math

import pytest

from _cifar_fixtures import make_tiny_cifar
from pyeqprop.cli import main


def test_depth_study_writes_table_and_figures(tmp_path):
    out = tmp_path / "study"
    # fixed step counts of the synchronous schedule on the plain network (ω = 1), so that the delay of
    # Eq. 4.5 below holds exactly
    rc = main(["study", "depth", "--epochs", "2", "--teacher-epochs", "1", "--T1", "6", "--T2", "3",
               "--schedule", "synchronous", "--settle-tol", "0", "--feedback", "1", "--weight-scale", "2",
               "--lr-grid", "none", "--shallow", "c4m", "--deep", "c4-c4m-c4-c4", "--settings", "ep,ep+local,bptt",
               "--seeds", "0,1", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["feedback"] == 1.0 and res["config"]["schedule"] == "synchronous"
    import numpy as np  # the versions the float32 numbers depend on are recorded with them
    assert res["environment"]["numpy"] == np.__version__ and res["environment"]["python"].count(".") == 2
    rows = res["rows"]
    settings = {(r["depth"], r["setting"]) for r in rows}
    for depth in ("shallow", "deep"):
        for s in ("ep", "ep+local", "bptt", "teacher (backprop, feed-forward)"):
            assert (depth, s) in settings
    for r in rows:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["seconds"] >= 0.0
    assert sorted({r["seed"] for r in rows}) == [0, 1] and len(rows) == 2 * 2 * 4
    # the summary is the mean and sample std over the two seeds, per (depth, setting)
    summary = {(r["depth"], r["setting"]): r for r in res["summary"]}
    assert len(summary) == 8
    for (depth, setting), line in summary.items():
        vals = [r["test_acc"] for r in rows if (r["depth"], r["setting"]) == (depth, setting)]
        assert line["seeds"] == 2
        assert abs(line["test_acc"] - (vals[0] + vals[1]) / 2) <= 1e-12
        assert abs(line["test_acc_std"] - abs(vals[0] - vals[1]) / 2 ** 0.5) <= 1e-12
    # per-layer gradient magnitudes: one value per conv layer, for every setting incl. BPTT (Eq. 5.4)
    assert len(res["layer_grads"]["deep"]["ep"]) == 4
    assert len(res["layer_grads"]["shallow"]["bptt"]) == 1
    # first-epoch means. Eq. 4.5's delay: with T2 = 3 the output nudge reaches s_2 of the 4-layer
    # net but not s_1, so plain EP gives conv1 exactly nothing in every batch, while a local head
    # on s_1 (silent at its zero start, nonzero once it has learned) and BPTT over T1 = 6 steps do
    deep = res["layer_grads"]["deep"]
    assert deep["ep"][0] == 0.0 and deep["ep"][1] > 0.0
    assert deep["ep+local"][0] > 0.0 and deep["bptt"][0] > 0.0
    # plain EP against BPTT at init: with T2 = 3, conv1 of the deep net gets nothing (ratio 0), the
    # top conv layer a nonzero estimate; cosines are cosines
    agree = res["ep_vs_bptt_at_init"]["deep"]
    assert len(agree["cos"]) == len(agree["ratio"]) == 4
    assert agree["ratio"][0] == 0.0 and agree["ratio"][3] > 0.0
    assert all(-1.0 - 1e-12 <= c <= 1.0 + 1e-12 for c in agree["cos"] + agree["cos_exact"])
    # the same comparison against the equilibrium gradient (Eq. 5.7): conv1 again gets nothing from EP
    assert len(agree["cos_exact"]) == len(agree["ratio_exact"]) == 4 and agree["ratio_exact"][0] == 0.0
    assert isinstance(agree["exact_converged"], bool)
    # paired differences to the exact gradient (BPTT here), per seed and then mean ± std
    by = {(r["depth"], r["setting"], r["seed"]): r for r in rows}
    paired = {(p["depth"], p["setting"]): p for p in res["paired"]}
    assert set(paired) == {(d, s) for d in ("shallow", "deep")
                           for s in ("ep", "ep+local", "teacher (backprop, feed-forward)")}
    for (depth, setting), p in paired.items():
        diffs = [by[(depth, setting, k)]["test_acc"] - by[(depth, "bptt", k)]["test_acc"] for k in (0, 1)]
        assert p["reference"] == "bptt" and p["seeds"] == 2
        assert abs(p["test_acc_diff"] - sum(diffs) / 2) <= 1e-12
        assert abs(p["test_acc_diff_std"] - abs(diffs[0] - diffs[1]) / 2 ** 0.5) <= 1e-12
        higher = sum(by[(depth, setting, k)]["train_loss"] > by[(depth, "bptt", k)]["train_loss"] for k in (0, 1))
        assert p["train_loss_higher"] == higher
    # every run's per-layer |g| per epoch (the curves of layer_grads_epochs.png), its last validation accuracy
    for r in rows:
        if r["setting"] != "teacher (backprop, feed-forward)":
            assert len(r["layer_grads"]) == 2 and len(r["layer_grads"][0]) == (4 if r["depth"] == "deep" else 1)
            assert 0.0 <= r["val_acc"] <= 1.0 and math.isfinite(r["val_loss"]) and r["val_loss"] > 0.0
    for (depth, setting), line in summary.items():
        if not setting.startswith("teacher"):
            vals = [r["val_loss"] for r in rows if (r["depth"], r["setting"]) == (depth, setting)]
            assert abs(line["val_loss"] - (vals[0] + vals[1]) / 2) <= 1e-12
    table = (out / "results.md").read_text()
    assert table.startswith("| depth |") and "ep+local" in table and " ± " in table and "Δ test accuracy" in table
    for name in ("curves.png", "layer_grads.png", "layer_grads_epochs.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_check_at_init_runs_bptt_with_the_runs_schedule():
    """``ep_bptt_agreement``'s BPTT (Eq. 5.4) takes T1 steps of the run's schedule, Gauss–Seidel here (Eq. 5.6):
    with 4 fixed steps, far from a fixed point, the synchronous schedule's gradient is another one."""
    import dataclasses

    import numpy as np

    from pyeqprop.learning.bptt import bptt
    from pyeqprop.learning.compare import cosine_and_ratio
    from pyeqprop.learning.estimators import ep_estimate
    from pyeqprop.study.depth import SETTINGS, ep_bptt_agreement
    from pyeqprop.train.config import TrainConfig
    from pyeqprop.train.data import prepare_data
    from pyeqprop.train.student import build_student

    cfg = dataclasses.replace(TrainConfig(), arch="c4-c4m-c4", schedule="gauss-seidel", settle_tol=0.0, T1=4, T2=2,
                              beta=0.1, feedback=1.0, weight_scale=2.0, dtype="float64")
    data = prepare_data(cfg, np)
    got = ep_bptt_agreement(cfg, data, np, batch=8)
    c = dataclasses.replace(cfg, **SETTINGS["ep"])
    net = build_student(c, data.input_shape, data.num_classes, np)
    xb, yb = data.x_train[:8, ...], data.y_train[:8]
    g_ep = ep_estimate(net, xb, yb, beta=c.beta, T1=c.T1, T2=c.T2, estimator=c.estimator, settling=c.settling).grads
    convs = [layer.weight for layer in net.layers if layer.kind == "conv"]
    by = {sched: [cosine_and_ratio(g_ep[k], bptt(net, xb, yb, T=4, schedule=sched).grads[k], undefined=0.0)
                  for k in convs] for sched in ("gauss-seidel", "synchronous")}
    assert got["ratio"] == pytest.approx([r for _, r in by["gauss-seidel"]], rel=1e-12)
    assert got["cos"] == pytest.approx([q for q, _ in by["gauss-seidel"]], rel=1e-12)
    assert got["ratio"] != pytest.approx([r for _, r in by["synchronous"]], rel=1e-3)


def test_the_distillation_variants_are_one_option_from_ep_plus_kd():
    """Each design of SPEC (6.1) lower, (6.8), (6.9) changes one option of EP + distillation, so
    the study's comparison is of that option alone."""
    from pyeqprop.study.depth import SETTINGS

    for name, change in {"ep+kd-lower": {"kd_layers": "lower"}, "ep+kd-cosine": {"kd_schedule": "cosine"},
                         "ep+kd-std": {"kd_targets": "standardised"}}.items():
        assert SETTINGS[name] == {**SETTINGS["ep+kd"], **change}, name


def test_depth_study_rejects_unknown_setting(tmp_path, capsys):
    rc = main(["study", "depth", "--settings", "ep,magic", "--out", str(tmp_path / "s")])
    assert rc == 2
    assert "magic" in capsys.readouterr().err


def test_depth_study_in_worker_processes(tmp_path, capfd):
    """--jobs 2: the runs go to two spawned processes; rows keep the depth, seed, setting order; each
    worker prints its run's epoch lines, tagged with the run, to the study's stdout."""
    out = tmp_path / "study"
    rc = main(["study", "depth", "--epochs", "1", "--teacher-epochs", "1", "--T1", "6", "--T2", "3",
               "--schedule", "synchronous", "--settle-tol", "0", "--feedback", "1", "--weight-scale", "2",
               "--lr-grid", "none", "--arch", "c4-c4m-c4-c4", "--settings", "ep,ep+local", "--jobs", "2",
               "--seeds", "0", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["setting"] for r in res["rows"]] == ["teacher (backprop, feed-forward)", "ep", "ep+local"]
    deep = res["layer_grads"]["deep"]
    assert deep["ep"][0] == 0.0 and deep["ep+local"][0] > 0.0  # Eq. 4.5's delay, as in the run above
    assert all((out / "runs" / f"deep-s0-{s}" / "metrics.jsonl").exists() for s in ("ep", "ep+local"))
    printed = capfd.readouterr().out
    assert all(f"[deep, seed 0] {s}: epoch   1/1  train loss" in printed for s in ("ep", "ep+local"))
    import os  # the BLAS threads recorded: one share of the cores per worker, every core for the teacher (here)
    cpus, set_ = os.cpu_count() or 1, os.environ.get("OPENBLAS_NUM_THREADS")
    env = res["environment"]
    assert (env["blas_threads"], env["teacher_blas_threads"]) == ((set_, set_) if set_ else
                                                                  (str(max(1, cpus // 2)), f"all ({cpus})"))


def test_depth_study_chooses_each_settings_rate_on_the_validation_split(tmp_path):
    """--lr-grid: every setting trains on the first seed at each rate; each seed then runs at the rate with
    the best final validation accuracy (ties: lower train loss, then the smaller rate), the first seed's
    row being that tuning run; the test accuracy plays no part."""
    out = tmp_path / "study"
    rc = main(["study", "depth", "--epochs", "2", "--teacher-epochs", "1", "--T1", "20", "--T2", "10",
               "--arch", "c4-c4m", "--settings", "ep,implicit", "--lr-grid", "0.002,0.2", "--lr-bottom", "1",
               "--seeds", "0,1",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    tuning = res["tuning"]
    assert sorted((r["setting"], r["lr"], r["seed"]) for r in tuning) == [
        ("ep", 0.002, 0), ("ep", 0.2, 0), ("implicit", 0.002, 0), ("implicit", 0.2, 0)]
    chosen = {c["setting"]: c["lr"] for c in res["chosen_lr"]}
    for name in ("ep", "implicit"):
        runs = [r for r in tuning if r["setting"] == name]
        best = sorted(runs, key=lambda r: (-r["val_acc"], r["train_loss"], r["lr"]))[0]
        assert chosen[name] == best["lr"]
        rows = {r["seed"]: r for r in res["rows"] if r["setting"] == name}
        assert rows[0]["lr"] == rows[1]["lr"] == best["lr"]
        assert rows[0]["test_acc"] == best["test_acc"] and rows[0]["curve"] == best["curve"]  # the tuning run
        assert (out / "runs" / "tune" / f"deep-s0-{name}-lr{best['lr']:g}" / "metrics.jsonl").exists()
        assert (out / "runs" / f"deep-s1-{name}" / "metrics.jsonl").exists()
    assert len({r["lr"] for r in tuning}) == 2  # the rates differ, so the choice could go either way


def test_depth_study_tries_a_smaller_rate_on_the_bottom_layers(tmp_path):
    """--lr-bottom 1,0.1: every rate of the grid is tried as it is and with the bottom --bottom-layers conv
    layers' rates times 0.1 (Eq. 8.3, one rate per layer); the chosen pair is the best on validation."""
    from pyeqprop.study.depth import layer_rates
    from pyeqprop.train.config import TrainConfig

    cfg = TrainConfig(arch="c4-c4m-c4-f5")
    assert layer_rates(cfg, (1, 8, 8), 10, 0.05, 0.1, 2) == [0.05 * 0.1, 0.05 * 0.1, 0.05, 0.05, 0.05]
    assert layer_rates(cfg, (1, 8, 8), 10, 0.05, 1.0, 2) == [0.05]
    out = tmp_path / "study"
    rc = main(["study", "depth", "--epochs", "1", "--teacher-epochs", "1", "--T1", "10", "--T2", "5",
               "--arch", "c4-c4m-c4", "--settings", "ep", "--lr-grid", "0.05", "--lr-bottom", "1,0.1",
               "--bottom-layers", "1", "--seeds", "0,1", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert sorted(r["lr_bottom"] for r in res["tuning"]) == [0.1, 1.0]
    best = sorted(res["tuning"], key=lambda r: (-r["val_acc"], r["train_loss"], r["lr"], r["lr_bottom"]))[0]
    (chosen,) = res["chosen_lr"]
    assert (chosen["lr"], chosen["lr_bottom"], chosen["bottom_layers"]) == (0.05, best["lr_bottom"], 1)
    seed1 = next(r for r in res["rows"] if r["setting"] == "ep" and r["seed"] == 1)
    assert seed1["lr_bottom"] == best["lr_bottom"]
    import tomllib

    saved = tomllib.loads((out / "runs" / "deep-s1-ep" / "config.toml").read_text())["lr"]
    assert saved == ([0.05 * 0.1, 0.05, 0.05, 0.05] if best["lr_bottom"] == 0.1 else [0.05])


@pytest.mark.parametrize("flag, value", [("--seeds", "0,x"), ("--seeds", "1,1"), ("--seeds", ","),
                                         ("--jobs", "0"), ("--lr-grid", "0.1,x"), ("--lr-grid", "0.1,0.1"),
                                         ("--lr-grid", "0,0.1"), ("--lr-bottom", "1,x"),
                                         ("--bottom-layers", "0")])
def test_depth_study_rejects_bad_seeds_and_jobs(tmp_path, capsys, flag, value):
    rc = main(["study", "depth", flag, value, "--out", str(tmp_path / "s")])
    assert rc == 2
    err = capsys.readouterr().err
    assert value in err and flag in err


def test_paper_scale_command_on_a_tiny_cifar10_archive(tmp_path, monkeypatch):
    """`--dataset cifar10 --arch vgg11` (here at 1/32 width) reads the CIFAR archive in its real format."""
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    monkeypatch.setenv("PYEQPROP_DATA", str(tmp_path / "empty"))
    root = tmp_path / "data"
    root.mkdir()
    make_tiny_cifar("cifar10").write_archive(root)
    out = tmp_path / "study"
    rc = main(["study", "depth", "--dataset", "cifar10", "--data-root", str(root), "--arch", "vgg11/32",
               "--epochs", "1", "--teacher-epochs", "1", "--T1", "3", "--T2", "2", "--seeds", "0",
               "--settings", "ep,ep+local+kd", "--lr-grid", "none", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["depths"] == {"deep": "vgg11/32"} and res["config"]["dataset"] == "cifar10"
    assert [r["setting"] for r in res["rows"]] == ["teacher (backprop, feed-forward)", "ep", "ep+local+kd"]
    assert len(res["layer_grads"]["deep"]["ep"]) == 8  # VGG-11's eight conv layers
