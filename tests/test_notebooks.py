"""The notebooks in notebooks/: paired with their .ipynb, committed without outputs, and executable.

Every ``notebooks/*.py`` (jupytext percent format, the reviewed text) must have a paired
``.ipynb`` with the same cells and no outputs, and must run top to bottom without an error.
A notebook runs in a kernel of *this* interpreter (a kernel spec written to a temporary
folder, so a ``python3`` kernel installed elsewhere, perhaps for another environment, is
never used), in a temporary working directory, with ``PYEQPROP_NOTEBOOK_CI=1`` so that the
notebooks pick their small sizes. Excluding a notebook needs a reason in
``notebooks/README.md`` (none is excluded).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import jupytext
import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.py"))
EXCLUDED: dict[str, str] = {}  # file name -> reason (also written in notebooks/README.md)
CELL_TIMEOUT_S = 180
KERNEL_NAME = "pyeqprop-test-python3"


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_notebooks_are_found():
    assert NOTEBOOKS, f"no notebooks/*.py found in {NOTEBOOK_DIR}"


def test_exclusions_are_explained():
    readme = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    for name in EXCLUDED:
        assert name in readme, f"{name} is excluded from execution but notebooks/README.md does not say why"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_pairing_in_sync_without_outputs(path):
    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} is missing: run  jupytext --to ipynb notebooks/{path.name}"
    text = jupytext.read(path)
    paired = nbformat.read(ipynb, as_version=4)
    assert _cells(paired) == _cells(text), (
        f"{ipynb.name} is out of sync with {path.name}: run  jupytext --to ipynb notebooks/{path.name}")
    for i, cell in enumerate(paired.cells):
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"{ipynb.name} cell {i} has outputs committed; clear them"
            assert cell.get("execution_count") is None, f"{ipynb.name} cell {i} has an execution count committed"


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """A kernel spec for this interpreter in a temporary folder (nothing installed for the user)."""
    kernels = tmp_path_factory.mktemp("kernels")
    write_kernel_spec(kernels / KERNEL_NAME, overrides={"display_name": f"Python {sys.version.split()[0]} (tests)"})
    return KernelSpecManager(kernel_dirs=[str(kernels)], ensure_native_kernel=False)


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in EXCLUDED], ids=lambda p: p.name)
def test_notebook_executes(path, kernel_spec_manager, tmp_path, monkeypatch):
    monkeypatch.setenv("PYEQPROP_NOTEBOOK_CI", "1")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))  # connection files
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))  # a fresh machine may have no writable ~/.ipython
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    work = tmp_path / "cwd"
    work.mkdir()
    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    nb = jupytext.read(path)
    km = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, startup_timeout=120, allow_errors=False,
                            resources={"metadata": {"path": str(work)}})
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError naming the cell on the first error
    print(f"{path.name}: executed in {time.perf_counter() - t0:.1f}s")
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before, f"{path.name} wrote into notebooks/"
