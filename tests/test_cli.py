"""The ``pyeqprop`` command line: help, configuration precedence, and bad input.

Every known error must reach the user as one ``error:`` line on stderr with exit status 2 (3 for a
diverged run, 130 for Ctrl-C; see test_train_reliability.py), never as a traceback. Most cases call
``main`` in-process, where an uncaught exception would fail the test just as a traceback would; the
help, the entry point and the missing-package case run a real subprocess.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from pyeqprop.cli import _config_for, build_parser, main
from pyeqprop.train.checkpoint import load_checkpoint, save_checkpoint
from pyeqprop.train.config import TrainConfig, config_from_mapping, load_toml

TINY_FLAGS = ["--dataset", "synthetic", "--arch", "c4m", "--T1", "5", "--T2", "2", "--epochs", "1",
              "--teacher-epochs", "1", "--batch-size", "64", "--progress", "none"]


def error_line(capsys) -> str:
    """The single ``error:`` line the CLI printed (and nothing else on stderr)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def run_cli(*args, code_prefix="", timeout=120):
    """``python -c`` running ``main(args)`` after ``code_prefix`` (e.g. an import blocker)."""
    code = code_prefix + f"\nimport sys\nfrom pyeqprop.cli import main\nsys.exit(main({list(args)!r}))\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished one-epoch run folder (synthetic, c4m)."""
    path = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY_FLAGS, "--out", str(path)]) == 0
    return path


# ---------------------------------------------------------------------- help
@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["evaluate", "--help"]])
def test_help_exits_0(args):
    proc = subprocess.run([sys.executable, "-m", "pyeqprop.cli", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: pyeqprop")
    if args[0] == "train":
        for flag in ("--config", "--resume", "--dataset", "--arch", "--lr", "--T1", "--teacher-epochs"):
            assert flag in proc.stdout


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "usage: pyeqprop" in capsys.readouterr().out


# ---------------------------------------------------------------------- configuration precedence
def test_defaults_then_config_file_then_flags(tmp_path):
    (tmp_path / "c.toml").write_text('dataset = "synthetic"\nbatch_size = 16\n[ep]\nT1 = 3\nT2 = 4\n'
                                     '[optim]\nlr = [0.2, 0.1]\n')
    ns = build_parser().parse_args(["train", "--config", str(tmp_path / "c.toml"), "--T1", "7", "--lr", "0.3"])
    cfg = _config_for(ns)
    defaults = TrainConfig()
    assert cfg.T1 == 7 and cfg.lr == [0.3]  # flag over file
    assert cfg.T2 == 4 and cfg.batch_size == 16 and cfg.dataset == "synthetic"  # file over default
    assert cfg.epochs == defaults.epochs and cfg.beta == defaults.beta and cfg.arch == defaults.arch  # defaults
    ns = build_parser().parse_args(["train", "--config", str(tmp_path / "c.toml")])
    assert _config_for(ns).lr == [0.2, 0.1]


def test_precedence_reaches_the_run_folder(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('dataset = "synthetic"\narch = "c4m"\nepochs = 1\nT1 = 3\nT2 = 2\n'
                                     'teacher_epochs = 1\nbatch_size = 64\nbeta = 0.25\n')
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--T1", "4", "--out", str(out)]) == 0
    cfg = config_from_mapping(load_toml(out / "config.toml"))
    assert (cfg.T1, cfg.T2, cfg.beta, cfg.momentum) == (4, 2, 0.25, TrainConfig().momentum)
    assert config_from_mapping(load_checkpoint(out / "latest.npz").config) == cfg


def test_resume_takes_the_runs_config_then_config_file_then_flags(run, tmp_path):
    ns = build_parser().parse_args(["train", "--resume", str(run), "--epochs", "5"])
    cfg = _config_for(ns)
    stored = config_from_mapping(load_toml(run / "config.toml"))
    assert cfg.epochs == 5 and cfg.arch == stored.arch == "c4m" and cfg.T1 == stored.T1 == 5
    (tmp_path / "more.toml").write_text("epochs = 3\nT2 = 3\n")
    ns = build_parser().parse_args(["train", "--resume", str(run), "--config", str(tmp_path / "more.toml"),
                                    "--epochs", "4"])
    cfg = _config_for(ns)
    assert (cfg.epochs, cfg.T2, cfg.arch, cfg.T1) == (4, 3, "c4m", 5)


# ---------------------------------------------------------------------- bad input: one line, exit 2
@pytest.mark.parametrize("extra, expected", [
    (["--dataset", "mnist-fashion"], ["unknown data set 'mnist-fashion'", "synthetic"]),
    (["--arch", "c4m-q9"], ["'c4m-q9'"]),
    (["--estimator", "two-sided"], ["'estimator'", "'two-sided'"]),
    (["--T1", "many"], ["'T1'", "'many'", "integer"]),
    (["--beta", "-1"], ["'beta'", "-1"]),
    (["--lr", "0.1,fast"], ["'lr'", "'0.1,fast'"]),
    (["--augment", "maybe"], ["'augment'", "'maybe'"]),
], ids=["dataset", "arch-token", "choice", "int-flag", "range", "lr-list", "bool"])
def test_bad_value_is_one_error_line(tmp_path, capsys, extra, expected):
    assert main(["train", *TINY_FLAGS, *extra, "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    for text in expected:
        assert text in line


def test_malformed_toml_names_the_file(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("T1 = [5,\nepochs = 2\n")
    assert main(["train", "--config", str(tmp_path / "bad.toml")]) == 2
    line = error_line(capsys)
    assert "bad.toml" in line and "not valid TOML" in line


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml" in error_line(capsys)


def test_unknown_config_key_is_named(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('[optim]\nlearning_rate = 0.1\n')
    assert main(["train", "--config", str(tmp_path / "c.toml")]) == 2
    assert "unknown config key 'optim.learning_rate'" in error_line(capsys)


def test_wrong_type_in_config_names_key_and_value(tmp_path, capsys):
    (tmp_path / "c.toml").write_text('[ep]\nT2 = "six"\n')
    assert main(["train", "--config", str(tmp_path / "c.toml")]) == 2
    line = error_line(capsys)
    assert "'T2'" in line and "'six'" in line and "integer" in line


def test_unwritable_output_folder(tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")  # root ignores permissions; a file as parent blocks anyone
    assert main(["train", *TINY_FLAGS, "--out", str(tmp_path / "a_file" / "run")]) == 2
    line = error_line(capsys)
    assert "not writable" in line and "a_file" in line


def test_new_run_into_an_existing_run_folder(run, capsys):
    assert main(["train", *TINY_FLAGS, "--out", str(run)]) == 2
    assert f"--resume {run}" in error_line(capsys)


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "cannot resume" in error_line(capsys)


def test_resume_with_another_architecture_names_the_parameter_and_keeps_the_run(run, capsys):
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", "--resume", str(run), "--arch", "c8m-c8m", "--epochs", "2"]) == 2
    line = error_line(capsys)
    assert "another architecture" in line and "'conv1.weight'" in line and "(4, 1, 3, 3)" in line
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # config.toml not rewritten


def test_evaluate_run_prints_the_last_metrics_lines_test_accuracy(run, capsys):
    # a one-epoch run: its best.npz (what 'evaluate RUN' reads) is its last epoch
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert main(["evaluate", str(run)]) == 0
    assert f"test accuracy {100 * last['test_acc']:.2f}%" in capsys.readouterr().out


def test_evaluate_on_another_data_set_names_the_readout_shapes(run, capsys):
    assert main(["evaluate", str(run), "--dataset", "digits"]) == 2  # 4 classes trained, 10 asked
    line = error_line(capsys)
    assert "was trained on 'synthetic'; data set 'digits'" in line and "another architecture" not in line  # issue 15
    assert "'fc1.weight'" in line and "(4, 64)" in line and "(10, 64)" in line


def test_evaluate_checkpoint_whose_config_names_another_architecture(run, tmp_path, capsys):
    c = load_checkpoint(run / "latest.npz")
    save_checkpoint(tmp_path / "odd.npz", params=c.params, optimizer_state=c.optimizer_state, epoch=c.epoch,
                    config=dict(c.config, arch="c6m"), progress=c.progress)
    assert main(["evaluate", str(tmp_path / "odd.npz")]) == 2
    line = error_line(capsys)
    assert "'conv1.weight'" in line and "(4, 1, 3, 3)" in line and "(6, 1, 3, 3)" in line


def test_evaluate_truncated_checkpoint(run, tmp_path, capsys):
    data = (run / "latest.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    assert main(["evaluate", str(tmp_path / "cut.npz")]) == 2
    line = error_line(capsys)
    assert "cut.npz" in line and "truncated or corrupt" in line


def test_evaluate_foreign_npz(tmp_path, capsys):
    np.savez(tmp_path / "weights.npz", w=np.zeros((3, 3)), b=np.zeros(3))
    assert main(["evaluate", str(tmp_path / "weights.npz")]) == 2
    line = error_line(capsys)
    assert "weights.npz" in line and "not a pyeqprop checkpoint" in line


def test_evaluate_a_teacher_file(run, capsys):
    assert main(["evaluate", str(run / "teacher.npz")]) == 2
    assert "teacher" in error_line(capsys)


def test_evaluate_missing_path(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing.npz")]) == 2
    assert "does not exist" in error_line(capsys)


def test_cupy_backend_without_gpu(tmp_path, capsys):
    from pyeqprop.backend import cupy_available

    if cupy_available():
        pytest.skip("CuPy and a GPU are present here")
    assert main(["train", *TINY_FLAGS, "--backend", "cupy", "--out", str(tmp_path / "run")]) == 2
    line = error_line(capsys)
    assert "cupy" in line.lower() and ("pip install cupy" in line or "GPU" in line)


_BLOCK_SKLEARN = textwrap.dedent("""
    import importlib.abc, sys

    class _NoSklearn(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sklearn" or name.startswith("sklearn."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, _NoSklearn())
""")


def test_missing_scikit_learn_names_the_install_command(tmp_path):
    out = tmp_path / "run"
    flags = list(TINY_FLAGS)
    flags[flags.index("synthetic")] = "digits"
    proc = run_cli("train", *flags, "--out", str(out), code_prefix=_BLOCK_SKLEARN)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "pip install" in lines[0] and "scikit-learn" in lines[0]
    assert not (out / "config.toml").exists()
    # the blocker is what made it fail: here scikit-learn is installed and digits loads
    pytest.importorskip("sklearn")
    from pyeqprop.data import load_dataset

    assert load_dataset("digits").n_train == 1437


def test_entry_point_script_runs(tmp_path):
    import shutil

    exe = shutil.which("pyeqprop")
    if exe is None:
        pytest.skip("the pyeqprop script is not on PATH (package not installed)")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "train" in proc.stdout

