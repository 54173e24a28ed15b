"""What a new user types wrong (issue 15): each bad input is one ``error:`` line and exit status 2, before any
work (no teacher trained, no network allocated), and the line says what is wrong in the user's own terms.

Most cases call ``main`` in-process; the backend switch and ``--version`` run real subprocesses, since the
environment variable and the entry point are what is tested. Jobs are tiny (synthetic 8×8, c4m, T1 = 5).
"""
from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import numpy as np
import pytest

from pyeqprop.backend import cupy_available
from pyeqprop.cli import _config_for, build_parser, main
from pyeqprop.train.checkpoint import load_checkpoint, save_checkpoint
from pyeqprop.train.config import TrainConfig

TINY = ["--dataset", "synthetic", "--arch", "c4m", "--T1", "5", "--T2", "2", "--epochs", "1", "--teacher-epochs",
        "1", "--batch-size", "64", "--progress", "none"]


def error_line(capsys, err: str | None = None) -> str:
    """The single ``error:`` line on stderr (no traceback, nothing else); ``err``: stderr already read."""
    err = capsys.readouterr().err if err is None else err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def cli(*args, env=None, timeout=120):
    """``python -m pyeqprop.cli ARGS`` in a real process."""
    return subprocess.run([sys.executable, "-m", "pyeqprop.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run folder (synthetic: 4 classes)."""
    path = tmp_path_factory.mktemp("inputs") / "run"
    assert main(["train", *TINY, "--out", str(path)]) == 0
    return path


# ---------------------------------------------------------------------- item 2: $PYEQPROP_BACKEND
@pytest.mark.skipif(cupy_available(), reason="with CuPy and a GPU here the job would run on it: nothing to refuse")
def test_backend_from_environment_is_used_and_refused_when_cupy_is_missing(tmp_path):
    """It used to train on NumPy without a word (the config's backend default was a fixed "numpy")."""
    proc = cli("train", *TINY, "--out", str(tmp_path / "r"), env={"PYEQPROP_BACKEND": "cupy"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line
    assert proc.stderr.startswith("error: backend 'cupy' was requested but CuPy is not installed")
    assert "epoch" not in proc.stdout and not (tmp_path / "r" / "metrics.jsonl").exists()


def test_unknown_backend_in_environment_is_refused_naming_the_variable(tmp_path):
    proc = cli("train", *TINY, "--out", str(tmp_path / "r"), env={"PYEQPROP_BACKEND": "nonsense"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == ("error: config key 'backend' has value 'nonsense'; expected one of numpy, cupy, "
                                   "array_api_strict (the value comes from $PYEQPROP_BACKEND)")
    assert proc.stdout == ""


def test_backend_default_follows_the_environment_and_a_flag_wins(monkeypatch):
    monkeypatch.setenv("PYEQPROP_BACKEND", "array_api_strict")
    assert TrainConfig().backend == "array_api_strict"
    assert _config_for(build_parser().parse_args(["train"])).backend == "array_api_strict"
    assert _config_for(build_parser().parse_args(["train", "--backend", "numpy"])).backend == "numpy"
    monkeypatch.setenv("PYEQPROP_BACKEND", "nonsense")  # an explicit flag makes a bad variable irrelevant
    assert _config_for(build_parser().parse_args(["train", "--backend", "numpy"])).backend == "numpy"
    monkeypatch.delenv("PYEQPROP_BACKEND")
    assert TrainConfig().backend == "numpy"


# ---------------------------------------------------------------------- item 13: validated before any work
@pytest.mark.parametrize("flags, words", [
    (["--lr", "0.1,0.2", "--arch", "c4m-c4m"], "config key 'lr' has value [0.1, 0.2]: got 2 per-layer learning "
                                               "rates for 3 layers (conv1, conv2, fc1)"),
    (["--beta", "inf"], "config key 'beta' has value inf; expected a finite number > 0"),
    (["--lr-min", "-1"], "config key 'lr_min' has value -1.0; expected a finite number >= 0"),
    (["--lr-min", "nan"], "config key 'lr_min' has value nan; expected a finite number >= 0"),
    (["--weight-decay", "nan"], "config key 'weight_decay' has value nan; expected a finite number >= 0"),
    (["--seed", "-1"], "config key 'seed' has value -1; expected an integer >= 0"),
    (["--arch", "c1000000000"], "arch 'c1000000000' needs about "),
])
def test_bad_values_are_refused_before_the_teacher_trains(tmp_path, capsys, flags, words):
    out = tmp_path / "r"
    assert main(["train", *TINY, *flags, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    line = error_line(capsys, captured.err)
    assert line.startswith("error: " + words), line
    assert "diverged" not in line and "teacher" not in captured.out
    assert not (out / "teacher.npz").exists() and not (out / "metrics.jsonl").exists()


def test_a_network_too_large_for_memory_names_its_size(tmp_path, capsys):
    """It ended in a 25-line MemoryError traceback from the first allocation."""
    assert main(["train", *TINY, "--arch", "c1000000000", "--out", str(tmp_path / "r")]) == 2
    line = error_line(capsys)
    assert "TiB to train at batch size 64 in float32 (parameters" in line and "of memory on this machine" in line
    assert main(["teacher", *TINY, "--arch", "c1000000000", "--save", str(tmp_path / "t.npz")]) == 2
    assert "needs about" in error_line(capsys) and not (tmp_path / "t.npz").exists()


def test_batch_larger_than_the_data_is_said(tmp_path, capsys):
    """It was silently one batch per epoch."""
    assert main(["train", *TINY, "--batch-size", "100000", "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    assert ("warning: batch_size 100000 is larger than the training split (183 samples of synthetic): every "
            "epoch is a single batch of 183") in err


def test_a_text_file_given_as_checkpoint_is_not_called_pickled(tmp_path, capsys):
    notes = tmp_path / "notes.npz"
    notes.write_text("hello\nthis is text\n")
    assert main(["evaluate", str(notes)]) == 2
    line = error_line(capsys)
    assert line == f"error: {notes} is not a pyeqprop checkpoint: it is not an .npz archive (it begins with " \
                   "b'hello\\nthis is te')"
    assert "pickle" not in line


def test_cifar_not_found_tells_the_cli_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PYEQPROP_DATA", str(tmp_path / "empty"))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    assert main(["train", *TINY, "--dataset", "cifar10", "--out", str(tmp_path / "r")]) == 2
    line = error_line(capsys)
    assert "cifar10 not found" in line and "pyeqprop train --download true" in line and "--data-root" in line


def test_resuming_a_finished_run_says_it_is_complete_and_changes_nothing(run, capsys):
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run} is already complete (1 of 1 epochs); nothing to resume" in out and "resumed" not in out
    assert "--epochs N with N > 1" in out
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_evaluate_on_another_dataset_names_the_dataset(run, capsys):
    """It said "checkpoint from another architecture"."""
    assert main(["evaluate", str(run), "--dataset", "digits"]) == 2
    line = error_line(capsys)
    assert "was trained on 'synthetic'; data set 'digits' (input (1, 8, 8), 10 classes) does not fit" in line
    assert "another architecture" not in line


@pytest.mark.parametrize("argv, words", [
    (["gdu-check", "--input-shape", "1,8"], "--input-shape must be three integers c,h,w, got '1,8'"),
    (["diagnose", "--dataset", "synthetic", "--input-shape", "1,8"], "--input-shape must be three integers c,h,w"),
    (["diagnose", "--dataset", "synthetic", "--settings", "nonsense"], "unknown setting(s) ['nonsense']"),
])
def test_usage_errors_of_the_diagnostics_exit_2(capsys, argv, words):
    """They raised SystemExit with the message: exit status 1 and no ``error:`` prefix."""
    assert main(argv) == 2
    assert error_line(capsys).startswith("error: " + words)


# ---------------------------------------------------------------------- item 10: evaluate --backend
def test_a_run_evaluates_on_another_backend(tmp_path, capsys):
    """Checkpoints hold host arrays: a run trained on one backend is scored on another with the same result."""
    run = tmp_path / "strict"
    assert main(["train", *TINY, "--backend", "array_api_strict", "--out", str(run)]) == 0
    assert all(isinstance(v, np.ndarray) for v in load_checkpoint(run / "latest.npz").params.values())
    capsys.readouterr()
    assert main(["evaluate", str(run)]) == 0
    own = capsys.readouterr().out
    assert main(["evaluate", str(run), "--backend", "numpy"]) == 0
    on_numpy = capsys.readouterr().out
    assert "test accuracy" in own and own == on_numpy


def test_a_cupy_run_evaluates_on_numpy(run, tmp_path, capsys):
    """A checkpoint as a CuPy machine writes it (host arrays, backend 'cupy' in its configuration)."""
    ck = load_checkpoint(run / "latest.npz")
    gpu = tmp_path / "gpu.npz"
    save_checkpoint(gpu, params=ck.params, epoch=ck.epoch, config={**ck.config, "backend": "cupy"},
                    progress=ck.progress)
    if not cupy_available():
        assert main(["evaluate", str(gpu)]) == 2
        assert error_line(capsys).endswith("; evaluate on another with --backend (e.g. --backend numpy)")
    assert main(["evaluate", str(gpu), "--backend", "numpy"]) == 0
    got = capsys.readouterr().out
    assert main(["evaluate", str(run / "latest.npz")]) == 0
    want = capsys.readouterr().out
    assert got.split(": ", 1)[1] == want.split(": ", 1)[1]  # the same accuracy line, but for the file name


# ---------------------------------------------------------------------- item 12: --version, booleans
def test_version_comes_from_the_package_metadata():
    proc = cli("--version")
    assert proc.returncode == 0, proc.stderr
    import pyeqprop

    assert proc.stdout.strip() == f"pyeqprop {importlib.metadata.version('pyeqprop')}" == \
        f"pyeqprop {pyeqprop.__version__}"


@pytest.mark.parametrize("tail, value", [([], False), (["--augment"], True), (["--augment", "true"], True),
                                         (["--augment", "false"], False), (["--augment", "no"], False)])
def test_booleans_are_spelled_alike_in_train_and_study(tail, value):
    """train needed a value (--augment true), study refused one (--augment only): both now take either."""
    from pyeqprop.study.depth import build_study_parser

    assert _config_for(build_parser().parse_args(["train", *tail, "--epochs", "2"])).augment is value
    assert build_study_parser().parse_args([*tail, "--epochs", "2"]).augment is value
    assert build_study_parser().parse_args([*[t.replace("augment", "download") for t in tail]]).download is value


def test_a_bad_boolean_is_a_usage_error(capsys):
    from pyeqprop.study.depth import build_study_parser

    with pytest.raises(SystemExit) as info:
        build_study_parser().parse_args(["--augment", "maybe"])
    assert info.value.code == 2
    assert "argument --augment: expected true or false, got 'maybe'" in capsys.readouterr().err
    assert main(["train", "--augment", "maybe"]) == 2
    assert error_line(capsys) == "error: config key 'augment' has value 'maybe'; expected true or false"
