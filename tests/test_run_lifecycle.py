"""The life of a run folder: created only when the job starts and claimed atomically (two jobs started at
once never share one), config.toml kept as the run was started (a resume's changes recorded apart, and only
once it has checkpointed), a run that died before its first checkpoint resumable, SIGTERM handled like
Ctrl-C, checkpoints within an epoch, and the run's figure (``pyeqprop plot``).

Jobs are tiny (synthetic 8×8 images, 3 batches of 64, one conv layer, T1 = 5); every process here is a
real one and every signal a real signal.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pyeqprop.cli import main
from pyeqprop.train.checkpoint import load_checkpoint
from pyeqprop.train.config import load_toml
from pyeqprop.train.loop import train
from pyeqprop.train.runfolder import recorded_config

from _tiny_jobs import N_BATCHES, TINY_FLAGS, assert_same_state, metrics, quiet, tiny, wait_for

CLI = [sys.executable, "-m", "pyeqprop.cli"]
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and hard links")


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


def _env():
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted two-epoch job."""
    run = tmp_path_factory.mktemp("reference") / "run"
    assert not train(tiny(run), log=quiet).interrupted
    return run


# ---------------------------------------------------------------------- two jobs, two folders
def _assert_one_consistent_run(run, seed, epochs):
    """config.toml, latest.npz and metrics.jsonl of ``run`` all belong to one job of ``seed``."""
    assert load_toml(run / "config.toml")["seed"] == seed
    ckpt = load_checkpoint(run / "latest.npz")
    assert ckpt.config["seed"] == seed and ckpt.rng_state["seed"] == seed
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))  # one job's epochs, not two interleaved
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == \
        [{k: v for k, v in h.items() if k != "seconds"} for h in ckpt.progress["history"]]


def test_two_jobs_started_at_once_get_a_folder_each(tmp_path):
    """The issue's ``pyeqprop train --seed 0 & pyeqprop train --seed 1 & wait``: both name their folder by
    the same second; the second to create it takes the name with ``-2``."""
    procs = [subprocess.Popen([*CLI, "train", *TINY_FLAGS, "--epochs", "1", "--seed", str(seed)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for seed in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2, folders
    seeds = {load_toml(f / "config.toml")["seed"]: f for f in folders}
    assert set(seeds) == {0, 1}
    for seed, folder in seeds.items():
        _assert_one_consistent_run(folder, seed, epochs=1)
        assert f"run folder {Path('runs') / folder.name}]" in outs[seed][0]  # each job names its own folder


RACE = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from pyeqprop.train.config import TrainConfig
    from pyeqprop.train.errors import TrainingError
    from pyeqprop.train.runfolder import claim_run_dir
    root, seed, out, go = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
    cfg = TrainConfig(dataset="synthetic", seed=seed, out=out)
    print("ready", flush=True)
    while not go.exists():  # a barrier: every process asks for the same folder at the same moment
        time.sleep(0.001)
    try:
        print(claim_run_dir(cfg, root, stamp="20250101-000000"), flush=True)
    except TrainingError as exc:
        print(f"error: {exc}", flush=True)
""")


def _race(tmp_path, out: str, n=4):
    """``n`` real processes claim one folder at once; returns what each printed."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "runs"), str(seed), out, str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for seed in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, outs
    return [out.strip() for out, _ in outs]


@posix_only
def test_processes_racing_for_one_default_name_each_get_their_own_folder(tmp_path):
    """Four processes claim the same default name (one second, forced by the stamp) at the same moment."""
    claimed = [Path(line) for line in _race(tmp_path, "")]
    assert sorted(p.name for p in claimed) == ["synthetic-20250101-000000", "synthetic-20250101-000000-2",
                                               "synthetic-20250101-000000-3", "synthetic-20250101-000000-4"]
    for seed, folder in enumerate(claimed):
        assert load_toml(folder / "config.toml")["seed"] == seed  # each folder holds its own job's config
    assert not list((tmp_path / "runs").rglob(".*"))  # no temporary files left behind


@posix_only
def test_processes_racing_for_one_out_folder_one_gets_it_and_the_others_are_refused(tmp_path):
    run = tmp_path / "shared"
    lines = _race(tmp_path, str(run))
    winners = [seed for seed, line in enumerate(lines) if line == str(run)]
    assert len(winners) == 1, lines
    for seed, line in enumerate(lines):
        if seed != winners[0]:
            assert line.startswith(f"error: output folder {str(run)!r} already holds a run"), line
            assert f"--resume {run}" in line
    assert load_toml(run / "config.toml")["seed"] == winners[0]
    assert not list(run.glob(".*"))


# ---------------------------------------------------------------------- nothing before the job starts
@pytest.mark.parametrize("bad", [["--arch", "c4x"], ["--local-layers", "3"], ["--kd-layers", "2"],
                                 ["--dataset", "nonsense"]], ids=["arch", "local-layers", "kd-layers", "dataset"])
@pytest.mark.parametrize("where", ["default", "out"])
def test_a_job_that_fails_to_start_leaves_no_folder(tmp_path, monkeypatch, capsys, bad, where):
    monkeypatch.chdir(tmp_path)
    out = ["--out", str(tmp_path / "a" / "run")] if where == "out" else []
    assert main(["train", *TINY_FLAGS, "--epochs", "1", *bad, *out]) == 2
    error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no runs/, no a/run


def test_a_run_that_died_before_its_first_checkpoint_starts_again_with_resume(reference, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_FLAGS, "--epochs", "2", "--lr", "1e30", "--out", str(run)]) == 3
    line = error_line(capsys)
    assert "no checkpoint had been written yet" in line and f"--resume {run}" in line
    assert (run / "config.toml").exists() and not (run / "latest.npz").exists()
    # a new run into it is told what to do
    assert main(["train", *TINY_FLAGS, "--epochs", "2", "--out", str(run)]) == 2
    line = error_line(capsys)
    assert "has no checkpoint yet" in line and f"--resume {run}" in line
    # --resume starts it again from the beginning, with the rate changed: the run is the reference job
    assert main(["train", "--resume", str(run), "--lr", "0.05"]) == 0
    assert "starting it again from the beginning" in capsys.readouterr().out
    assert metrics(run) == metrics(reference)
    assert_same_state(reference, run)
    assert load_toml(run / "config.toml")["lr"] == [1e30]  # how it was started
    resumes = load_toml(run / "resumes.toml")["resume"]
    assert len(resumes) == 1 and resumes[0]["changed"] == {"lr": [0.05]}
    assert (resumes[0]["epoch"], resumes[0]["batch"]) == (0, 0)
    assert recorded_config(run).lr == [0.05]


# ---------------------------------------------------------------------- config.toml and resumes
def test_a_resume_that_diverges_changes_nothing_and_a_plain_resume_trains_as_before(reference, tmp_path, capsys):
    """The issue's ``--resume RUN --lr 1e6`` diverges; config.toml must still say how the run was trained,
    so that a plain ``--resume RUN`` then continues it as the uninterrupted job would."""
    run = tmp_path / "run"
    assert train(tiny(run), log=quiet, max_batches=N_BATCHES).interrupted  # the end of epoch 1
    config_before = (run / "config.toml").read_bytes()
    assert main(["train", "--resume", str(run), "--lr", "1e30"]) == 3
    assert "training diverged" in error_line(capsys)
    assert (run / "config.toml").read_bytes() == config_before
    assert not (run / "resumes.toml").exists()
    assert main(["train", "--resume", str(run)]) == 0
    assert metrics(run) == metrics(reference)
    assert_same_state(reference, run)


def test_a_resume_that_changes_settings_is_recorded_apart_once_it_has_saved(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(tiny(run), log=quiet, max_batches=1).interrupted
    config_before = (run / "config.toml").read_bytes()
    # a resume that fails before training (another architecture) records nothing
    assert main(["train", "--resume", str(run), "--arch", "c8m"]) == 2
    capsys.readouterr()
    assert not (run / "resumes.toml").exists()
    # one that runs a batch and saves is recorded, with the position it continued from
    assert train(tiny(run, epochs=3), resume=run, log=quiet, max_batches=1).interrupted
    assert (run / "config.toml").read_bytes() == config_before  # epochs = 2, as started
    (rec,) = load_toml(run / "resumes.toml")["resume"]
    assert rec["changed"] == {"epochs": 3} and (rec["epoch"], rec["batch"]) == (0, 1)
    assert recorded_config(run).epochs == 3
    # a plain resume continues with it: three epochs, equal to the job run in one go
    assert main(["train", "--resume", str(run)]) == 0
    ref = tmp_path / "ref"
    train(tiny(ref, epochs=3), log=quiet)
    assert metrics(run) == metrics(ref)
    assert_same_state(ref, run)
    assert len(load_toml(run / "resumes.toml")["resume"]) == 1  # the plain resume changed nothing


# ---------------------------------------------------------------------- SIGTERM and checkpoints within an epoch
@posix_only
def test_sigterm_saves_exits_143_and_the_run_resumes_exactly(tmp_path, capsys):
    """What a batch scheduler or ``kill`` sends: like Ctrl-C, the job stops at the next batch boundary,
    saves latest.npz there and exits with 128 + 15."""
    run = tmp_path / "run"
    flags = TINY_FLAGS + ["--cosine-epochs", "-1"]  # a constant rate: the resumed job may stop at another epoch
    proc = subprocess.Popen([*CLI, "train", *flags, "--epochs", "1000", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    metrics_file = run / "metrics.jsonl"
    wait_for(lambda: metrics_file.exists() and metrics_file.read_text().count("\n") >= 1, proc, 120,
              "the first epoch")
    proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the process did not stop within 60 s of SIGTERM")
    assert proc.returncode == 143, (out, err)
    assert "Traceback" not in err
    assert "terminated (SIGTERM): stopping after the current batch" in out
    assert "terminated (" in out and f"--resume {run}" in out
    ckpt = load_checkpoint(run / "latest.npz")
    pos = ckpt.progress["position"]
    assert 1 <= pos["epoch"] < 1000 and 0 <= pos["batch"] < N_BATCHES
    assert len(metrics(run)) == pos["epoch"]

    epochs = pos["epoch"] + 1
    assert main(["train", "--resume", str(run), "--epochs", str(epochs)]) == 0
    capsys.readouterr()
    ref = tmp_path / "ref"
    train(tiny(ref, epochs=epochs, cosine_epochs=-1), log=quiet)
    assert_same_state(ref, run)
    assert metrics(run) == metrics(ref)


@pytest.mark.parametrize("every", [{"checkpoint_batches": 2}, {"checkpoint_minutes": 1e-9}],
                         ids=["every-2-batches", "every-minute-fraction"])
def test_latest_is_saved_within_the_epoch_and_resumes_exactly(reference, tmp_path, every):
    """With checkpoint_batches = 2, latest.npz holds batch 2 of epoch 1 by the time epoch 1 is logged
    (batch 3 ends the epoch, whose own save follows); resuming from that copy gives the reference job.
    checkpoint_minutes below any batch's time saves after every batch: the same copy."""
    run, copy = tmp_path / "run", tmp_path / "latest-at-epoch-1.npz"

    def log(msg):  # the epoch's line is logged before the epoch's own checkpoint is saved
        if msg.startswith("epoch   1/"):
            shutil.copyfile(run / "latest.npz", copy)

    train(tiny(run, **every), log=log)
    assert metrics(run) == metrics(reference)  # saving does not change the job
    assert_same_state(reference, run)
    mid = load_checkpoint(copy)
    assert mid.progress["position"] == {"epoch": 0, "batch": 2}

    again = tmp_path / "again"  # the folder as it was when epoch 1 was logged
    again.mkdir()
    for name in ("config.toml", "teacher.npz"):
        shutil.copyfile(run / name, again / name)
    shutil.copyfile(copy, again / "latest.npz")
    assert not train(tiny(again), resume=again, log=quiet).interrupted
    assert_same_state(reference, again)
    assert_same_state(reference, again, "best.npz")
    assert metrics(again) == metrics(reference)


# ---------------------------------------------------------------------- the figure
def test_plot_draws_the_figure_of_a_run_from_its_metrics(reference, tmp_path, capsys):
    from pyeqprop.train.curves import curves_figure, figure_title, read_metrics

    run = tmp_path / "copy"
    shutil.copytree(reference, run)
    (run / "curves.png").unlink()
    assert main(["plot", str(run)]) == 0
    assert f"wrote {run / 'curves.png'}" in capsys.readouterr().out
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(run), "--out", str(tmp_path / "other.png")]) == 0
    assert (tmp_path / "other.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    title = figure_title(run, recorded_config(run))
    assert title.startswith("copy\nsynthetic, c4m, random-sign β=0.5, T1=5 T2=2, local errors λ=0.1 (all)")
    fig = curves_figure(read_metrics(run), title)
    assert fig.get_suptitle() == title
    loss, accuracy = fig.axes
    assert loss.get_yscale() == "log" and accuracy.get_yscale() == "linear"
    assert [ln.get_label() for ln in loss.get_lines()] == ["train", "validation", "test"]


@pytest.mark.parametrize("case", ["no-metrics", "no-epoch", "no-folder"])
def test_plot_of_a_folder_without_metrics_is_a_usage_error(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "no-folder":
        run.mkdir()
    if case == "no-epoch":  # a run that stopped before its first epoch ended
        (run / "metrics.jsonl").write_text("")
    assert main(["plot", str(run)]) == 2
    line = error_line(capsys)
    assert str(run) in line
    assert {"no-metrics": "metrics.jsonl does not exist", "no-epoch": "no finished epoch yet",
            "no-folder": "no such folder"}[case] in line
    assert not (run / "curves.png").exists()


def test_training_without_matplotlib_says_the_figure_was_skipped_and_how_to_get_it(tmp_path):
    run = tmp_path / "run"
    code = ("import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
            "from pyeqprop.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "train", *TINY_FLAGS, "--epochs", "2", "--out", str(run)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    skipped = [line for line in proc.stdout.splitlines() if "curves.png skipped" in line]
    assert skipped == [f"curves.png skipped: matplotlib is not installed; pip install 'pyeqprop[plot]' (or "
                       f"matplotlib), then draw it with: pyeqprop plot {run}"]  # once, not every epoch
    assert not (run / "curves.png").exists()
    proc = subprocess.run([sys.executable, "-c", code, "plot", str(run)], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 2 and "needs matplotlib" in proc.stderr
