"""The training application's products: the run folder, its config.toml and metrics, evaluation of a run,
the progress bar, and the guard against mixing two runs in one folder.

Jobs are tiny (synthetic 8×8 images, 4 batches of 64, one conv layer, T1 = 5).
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from pyeqprop.cli import main
from pyeqprop.train.checkpoint import load_checkpoint
from pyeqprop.train.config import ConfigError, TrainConfig, config_from_mapping, dump_toml, load_toml
from pyeqprop.train.errors import TrainingError
from pyeqprop.train.evaluate import evaluate_run
from pyeqprop.train.loop import METRIC_KEYS, train
from pyeqprop.train.student import build_network
from pyeqprop.train.progress import ProgressBar

TINY = dict(dataset="synthetic", arch="c4m", T1=5, T2=2, epochs=2, teacher_epochs=1, batch_size=64,
            progress="none")


def quiet(*args, **kwargs):
    pass


def tiny(out, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "out": str(out), **overrides})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("app") / "run"
    res = train(tiny(path), log=quiet)
    assert not res.interrupted
    return path


def rows(run):
    return [json.loads(line) for line in Path(run, "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------- the run folder
def test_run_folder_holds_config_metrics_checkpoints_teacher_and_curves(run):
    names = {p.name for p in run.iterdir()}
    assert {"config.toml", "metrics.jsonl", "latest.npz", "best.npz", "teacher.npz", "curves.png"} <= names
    assert not [n for n in names if n.startswith(".")], names  # no temporary files left behind


def test_config_toml_reloads_to_the_same_config(run):
    assert config_from_mapping(load_toml(run / "config.toml")) == tiny(run)


def test_config_toml_round_trip_of_awkward_values(tmp_path):
    # strings needing escapes, non-ASCII, a per-layer rate list, tiny and negative numbers
    cfg = tiny(tmp_path / 'out "quoted" \\ back\tslash ü', lr=[0.25, 1e-7, 3.0], lr_min=1e-12,
               cosine_epochs=-1, kd_layers="1,2", teacher="C:\\teachers\\t.npz", weight_decay=5e-4,
               augment=True, T_eval=0, beta=0.125)
    path = tmp_path / "c.toml"
    path.write_text(dump_toml(cfg), encoding="utf-8")
    assert config_from_mapping(load_toml(path)) == cfg


def test_metrics_have_the_documented_keys_one_line_per_epoch(run):
    lines = rows(run)
    assert [r["epoch"] for r in lines] == [1, 2]
    for r in lines:
        assert tuple(r) == METRIC_KEYS
        assert 0.0 <= r["train_acc"] <= 1.0 and 0.0 <= r["test_acc"] <= 1.0
        scalars = [k for k in METRIC_KEYS if k not in ("grad_mean_abs", "steps_free", "steps_nudged",
                                                       "unconverged_free", "unconverged_nudged", "skipped_updates",
                                                       "saturated_free", "skipped_asymmetric", "asymmetry_max",
                                                       "kd_weights", "steps_solve", "unsolved")]
        assert all(math.isfinite(r[k]) for k in scalars)
        # fixed step counts (settle_tol = 0): every phase took exactly T1 / T2 steps, no tolerance to miss
        assert r["steps_free"] == {"min": 5, "median": 5.0, "p90": 5.0, "max": 5}
        assert r["steps_nudged"] == {"min": 2, "median": 2.0, "p90": 2.0, "max": 2}
        assert r["unconverged_free"] is None and r["unconverged_nudged"] is None and r["skipped_updates"] is None
        assert r["steps_solve"] is None and r["unsolved"] is None  # no equilibrium-gradient solve (Eq. 5.7)
        # the learning signal per neuron layer: the epoch's mean of mean |g| over its weight tensor
        assert list(r["grad_mean_abs"]) == ["conv1.weight"]
        assert math.isfinite(r["grad_mean_abs"]["conv1.weight"]) and r["grad_mean_abs"]["conv1.weight"] > 0.0
        # the saturated fractions of the free states per neuron layer (Eq. 3.19): fractions of one count
        sat = r["saturated_free"]
        assert list(sat) == ["conv1"]
        assert 0.0 <= sat["conv1"]["low"] and 0.0 <= sat["conv1"]["high"]
        assert sat["conv1"]["low"] + sat["conv1"]["high"] <= 1.0
        # the symmetric estimator's response asymmetry (Eq. 4.9): the epoch's largest a_l per neuron layer;
        # the check is off (asymmetry_limit 0), so nothing is skipped for it
        assert list(r["asymmetry_max"]) == ["conv1"] and 0.0 <= r["asymmetry_max"]["conv1"] < math.inf
        assert r["skipped_asymmetric"] is None
    # the cosine schedule over 2 epochs: the full rate, then the midpoint between lr and lr_min
    cfg = tiny(run)
    assert lines[0]["lr"] == cfg.lr[0]
    assert lines[1]["lr"] == pytest.approx(cfg.lr_min + 0.5 * (cfg.lr[0] - cfg.lr_min), rel=1e-12)


def test_checkpoints_hold_the_position_history_and_config(run):
    latest = load_checkpoint(run / "latest.npz")
    best = load_checkpoint(run / "best.npz")
    assert latest.progress["position"] == {"epoch": 2, "batch": 0}
    assert [h["epoch"] for h in latest.progress["history"]] == [1, 2]
    assert config_from_mapping(latest.config) == tiny(run)
    accs = [r["val_acc"] for r in rows(run)]
    best_epoch = 1 + int(np.argmax(accs))  # the first epoch reaching the best validation accuracy
    assert best.progress["position"] == {"epoch": best_epoch, "batch": 0}
    assert best.progress["best_val_acc"] == max(accs)


def test_curves_png_is_a_png(run):
    pytest.importorskip("matplotlib")
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- evaluation
def test_evaluate_reproduces_the_recorded_test_accuracy(run):
    lines = rows(run)
    assert evaluate_run(run / "latest.npz", log=quiet) == lines[-1]["test_acc"]
    best = lines[int(np.argmax([r["val_acc"] for r in lines]))]  # a folder: its best.npz, chosen on validation
    assert evaluate_run(run, log=quiet) == best["test_acc"]


def test_cli_evaluate_prints_the_last_epochs_test_accuracy(run, capsys):
    last = rows(run)[-1]["test_acc"]
    assert main(["evaluate", str(run / "latest.npz")]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {100 * last:.2f}%" in out
    assert main(["evaluate", str(run)]) == 0
    out = capsys.readouterr().out
    best = rows(run)[int(np.argmax([r["val_acc"] for r in rows(run)]))]
    assert f"test accuracy {100 * best['test_acc']:.2f}% on the test split" in out
    assert "best.npz (best on the validation split, epoch " in out


def test_cli_train_prints_the_final_test_accuracy(tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["train", "--dataset", "synthetic", "--arch", "c4m", "--T1", "5", "--T2", "2", "--epochs", "1",
               "--teacher-epochs", "1", "--batch-size", "64", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    acc = rows(out)[-1]["test_acc"]
    assert f"test accuracy: EP student {100 * acc:.2f}%" in text
    assert "backprop teacher" in text


# ---------------------------------------------------------------------- one run per folder
def test_a_new_run_refuses_a_folder_holding_a_run(run):
    before = (run / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run.*--resume"):
        train(tiny(run), log=quiet)
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_failed_resume_leaves_the_run_folder_untouched(run, tmp_path):
    from pyeqprop.train.checkpoint import CheckpointError

    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(CheckpointError, match="conv1.weight"):
        train(dataclasses.replace(tiny(run), arch="c8m"), resume=run, log=quiet)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


# ---------------------------------------------------------------------- progress bar
def test_progress_bar_draws_batches_loss_accuracy_and_residual():
    stream = io.StringIO()
    bar = ProgressBar(4, desc="epoch 1/2", mode="bar", stream=stream)
    bar.update(2, loss=0.123456, acc=0.5, residual=1.5e-3, force=True)
    text = stream.getvalue()
    assert text.startswith("\repoch 1/2 [")
    assert "2/4" in text and "loss 0.1235" in text and "acc  50.0%" in text and "res 1.5e-03" in text
    assert "#" * 12 + "." * 12 in text  # half of the 24-character bar
    bar.update(4, loss=0.1, acc=1.0, residual=0.0)  # the last batch is always drawn
    assert "4/4" in stream.getvalue() and "#" * 24 in stream.getvalue()
    bar.close()
    assert stream.getvalue().endswith("\r")


@pytest.mark.parametrize("mode", ["none", "auto"])  # auto: a StringIO is not a terminal
def test_progress_bar_silent_when_off_or_not_a_terminal(mode):
    stream = io.StringIO()
    bar = ProgressBar(4, mode=mode, stream=stream)
    bar.update(4, loss=0.1, acc=1.0, residual=0.0, force=True)
    bar.close()
    assert stream.getvalue() == ""


def test_training_with_progress_bar_draws_on_stderr(tmp_path, capsys):
    train(tiny(tmp_path / "bar", epochs=1, progress="bar"), log=quiet)
    err = capsys.readouterr().err
    assert "epoch 1/1 [" in err and "3/3" in err and "loss " in err and "res " in err  # 183 samples, batch 64


def test_gradient_agreement_of_a_run_against_the_equilibrium_gradient(tmp_path, capsys):
    """`pyeqprop evaluate RUN --gradients N`: per batch and layer, the run's estimator against Eq. 5.7.
    A run whose estimator is the equilibrium gradient itself (float64, settled to 1e-10) must agree
    with the float64 reference to the solve's and the settling's accuracy; a fixed-count EP run gives
    cosines, each a cosine."""
    from pyeqprop.train.evaluate import gradient_agreement

    exact = tmp_path / "exact"
    train(tiny(exact, dtype="float64", estimator="implicit", settle_tol=1e-10, T1=400, epochs=1), log=quiet)
    rows_ = gradient_agreement(exact, batches=2, log=quiet)
    assert [r["batch"] for r in rows_] == [0, 1] and all(r["converged"] for r in rows_)
    for r in rows_:
        for cos, ratio in r["layers"].values():
            assert cos >= 1 - 1e-8 and abs(ratio - 1) <= 1e-6
    assert all(r["asymmetry"] == {} and r["estimate_converged"] for r in rows_)  # no nudged phases (Eq. 4.9)
    ep = tmp_path / "ep"
    train(tiny(ep, epochs=1), log=quiet)
    assert main(["evaluate", str(ep), "--gradients", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("batch 0: conv1.weight cos ") and " ratio " in out and " asymmetry max " in out


def test_an_implicit_run_records_its_solves_and_skips_the_unsolved_ones(tmp_path):
    """The implicit estimator's conjugate-gradient solve (Eq. 5.7) is reported like a phase: metrics.jsonl's
    steps_solve and unsolved. At weight scale 2 the two-layer net's solves all reach their tolerance; at
    scale 4 its free phase does not settle in T1 = 5 steps and A = I − D^{1/2} H D^{1/2} there is not positive
    definite, so every solve stops on negative curvature: with unconverged = "skip" no update is applied
    (Eq. 3.14's rule, extended to the solve), with "apply" every one is."""
    from pyeqprop.train.checkpoint import load_checkpoint

    def one(name, scale, policy):
        out = tmp_path / name
        train(tiny(out, arch="c4-c4m", estimator="implicit", dtype="float64", epochs=1, weight_scale=scale,
                   unconverged=policy), log=quiet)
        (r,) = rows(out)
        return r, load_checkpoint(out / "latest.npz").optimizer_state["steps"]

    r, steps = one("settles", 2.0, "skip")
    assert r["unsolved"] == 0.0 and r["skipped_updates"] == 0.0 and steps == 3  # 183 samples, batch 64
    assert r["steps_solve"]["min"] >= 2, r["steps_solve"]  # two coupled layers: more than one iteration
    r, steps = one("indefinite", 4.0, "skip")
    assert r["unsolved"] == 1.0 and r["skipped_updates"] == 1.0 and steps == 0, r
    assert r["steps_solve"]["max"] < 1000  # stopped on curvature, not at the iteration cap
    r, steps = one("applied", 4.0, "apply")
    assert r["unsolved"] == 1.0 and r["skipped_updates"] == 0.0 and steps == 3, r


def test_gradient_agreement_reports_the_response_asymmetry_of_a_settled_symmetric_run(tmp_path):
    """`--gradients` with the symmetric estimator gives a_l of Eq. 4.9 per neuron layer. Settled in
    float64 at β = 0.01, the responses are ±β v + β² w + O(β³), so a_l = β‖w‖/‖v‖ + O(β²): it stays
    below 0.5 unless ‖w‖/‖v‖ ≥ 50. The inverted ratio ‖δ⁺ − δ⁻‖/‖δ⁺ + δ⁻‖ would be ≥ 2, and a
    missing pair would give no entries. The estimate there is the gradient to O(β²): cosine ≥ 0.99."""
    from pyeqprop.train.evaluate import gradient_agreement

    ep = tmp_path / "settled"
    train(tiny(ep, dtype="float64", beta=0.01, settle_tol=1e-10, T1=400, T2=400, epochs=1), log=quiet)
    (row,) = gradient_agreement(ep, batches=1, log=quiet)
    assert row["converged"] and row["estimate_converged"]
    assert list(row["asymmetry"]) == ["conv1"], row["asymmetry"]  # c4m: one neuron layer under the softmax readout
    assert all(0.0 <= a < 0.5 for a in row["asymmetry"].values()), row["asymmetry"]
    assert all(cos >= 0.99 for cos, _ in row["layers"].values()), row["layers"]


def test_the_distillation_schedule_sets_each_epochs_weights_also_on_resume(tmp_path):
    """kd_schedule = "cosine" (Eq. 6.8) over E = 2 epochs: γ(0) = γ, γ(1) = γ ½(1 + cos(π/2)) = γ/2,
    as metrics.jsonl's kd_weights records them from the network. The factor comes from the epoch
    alone, so a run stopped within epoch 2 (batch 4 of 3 per epoch) and resumed records the same;
    the default schedule keeps γ (the TINY run: every conv layer distilled, γ = 1)."""
    full = tmp_path / "full"
    train(tiny(full, kd_schedule="cosine", kd_weight=0.8, kd_targets="standardised"), log=quiet)
    assert [r["kd_weights"] for r in rows(full)] == [{"kd1": 0.8}, {"kd1": pytest.approx(0.4, rel=1e-15)}]
    part = tmp_path / "part"
    cfg = tiny(part, kd_schedule="cosine", kd_weight=0.8, kd_targets="standardised")
    assert train(cfg, log=quiet, max_batches=4).interrupted
    train(cfg, resume=part, log=quiet)
    assert [r["kd_weights"] for r in rows(part)] == [r["kd_weights"] for r in rows(full)]
    a, b = load_checkpoint(full / "latest.npz").params, load_checkpoint(part / "latest.npz").params
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the resumed run is the same run


def test_standardised_targets_reach_the_training_step(tmp_path):
    """kd_targets = "standardised" (Eq. 6.9) in a real run: with one batch holding the whole training
    split, the first update of the map's bias m_1 (zero at init, Eq. 6.7, so M_1 s + m_1 − t̂ = −t̂
    whatever the state) is Δm = η γ mean_n Σ_pos t̂ / |t|, and t̂ sums to zero over that split: Δm
    is round-off (float64, ~1e-16 of η). With raw targets t ≥ 0 (clipped ρ), Δm is the mean
    activation per channel, > 0 wherever a channel is ever active."""
    deltas = {}
    for targets in ("raw", "standardised"):
        out = tmp_path / targets
        cfg = tiny(out, dtype="float64", batch_size=1000, local_layers="none", kd_targets=targets, lr=[0.1])
        train(cfg, log=quiet, max_batches=1)
        deltas[targets] = np.asarray(load_checkpoint(out / "latest.npz").params["kd1.bias"])  # m_1 started at 0
    assert np.all(deltas["raw"] > 1e-6), deltas["raw"]
    assert np.max(np.abs(deltas["standardised"])) <= 1e-13, deltas["standardised"]


def test_the_default_run_records_constant_distillation_weights(run):
    assert [r["kd_weights"] for r in rows(run)] == [{"kd1": 1.0}, {"kd1": 1.0}]


# ---------------------------------------------------------------------- batch shards (Eq. 4.7)
def test_a_sharded_run_trains_like_the_unsharded_one(tmp_path):
    """--shards 2 settles each batch as two sub-batches in threads (Eq. 4.7), including a last batch
    smaller than the others: in float64 the parameters the sharded run learned (their change from the
    common initial point) are the unsharded run's to 9 digits. Sharding changes only the rounding
    (~1e-16 relative per operation); a combination with wrong weights would change the learned
    update itself, by a fraction of order one."""
    cfg1, cfg2 = tiny(tmp_path / "one", dtype="float64"), tiny(tmp_path / "two", dtype="float64", shards=2)
    one, two = train(cfg1, log=quiet), train(cfg2, log=quiet)
    a = load_checkpoint(tmp_path / "one" / "latest.npz").params
    b = load_checkpoint(tmp_path / "two" / "latest.npz").params
    net = build_network(cfg1, (1, 8, 8), 4, "numpy")  # the network's initial parameters (same seed and arch)
    for k in net.params:
        learned = np.abs(a[k] - net.params[k]).max()
        assert learned > 0, k
        assert np.abs(b[k] - a[k]).max() <= 1e-9 * learned, k
    assert not one.interrupted and not two.interrupted


def test_shards_need_a_host_backend():
    """Threads over shards are refused on a device backend before anything runs, naming the key."""
    with pytest.raises(ConfigError, match="config key 'shards' has value 2; expected 1 with backend 'cupy'"):
        TrainConfig(backend="cupy", shards=2).validate()
