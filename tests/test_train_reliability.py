"""Reliability of the training application: reproducibility, exact resume, Ctrl-C, atomic checkpoints,
divergence.

Every job is tiny (synthetic 8×8 images, 204 training samples = 4 batches of 64, one conv layer, T1 = 5)
so that the whole file runs in a few seconds per test. The computation is deterministic on the NumPy
backend, so "resumes exactly" is checked bit for bit: a resumed run must reproduce the parameters,
momentum buffers and metrics of the uninterrupted run exactly, not to a tolerance.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from pyeqprop.cli import main
from pyeqprop.train.checkpoint import load_checkpoint
from pyeqprop.train.config import ConfigError
from pyeqprop.train.errors import TrainingDiverged
from pyeqprop.train.loop import train

from _tiny_jobs import N_BATCHES, TINY_FLAGS, assert_same_state, metrics, quiet, tiny, wait_for

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Run A: the uninterrupted two-epoch job."""
    run = tmp_path_factory.mktemp("reference") / "run"
    res = train(tiny(run), log=quiet)
    assert not res.interrupted and len(res.history) == 2
    return run


def _env():
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------------- reproducibility
def test_same_seed_and_config_give_identical_metrics_and_parameters(reference, tmp_path):
    train(tiny(tmp_path / "again"), log=quiet)
    assert metrics(tmp_path / "again") == metrics(reference)
    assert_same_state(reference, tmp_path / "again")
    assert_same_state(reference, tmp_path / "again", "best.npz")


def test_another_seed_gives_other_numbers(reference, tmp_path):
    # the counterpart of the test above: the comparison is able to see a difference
    train(tiny(tmp_path / "seed1", seed=1), log=quiet)
    assert metrics(tmp_path / "seed1") != metrics(reference)


# ---------------------------------------------------------------------- exact resume
@pytest.mark.parametrize("stops", [(2,), (N_BATCHES,), (N_BATCHES + 2,), (1, 2)],
                         ids=["mid-epoch-1", "epoch-boundary", "mid-epoch-2", "twice"])
def test_interrupted_and_resumed_run_equals_uninterrupted_run_bitwise(reference, tmp_path, stops):
    run = tmp_path / "run"
    res = train(tiny(run), log=quiet, max_batches=stops[0])
    assert res.interrupted
    done = stops[0]
    pos = load_checkpoint(run / "latest.npz").progress["position"]
    assert (pos["epoch"], pos["batch"]) == divmod(done, N_BATCHES)
    for more in stops[1:]:
        assert train(tiny(run), resume=run, log=quiet, max_batches=more).interrupted
        done += more
        pos = load_checkpoint(run / "latest.npz").progress["position"]
        assert (pos["epoch"], pos["batch"]) == divmod(done, N_BATCHES)
    res = train(tiny(run), resume=run, log=quiet)
    assert not res.interrupted
    assert_same_state(reference, run)
    assert_same_state(reference, run, "best.npz")
    assert metrics(run) == metrics(reference)
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in res.history] == metrics(reference)


def _as_format_1(path):
    """Rewrite a checkpoint in the layout of format version 1, as pyeqprop 0.1's loop wrote it: the
    progress record (position, accum, history, best_test_acc) inside ``extra``, no ``progress`` key."""
    with np.load(path, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    meta = json.loads(str(entries["meta"][()]))
    old = meta.pop("progress")
    old["best_test_acc"] = old.pop("best_val_acc")  # before the validation split, best.npz followed test
    meta["extra"] = old
    entries["meta"] = np.asarray(json.dumps(meta))
    entries["__pyeqprop_format__"] = np.asarray(json.dumps({"format": "pyeqprop.checkpoint", "version": 1}))
    np.savez(path, **entries)


def test_a_format_1_checkpoint_mid_epoch_resumes_exactly(reference, tmp_path):
    """A run checkpointed by the previous code (format 1, its position in ``extra``) resumes bit for bit."""
    run = tmp_path / "old"
    assert train(tiny(run), log=quiet, max_batches=N_BATCHES + 1).interrupted
    _as_format_1(run / "latest.npz")
    old = load_checkpoint(run / "latest.npz")
    assert old.version == 1 and old.extra is None
    assert old.progress["position"] == {"epoch": 1, "batch": 1}
    res = train(tiny(run), resume=run, log=quiet)
    assert not res.interrupted
    assert_same_state(reference, run)
    assert metrics(run) == metrics(reference)
    assert load_checkpoint(run / "latest.npz").version == 2


def test_resume_of_a_finished_run_changes_nothing(reference, tmp_path):
    run = tmp_path / "done"
    shutil.copytree(reference, run)
    res = train(tiny(run), resume=run, log=quiet)
    assert not res.interrupted and res.test_acc == metrics(reference)[-1]["test_acc"]
    assert_same_state(reference, run)
    assert metrics(run) == metrics(reference)


def test_resume_rewrites_metrics_from_the_checkpoint(reference, tmp_path):
    # a crash after a metrics line was appended but before latest.npz moved on leaves an extra line;
    # resuming must not duplicate that epoch
    run = tmp_path / "run"
    train(tiny(run), log=quiet, max_batches=N_BATCHES + 1)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "stale": True}) + "\n")
    train(tiny(run), resume=run, log=quiet)
    assert metrics(run) == metrics(reference)


# ---------------------------------------------------------------------- Ctrl-C for real
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and resource limits")


@posix_only
@pytest.mark.parametrize("presses", [1, 2], ids=["ctrl-c", "ctrl-c-twice"])
def test_sigint_exits_130_and_the_run_resumes_exactly(tmp_path, capsys, presses):
    """One Ctrl-C stops at the next batch boundary and saves latest.npz there; a second one stops at once
    (saving unless it hit an update). Either way the run resumes to exactly what an uninterrupted run
    computes."""
    run = tmp_path / "run"
    # constant learning rate, so that the resumed job may stop at another epoch count than the first asked for
    flags = TINY_FLAGS + ["--cosine-epochs", "-1"]
    proc = subprocess.Popen([sys.executable, "-m", "pyeqprop.cli", "train", *flags, "--epochs", "1000",
                             "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    metrics_file = run / "metrics.jsonl"
    wait_for(lambda: metrics_file.exists() and metrics_file.read_text().count("\n") >= 1, proc, 120,
              "the first epoch")
    proc.send_signal(signal.SIGINT)
    if presses == 2:
        time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process did not stop within 60 s of SIGINT")
    assert proc.returncode == 130, (out, err)
    assert "Traceback" not in err
    assert f"--resume {run}" in out
    assert ("interrupted (" in out) or (presses == 2 and "aborted during an update" in out), out
    ckpt = load_checkpoint(run / "latest.npz")
    pos = ckpt.progress["position"]
    assert 1 <= pos["epoch"] < 1000 and 0 <= pos["batch"] < N_BATCHES
    assert len(ckpt.progress["history"]) == pos["epoch"]
    if "interrupted (" in out:  # a clean stop: metrics.jsonl agrees with the checkpoint, no half-recorded epoch
        assert len(metrics(run)) == pos["epoch"]

    epochs = pos["epoch"] + 1
    assert main(["train", "--resume", str(run), "--epochs", str(epochs)]) == 0  # pyeqprop train --resume RUN
    assert "test accuracy: EP student" in capsys.readouterr().out

    # the interrupted + resumed job equals the same job run in one go
    ref = tmp_path / "ref"
    train(tiny(ref, epochs=epochs, cosine_epochs=-1), log=quiet)
    assert_same_state(ref, run)
    assert metrics(run) == metrics(ref)


# ---------------------------------------------------------------------- atomic checkpoints
def _assert_no_stray_files(run):
    names = sorted(p.name for p in Path(run).iterdir())
    stray = [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    assert not stray, names


@posix_only
def test_checkpoint_write_failing_midway_keeps_the_previous_latest(reference, tmp_path):
    """A file-size limit makes the checkpoint write fail after it started (EFBIG): the run stops with
    one error line, latest.npz keeps its previous bytes, and the run can still be resumed exactly."""
    run = tmp_path / "run"
    train(tiny(run), log=quiet, max_batches=2)
    before = (run / "latest.npz").read_bytes()
    assert len(before) > 8192
    code = textwrap.dedent(f"""
        import resource, signal, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)   # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
        from pyeqprop.cli import main
        sys.exit(main(["train", "--resume", {str(run)!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write checkpoint "), proc.stderr
    assert "File too large" in errors[0]
    # epoch 1 ends with best.npz (the first, so none to keep) before latest.npz
    assert errors[0].endswith("best.npz (File too large); no best.npz was written"), errors[0]
    assert (run / "latest.npz").read_bytes() == before
    _assert_no_stray_files(run)
    train(tiny(run), resume=run, log=quiet)
    assert_same_state(reference, run)
    assert metrics(run) == metrics(reference)


@posix_only
def test_sigkill_during_checkpoint_writes_leaves_a_loadable_latest(reference, tmp_path):
    """Kill -9 a process that keeps rewriting latest.npz (with 16 MB of ballast, so that the kill most
    likely lands inside a write): latest.npz is still a complete checkpoint and the run resumes exactly."""
    run = tmp_path / "run"
    train(tiny(run), log=quiet, max_batches=N_BATCHES + 1)
    code = textwrap.dedent(f"""
        import sys
        import numpy as np
        from pyeqprop.train.checkpoint import load_checkpoint, save_checkpoint
        path = {str(run / "latest.npz")!r}
        c = load_checkpoint(path)
        ballast = np.arange(2_000_000, dtype=np.float64)
        i = 0
        while True:
            save_checkpoint(path, params=c.params, optimizer_state=c.optimizer_state, epoch=c.epoch,
                            rng_state=c.rng_state, config=c.config, progress=c.progress,
                            extra={{"ballast": ballast + i}})
            i += 1
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=_env())
    for _ in range(3):  # let a few complete saves happen, then kill during the next ones
        if not proc.stdout.readline():
            pytest.fail(f"the saving process ended early (rc {proc.wait()})")
    time.sleep(0.05)
    proc.kill()
    proc.wait()
    proc.stdout.close()
    ckpt = load_checkpoint(run / "latest.npz")  # complete: every member is read
    assert ckpt.extra["ballast"].shape == (2_000_000,)
    i = int(ckpt.extra["ballast"][0])
    np.testing.assert_array_equal(ckpt.extra["ballast"], np.arange(2_000_000) + i)
    # the killed write may leave its temporary file behind, never under the checkpoint's name
    for p in run.iterdir():
        if p.name.endswith(".tmp"):
            assert p.name.startswith(".latest.npz.")
            p.unlink()
    train(tiny(run), resume=run, log=quiet)
    assert_same_state(reference, run)
    assert metrics(run) == metrics(reference)


# ---------------------------------------------------------------------- divergence
def test_divergence_names_epoch_batch_and_parameter_cli_exits_3(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pyeqprop.cli", "train", *TINY_FLAGS, "--epochs", "2",
                           "--lr", "1e30", "--out", str(run)], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr  # one line: no traceback, no overflow warnings
    line = lines[0]
    assert line.startswith("error: training diverged at epoch 1, batch ")
    assert "parameter " in line or "layer " in line
    assert "no checkpoint had been written yet" in line
    assert not (run / "latest.npz").exists()


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(tiny(run), log=quiet, max_batches=N_BATCHES)  # stops at the end of epoch 1
    before = (run / "latest.npz").read_bytes()
    best_before = (run / "best.npz").read_bytes()
    with pytest.raises(TrainingDiverged) as info:
        # the rate given on resume is used (a flag on resume overrides the run's config.toml)
        train(tiny(run, lr=[1e30]), resume=run, log=quiet)
    msg = str(info.value)
    assert msg.startswith("training diverged at epoch 2, batch ")
    assert "parameter " in msg or "layer " in msg
    assert f"the last good checkpoint {run / 'latest.npz'} (end of epoch 1) is kept" in msg
    assert (run / "latest.npz").read_bytes() == before
    assert (run / "best.npz").read_bytes() == best_before
    c = load_checkpoint(run / "latest.npz")
    assert all(np.all(np.isfinite(v)) for v in c.params.values())


# ---------------------------------------------------------------- unconverged phases (SPEC 3.14)
def _init_params(cfg):
    from pyeqprop import backend
    from pyeqprop.train.data import prepare_data
    from pyeqprop.train.student import build_network

    xp = backend.get_namespace("numpy")
    data = prepare_data(cfg, xp)
    net = build_network(cfg, tuple(data.x_train.shape[1:]), data.num_classes, xp)
    return {k: np.asarray(v) for k, v in net.params.items()}


def test_skip_leaves_the_parameters_where_no_phase_converged(tmp_path):
    # a tolerance no phase reaches in T1 = 5 / T2 = 2 steps: every batch's update is skipped (Eq. 3.14)
    cfg = tiny(tmp_path / "skip", settle_tol=1e-300, unconverged="skip", epochs=1)
    train(cfg, log=quiet)
    rows = metrics(tmp_path / "skip")
    assert rows[0]["unconverged_nudged"] == 1.0 and rows[0]["skipped_updates"] == 1.0  # one nudged phase a batch
    c = load_checkpoint(tmp_path / "skip" / "latest.npz")
    init = _init_params(cfg)
    assert set(init) < set(c.params)
    for k in init:
        np.testing.assert_array_equal(c.params[k], init[k], err_msg=k)
    for k in set(c.params) - set(init):  # local heads and distillation maps: still at their zero start
        assert not np.any(c.params[k]), k
    assert all(not np.any(v) for v in c.optimizer_state["velocity"].values())
    # "apply" uses the same unconverged estimates: the parameters move
    train(tiny(tmp_path / "apply", settle_tol=1e-300, unconverged="apply", epochs=1), log=quiet)
    assert metrics(tmp_path / "apply")[0]["skipped_updates"] == 0.0
    moved = load_checkpoint(tmp_path / "apply" / "latest.npz").params
    assert any(not np.array_equal(moved[k], init[k]) for k in init)


def test_skip_changes_nothing_when_every_phase_converges(tmp_path):
    # a tolerance every phase meets at its first check: "skip" and "apply" are the same run bitwise
    for policy in ("skip", "apply"):
        train(tiny(tmp_path / policy, settle_tol=1e30, unconverged=policy, epochs=1), log=quiet)
    assert metrics(tmp_path / "skip") == metrics(tmp_path / "apply")
    assert metrics(tmp_path / "skip")[0]["skipped_updates"] == 0.0
    assert_same_state(tmp_path / "skip", tmp_path / "apply")


# ---------------------------------------------------------------- response asymmetry (SPEC 4.9)
def test_asymmetry_limit_below_every_response_skips_every_batch(tmp_path):
    # a limit below any a_l > 0: every batch's update is skipped for its asymmetry (Eq. 4.9)
    cfg = tiny(tmp_path / "asym", estimator="symmetric", asymmetry_limit=1e-300, epochs=1)
    train(cfg, log=quiet)
    row = metrics(tmp_path / "asym")[0]
    assert min(row["asymmetry_max"].values()) > 1e-300
    assert row["skipped_asymmetric"] == 1.0 and row["skipped_updates"] == 1.0
    c = load_checkpoint(tmp_path / "asym" / "latest.npz")
    init = _init_params(cfg)
    for k in init:
        np.testing.assert_array_equal(c.params[k], init[k], err_msg=k)
    assert all(not np.any(v) for v in c.optimizer_state["velocity"].values())


def test_asymmetry_limit_above_every_response_changes_nothing(tmp_path):
    # a limit no a_l reaches: the same run bitwise as with the check off; only the two counters differ
    train(tiny(tmp_path / "on", estimator="symmetric", asymmetry_limit=1e30, epochs=1), log=quiet)
    train(tiny(tmp_path / "off", estimator="symmetric", epochs=1), log=quiet)
    on, off = metrics(tmp_path / "on")[0], metrics(tmp_path / "off")[0]
    assert (on["skipped_asymmetric"], off["skipped_asymmetric"]) == (0.0, None)
    assert (on["skipped_updates"], off["skipped_updates"]) == (0.0, None)  # settle_tol 0: None when the check is off
    drop = ("skipped_asymmetric", "skipped_updates", "seconds")
    assert {k: v for k, v in on.items() if k not in drop} == {k: v for k, v in off.items() if k not in drop}
    assert_same_state(tmp_path / "on", tmp_path / "off")


def test_asymmetry_limit_needs_the_symmetric_estimator(tmp_path):
    with pytest.raises(ConfigError, match=r"config key 'asymmetry_limit' has value 0\.5; expected 0 with estimator "
                                          r"'one-sided'"):
        tiny(tmp_path / "x", asymmetry_limit=0.5, estimator="one-sided").validate()
