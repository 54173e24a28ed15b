"""Stopping a study and continuing it (``pyeqprop study depth``, :mod:`pyeqprop.study.workers`).

A signal to the study stops every running run at a batch boundary with latest.npz saved, starts no
further run and leaves no process behind, whether the study handles it (SIGTERM, SIGINT) or dies
at once (SIGKILL); ``--resume`` continues it to the table an uninterrupted study gives, and refuses
a study folder started with other flags. Every process here is a real one and every signal a real
signal; the jobs are tiny (synthetic 8×8 images, two conv layers of 4 channels).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from pyeqprop.cli import main
from pyeqprop.train.checkpoint import load_checkpoint
from pyeqprop.train.loop import train
from pyeqprop.train.runfolder import recorded_config

from _tiny_jobs import quiet, wait_for

CLI = [sys.executable, "-m", "pyeqprop.cli"]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals; /proc to find the workers")

STUDY = ["study", "depth", "--dataset", "synthetic", "--arch", "c4-c4m", "--teacher-epochs", "1", "--T1", "6",
         "--T2", "3", "--schedule", "synchronous", "--settle-tol", "0", "--feedback", "1", "--weight-scale", "2",
         "--lr-grid", "none", "--settings", "ep,ep+local"]
RUNS = [f"deep-s{seed}-{name}" for seed in (0, 1) for name in ("ep", "ep+local")]  # the plan's order


def _processes_with(mark: str) -> list[int]:
    """The pids whose environment holds ``mark`` (the study and every worker it spawned inherit it)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if mark.encode() in (d / "environ").read_bytes():
                    found.append(int(d.name))
            except OSError:  # gone meanwhile, or not ours
                pass
    return found


def _workers(mark: str) -> list[int]:
    """The study's worker processes (not its resource tracker): the ones multiprocessing's spawn_main runs."""
    return [pid for pid in _processes_with(mark) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _running(out: Path) -> list[str]:
    """The runs that have logged an epoch."""
    return [r for r in RUNS if (out / "runs" / r / "metrics.jsonl").exists()
            and (out / "runs" / r / "metrics.jsonl").read_text().count("\n") >= 1]


@linux_only
@pytest.mark.parametrize("signum, target", [(signal.SIGTERM, "study"), (signal.SIGINT, "study"),
                                            (signal.SIGKILL, "study"), (signal.SIGINT, "group"),
                                            (signal.SIGTERM, "worker")],
                         ids=["SIGTERM", "SIGINT", "SIGKILL", "Ctrl-C-to-the-group", "SIGTERM-to-one-worker"])
def test_a_signalled_study_stops_every_worker_and_each_running_run_saves(tmp_path, signum, target):
    """Four runs, two workers, runs far too long to finish: once two are training, signal the study (alone,
    or its whole process group as a terminal's Ctrl-C does, or one of its workers only, as a batch
    scheduler's ``kill`` might). Both running runs save latest.npz mid-way, the other two never start,
    and within two minutes no process of the study is left. SIGKILL gives the study no chance to act:
    its workers notice its end through the lifeline. Otherwise the study exits with 128 + the signal
    and says how to continue."""
    out, mark = tmp_path / "study", uuid.uuid4().hex
    env = {**os.environ, "PYEQPROP_TEST_MARK": mark, "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.Popen([*CLI, *STUDY, "--epochs", "100000", "--seeds", "0,1", "--jobs", "2", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        wait_for(lambda: len(_running(out)) == 2, proc, 300, "two runs' first epoch")
        running = _running(out)
        if target == "group":
            os.killpg(proc.pid, signum)
        elif target == "worker":
            os.kill(min(_workers(mark)), signum)
        else:
            proc.send_signal(signum)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the study did not end within 120 s of {signum.name}")
        deadline = time.monotonic() + 120
        while _processes_with(mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_with(mark) == [], f"processes of the study still running 120 s after {signum.name}"
    finally:
        for pid in _processes_with(mark):
            os.kill(pid, signal.SIGKILL)
        proc.kill()
    if signum == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:
        assert proc.returncode == 128 + signum, err
        assert "Traceback" not in err
        assert f"study stopped ({signum.name}): 2 run(s) saved latest.npz" in err and "--resume" in err
        assert all(str(out / "runs" / r) in err for r in running)
    for r in running:
        pos = load_checkpoint(out / "runs" / r / "latest.npz").progress["position"]
        assert 1 <= pos["epoch"] < 100000
    assert sorted(p.name for p in (out / "runs").iterdir() if not p.name.endswith("teacher")) == sorted(running)


def _results(out: Path) -> list[dict]:
    """The rows of results.json without the wall time and the resumed flag: what must not depend on a stop."""
    rows = json.loads((out / "results.json").read_text())["rows"]
    return [{k: v for k, v in r.items() if k not in ("seconds", "resumed")} for r in rows]


def test_a_resumed_study_gives_the_uninterrupted_table_and_refuses_other_flags(tmp_path, capsys):
    """One run of the study stopped mid-epoch (the training loop's test hook stops it as Ctrl-C does), one
    finished: --resume continues the first from its latest.npz and only reads the second back, and the rows
    equal those of the study run straight through. The same folder without --resume, or with another
    --epochs, is refused before anything is trained, and nothing in it changes."""
    flags = [*STUDY, "--epochs", "2", "--seeds", "0"]
    ref, out = tmp_path / "ref", tmp_path / "study"
    assert main([*flags, "--out", str(ref)]) == 0
    assert main([*flags, "--out", str(out)]) == 0
    stopped, finished = out / "runs" / "deep-s0-ep", out / "runs" / "deep-s0-ep+local"
    cfg = recorded_config(stopped)
    shutil.rmtree(stopped)
    assert train(cfg, max_batches=8, log=quiet).interrupted  # 183 samples, 6 batches of 32 an epoch
    assert load_checkpoint(stopped / "latest.npz").progress["position"] == {"epoch": 1, "batch": 2}
    (out / "results.json").unlink()
    kept = {p: p.read_bytes() for p in sorted(finished.iterdir()) if p.is_file()}
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    capsys.readouterr()

    for again in (["--out", str(out)], ["--out", str(out), "--epochs", "3", "--resume"]):
        assert main([*flags, *again]) == 2
        err = capsys.readouterr().err
        assert "--resume" in err if "--resume" not in again else "epochs = 2" in err and "epochs = 3" in err
        assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    lone = tmp_path / "teacher-only"  # a teacher alone would otherwise be reused by a new study without a word
    shutil.copytree(out / "runs" / "deep-s0-teacher", lone / "runs" / "deep-s0-teacher")
    assert main([*flags, "--out", str(lone)]) == 2
    assert "already holds 1 run or teacher folder(s)" in capsys.readouterr().err
    assert not (lone / "runs" / "deep-s0-ep").exists()

    assert main([*flags, "--out", str(out), "--resume"]) == 0
    assert _results(out) == _results(ref)
    assert {p: p.read_bytes() for p in sorted(finished.iterdir()) if p.is_file()} == kept  # read back, not retrained
    rows = {r["setting"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["ep"]["resumed"] and rows["ep+local"]["resumed"]
    assert rows["ep"]["seconds"] > 0
