"""The README's Python examples run as written (the CuPy one needs a GPU and is left to notebook 05)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def test_the_readme_has_python_examples():
    assert len(_blocks()) >= 3


def test_the_readme_python_examples_run_in_order():
    ns: dict = {}
    ran = 0
    for code in _blocks():
        if "cupy" in code:
            continue
        exec(compile(code, str(README), "exec"), ns)  # the library example, then the settling example
        ran += 1
    assert ran >= 2
    assert ns["r"].free.converged and set(ns["g_star"]) == set(ns["net"].params)


def test_the_readme_test_command_is_what_ci_runs():
    """README's test command (after "what `.ci/run` runs") is .ci/run's last line, word for word, and it
    installs the mpi extra that tests/test_parallel.py needs."""
    text = README.read_text(encoding="utf-8")
    after = text.split("what `.ci/run` runs", 1)[1]
    command = re.search(r"\n\n    (.+)\n", after).group(1)
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert command == ci
    assert '".[test,mpi]"' in ci
