"""The conformance vector files: the case record, the ``.npz`` files and ``manifest.json``.

A vectors folder holds one ``<case>.npz`` per :class:`Case` (an uncompressed zip of ``.npy``
files, keys sorted, fixed timestamps) and ``manifest.json`` (:data:`FORMAT`; per case the
method, the cited equations, the call, the arrays' shapes and dtypes, the tolerances and
notes). :func:`write_vectors` writes them deterministically: the same cases give
byte-identical files. :func:`load_manifest` and :func:`load_case` read them back;
:func:`default_vectors_dir` is the copy shipped with the package (``pyeqprop/conformance/vectors``).
The layout is documented in ``docs/conformance.md``.
"""
from __future__ import annotations

import io
import json
import zipfile
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..testing.rounding import EPS, GAMMA

__all__ = ["FORMAT", "Case", "default_vectors_dir", "manifest_entry", "write_vectors", "load_manifest", "load_case"]

FORMAT = "pyeqprop-conformance/1"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: identical bytes on every regeneration


def default_vectors_dir() -> Path:
    """The vectors shipped with the package: ``pyeqprop/conformance/vectors`` (package data).

    Found with :func:`importlib.resources.files`, so a checkout, an editable install and a
    wheel install all work; ``python -m pyeqprop.conformance regenerate`` writes here.

    Returns
    -------
    pathlib.Path

    Raises
    ------
    FileNotFoundError
        When the package is not installed as files on disk (e.g. imported from a zip).
    """
    d = resources.files("pyeqprop.conformance") / "vectors"
    if not isinstance(d, Path):
        raise FileNotFoundError(f"the conformance vectors {d} are not a folder on disk; pass --vectors DIR")
    return d


@dataclass
class Case:
    """One conformance case.

    ``call`` lists the adapter method's positional arguments as references: ``inputs/NAME``
    (an array, or a list of arrays when stored as ``inputs/NAME/0``, ``/1``, …), ``params``
    (the dict of every stored parameter), ``params/NAME`` (one parameter), ``args/NAME``
    (a JSON value from ``args``). ``expected`` maps output names (the method's outputs, see
    :data:`pyeqprop.conformance.adapter.PROTOCOL`) to an array, a list of arrays or a dict
    of arrays; ``tolerance`` is keyed by the flattened output key (``y``, ``state/0``,
    ``grads/conv1.weight``).
    """

    name: str
    method: str
    equations: list
    description: str
    call: list
    args: dict
    inputs: dict
    params: dict
    expected: dict
    tolerance: dict
    seed: int
    notes: dict = field(default_factory=dict)  # provenance and conditioning margins (manifest "notes")

    def arrays(self) -> dict:
        """Every stored array under its npz key."""
        out = {}
        for name, v in self.inputs.items():
            out.update(_flatten(f"inputs/{name}", v))
        for name, v in self.params.items():
            out[f"params/{name}"] = np.asarray(v)
        for name, v in self.expected.items():
            out.update(_flatten(f"expected/{name}", v))
        return out


def _flatten(prefix, v) -> dict:
    """npz keys of a value: ``prefix`` (an array), ``prefix/i`` (a list), ``prefix/NAME`` (a dict)."""
    if isinstance(v, dict):
        return {f"{prefix}/{k}": np.asarray(a) for k, a in v.items()}
    if isinstance(v, (list, tuple)):
        return {f"{prefix}/{i}": np.asarray(a) for i, a in enumerate(v)}
    return {prefix: np.asarray(v)}


def _npy_bytes(a: np.ndarray) -> bytes:
    """The .npy serialisation of ``a`` (C order, no pickle)."""
    buf = io.BytesIO()
    a = np.asarray(a)
    np.lib.format.write_array(buf, a if a.flags.c_contiguous else a.copy(order="C"), allow_pickle=False)
    return buf.getvalue()


def _write_npz(path: Path, arrays: dict) -> None:
    """An .npz (a zip of .npy files, keys sorted) with fixed timestamps: the same arrays give the same bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(key + ".npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED  # as np.savez: no compressor whose output could vary
            info.external_attr = 0o644 << 16
            zf.writestr(info, _npy_bytes(arrays[key]))
    path.write_bytes(buf.getvalue())


def _describe(a: np.ndarray) -> dict:
    """Shape and dtype of an array, as the manifest lists them."""
    return {"shape": list(a.shape), "dtype": str(a.dtype)}


def manifest_entry(case: Case) -> dict:
    """The manifest entry of one case.

    Parameters
    ----------
    case : Case

    Returns
    -------
    dict
        ``file``, ``method``, ``equations``, ``description``, ``call``, ``args``, ``arrays``
        (shape and dtype per npz key), ``tolerance``, ``seed``, ``notes``.
    """
    arrays = case.arrays()
    return {
        "file": f"{case.name}.npz",
        "method": case.method,
        "equations": list(case.equations),
        "description": case.description,
        "call": list(case.call),
        "args": case.args,
        "arrays": {k: _describe(v) for k, v in sorted(arrays.items())},
        "tolerance": case.tolerance,
        "seed": case.seed,
        "notes": case.notes,
    }


def _json_default(o):
    """NumPy scalars and tuples as JSON values."""
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_vectors(out_dir, cases=None) -> Path:
    """Write one ``<case>.npz`` per case and ``manifest.json`` to ``out_dir``.

    Deterministic: the same cases give byte-identical files (sorted keys, fixed zip timestamps,
    no wall-clock data). Stale ``.npz`` files of cases that no longer exist are removed.

    Parameters
    ----------
    out_dir : path-like
        The folder (created if missing).
    cases : list of Case, optional
        Default: :func:`pyeqprop.conformance.cases.build_cases`.

    Returns
    -------
    pathlib.Path
        The path of ``manifest.json``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cases is None:
        from .cases import build_cases

        cases = build_cases()
    manifest = {
        "format": FORMAT,
        "dtype": "float64",
        "tolerance_rule": ("pass iff max|actual - expected| <= atol for every output (rtol = 0); atol = gamma * scale "
                           "(* amplification for chained stages), gamma = 128 * eps(float64); scale = the largest "
                           "sum of |terms| of an element (see pyeqprop/conformance/cases.py and docs/conformance.md); "
                           "integer outputs and depth-0 outputs (max pooling, activations) must match exactly"),
        "gamma": GAMMA,
        "eps": EPS,
        "cases": {},
    }
    keep = set()
    for case in cases:
        arrays = case.arrays()
        for k, v in arrays.items():
            if v.dtype.kind == "f" and v.dtype != np.float64:
                raise AssertionError(f"{case.name}: {k} is {v.dtype}, expected float64")
        expected_keys = {k[len("expected/"):] for k in arrays if k.startswith("expected/")}
        if expected_keys != set(case.tolerance):
            raise AssertionError(f"{case.name}: tolerances for {sorted(case.tolerance)}, "
                                 f"but outputs {sorted(expected_keys)}")
        _write_npz(out / f"{case.name}.npz", arrays)
        keep.add(f"{case.name}.npz")
        manifest["cases"][case.name] = manifest_entry(case)
    for stale in out.glob("*.npz"):
        if stale.name not in keep:
            stale.unlink()
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest, indent=1, sort_keys=True, ensure_ascii=False, default=_json_default) + "\n",
                    encoding="utf-8")
    return path


def load_manifest(vectors_dir=None) -> dict:
    """The parsed ``manifest.json`` of a vectors folder.

    Parameters
    ----------
    vectors_dir : path-like, optional
        Default: :func:`default_vectors_dir`.

    Returns
    -------
    dict

    Raises
    ------
    FileNotFoundError
        When the folder has no ``manifest.json``.
    ValueError
        When its ``format`` is not :data:`FORMAT`.
    """
    d = Path(vectors_dir) if vectors_dir is not None else default_vectors_dir()
    path = d / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no conformance manifest at {path}; run 'python -m pyeqprop.conformance regenerate' "
                                "or pass --vectors DIR")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_case(vectors_dir, entry: dict) -> dict:
    """The arrays of one case.

    Parameters
    ----------
    vectors_dir : path-like
        The vectors folder.
    entry : dict
        The case's manifest entry.

    Returns
    -------
    dict
        npz key → array.
    """
    with np.load(Path(vectors_dir) / entry["file"], allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
