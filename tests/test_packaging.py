"""The wheel ships the conformance vectors, and an installed (non-editable) copy runs ``pyeqprop conformance``.

The wheel is built offline from a copy of the sources (``pip wheel --no-deps --no-build-isolation
--no-index``, with the setuptools of this environment), so the checkout gets no ``build/`` folder.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VECTORS = "pyeqprop/conformance/vectors"

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("pip") is None,
    reason="building a wheel without build isolation needs pip and setuptools in this environment")


def _pip(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "pip", *args, "--no-index", "--disable-pip-version-check", "-q"],
                       cwd=cwd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the current sources."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "pyeqprop", src / "pyeqprop", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _pip("wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp / "dist"), str(src), cwd=tmp)
    (path,) = (tmp / "dist").glob("pyeqprop-*.whl")
    return path


def test_wheel_contains_the_manifest_and_every_vector(wheel):
    """The wheel holds ``manifest.json`` and exactly the ``.npz`` files it names, byte for byte as committed."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert f"{VECTORS}/manifest.json" in names
        manifest = json.loads(z.read(f"{VECTORS}/manifest.json"))
        files = {e["file"] for e in manifest["cases"].values()}
        assert files and {n for n in names if n.startswith(f"{VECTORS}/") and n.endswith(".npz")} == \
            {f"{VECTORS}/{f}" for f in files}
        for f in sorted(files) + ["manifest.json"]:
            assert z.read(f"{VECTORS}/{f}") == (ROOT / VECTORS / f).read_bytes(), f


def test_wheel_ships_py_typed_and_no_unused_dependency(wheel):
    """PEP 561's marker is in the wheel, and its hard requirements are what the package imports (scipy was
    required and never imported; tqdm draws the progress bars; threadpoolctl gives each batch shard one BLAS
    thread, Eq. 4.7)."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert "pyeqprop/py.typed" in names
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = z.read(meta).decode()
    hard = sorted(line.split(":", 1)[1].split(">")[0].split("<")[0].strip() for line in text.splitlines()
                  if line.startswith("Requires-Dist:") and "extra ==" not in line and "python_version" not in line)
    assert hard == ["array-api-compat", "numpy", "threadpoolctl", "tqdm"], hard
    assert "Provides-Extra: data" in text and "Provides-Extra: mnist5k" in text


def test_installed_wheel_runs_conformance(wheel, tmp_path):
    """Installed with ``pip install --target`` (no editable hook, no checkout on the path), the package finds
    its vectors by ``importlib.resources`` and passes every case."""
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    code = ("import sys, pyeqprop; from pathlib import Path; "
            f"assert Path(pyeqprop.__file__).resolve().is_relative_to(Path({str(site)!r}).resolve()), "
            "pyeqprop.__file__; from pyeqprop.cli import main; sys.exit(main(['conformance']))")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(json.loads((ROOT / VECTORS / "manifest.json").read_text(encoding="utf-8"))["cases"])
    last = r.stdout.splitlines()[-1]
    assert last.startswith(f"{n} passed, 0 failed, 0 skipped") and str(site / VECTORS) in last, last
