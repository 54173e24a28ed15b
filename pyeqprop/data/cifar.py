"""CIFAR-10 and CIFAR-100 from the official "python version" archives.

Formats accepted
----------------
* the archive itself (``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz``), read with
  :mod:`tarfile` member by member, never extracted to disk;
* the extracted folder: ``cifar-10-batches-py/`` with ``data_batch_1`` … ``data_batch_5``,
  ``test_batch`` and ``batches.meta``; ``cifar-100-python/`` with ``train``, ``test`` and ``meta``.

Each member is a pickled dict (written by Python 2, so its keys are usually ``bytes``:
``b'data'``): ``data`` uint8 (N, 3072), one row = the red 32×32 plane, then green, then blue,
each row-major; ``labels`` (CIFAR-10) or ``fine_labels``/``coarse_labels`` (CIFAR-100, we use
the 100 fine labels). The pickles are read with a restricted unpickler that only rebuilds NumPy
arrays, lists, strings and numbers, so a tampered file cannot run code.

Result: x float32 (N, 3, 32, 32) = data / 255, in [0, 1]; y int64; the official split
(50 000 / 10 000).

Where the data is looked for
----------------------------
``root`` when given; otherwise ``$CIFAR10_DIR`` (``$CIFAR100_DIR``) when set, then the data folder
``$PYEQPROP_DATA`` or ``~/.cache/pyeqprop``. Each place may be the archive file, the extracted
folder, or a folder holding either. With ``download=True`` and nothing found, the archive is
fetched into ``root`` (or the data folder) from ``base_url`` (argument, else
``$PYEQPROP_CIFAR_URL``, else the official Toronto address) and checked against ``md5``
(default: the official checksum).

Normalisation (``Dataset.mean``/``std``, applied after augmentation)
--------------------------------------------------------------------
* CIFAR-10: mean (0.4914, 0.4822, 0.4465), std 3 × (0.2023, 0.1994, 0.2010): the recipe of
  Laborieux et al. 2021, whose factor 3 deliberately scales the inputs down.
* CIFAR-100: mean (0.5071, 0.4865, 0.4409) and std 3 × (0.2673, 0.2564, 0.2762): the commonly
  used per-channel statistics of the CIFAR-100 training set, with the same factor 3 so that a
  network tuned on CIFAR-10 sees inputs of the same scale.
"""
from __future__ import annotations

import codecs
import gzip
import os
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np

from .datasets import Dataset, data_root
from .download import CorruptArchiveError, download as _download

__all__ = [
    "CifarSpec",
    "CIFAR",
    "CIFAR_BASE_URL",
    "CIFAR10_URL",
    "CIFAR10_MD5",
    "CIFAR100_URL",
    "CIFAR100_MD5",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "load_cifar10",
    "load_cifar100",
    "find_cifar",
    "cifar_url",
]

CIFAR_BASE_URL = "https://www.cs.toronto.edu/~kriz/"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"

STD_FACTOR = 3.0  # Laborieux et al. 2021 divide by 3 × the usual std
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = tuple(STD_FACTOR * s for s in (0.2023, 0.1994, 0.2010))
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = tuple(STD_FACTOR * s for s in (0.2673, 0.2564, 0.2762))

_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarSpec:
    """Layout of one CIFAR archive (member names are relative to ``folder``)."""

    name: str
    archive: str
    md5: str
    folder: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    meta: str
    label_key: str
    names_key: str
    num_classes: int
    env: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def members(self) -> tuple[str, ...]:
        return self.train + self.test + (self.meta,)


CIFAR = {
    "cifar10": CifarSpec(
        name="cifar10", archive="cifar-10-python.tar.gz", md5=CIFAR10_MD5, folder="cifar-10-batches-py",
        train=tuple(f"data_batch_{k}" for k in range(1, 6)), test=("test_batch",), meta="batches.meta",
        label_key="labels", names_key="label_names", num_classes=10, env="CIFAR10_DIR",
        mean=CIFAR10_MEAN, std=CIFAR10_STD),
    "cifar100": CifarSpec(
        name="cifar100", archive="cifar-100-python.tar.gz", md5=CIFAR100_MD5, folder="cifar-100-python",
        train=("train",), test=("test",), meta="meta",
        label_key="fine_labels", names_key="fine_label_names", num_classes=100, env="CIFAR100_DIR",
        mean=CIFAR100_MEAN, std=CIFAR100_STD),
}


def cifar_url(name: str, base_url: str | None = None) -> str:
    """Download address of the archive of ``name``: ``base_url`` (else ``$PYEQPROP_CIFAR_URL``,
    else :data:`CIFAR_BASE_URL`) joined with the archive's file name."""
    spec = CIFAR[name]
    base = base_url or os.environ.get("PYEQPROP_CIFAR_URL") or CIFAR_BASE_URL
    return base.rstrip("/") + "/" + spec.archive


def _candidates(spec: CifarSpec, root) -> list[Path]:
    if root is not None:
        return [Path(root).expanduser()]
    places = []
    env = os.environ.get(spec.env)
    if env:
        places.append(Path(env).expanduser())
    places.append(data_root())
    return places


def find_cifar(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The extracted folder or the archive of ``name`` in the search places, or ``None``.

    In each place an extracted folder is preferred to an archive (it is faster to read).
    """
    spec = CIFAR[name]
    for place in _candidates(spec, root):
        if place.is_file():
            return place
        if not place.is_dir():
            continue
        if (place / spec.train[0]).is_file():
            return place
        if (place / spec.folder).is_dir():
            return place / spec.folder
        if (place / spec.archive).is_file():
            return place / spec.archive
    return None


def load_cifar10(*, root=None, download: bool = False, base_url: str | None = None, md5: str | None = None,
                 timeout: float = 60.0, progress: Callable[[int, int | None], None] | None = None) -> Dataset:
    """CIFAR-10 (10 classes, 50 000 / 10 000 images of 3×32×32); see the module notes."""
    return _load(CIFAR["cifar10"], root=root, download=download, base_url=base_url, md5=md5,
                 timeout=timeout, progress=progress)


def load_cifar100(*, root=None, download: bool = False, base_url: str | None = None, md5: str | None = None,
                  timeout: float = 60.0, progress: Callable[[int, int | None], None] | None = None) -> Dataset:
    """CIFAR-100 with its 100 fine labels (50 000 / 10 000 images of 3×32×32); see the module notes."""
    return _load(CIFAR["cifar100"], root=root, download=download, base_url=base_url, md5=md5,
                 timeout=timeout, progress=progress)


def _load(spec: CifarSpec, *, root, download, base_url, md5, timeout, progress) -> Dataset:
    source = find_cifar(spec.name, root)
    meta: dict = {}
    if source is None:
        url = cifar_url(spec.name, base_url)
        if not download:
            looked = ", ".join(str(p) for p in _candidates(spec, root))
            raise FileNotFoundError(
                f"{spec.name} not found (looked in: {looked}); to fetch {url}: pyeqprop train --download true "
                f"(download=True in Python), or point ${spec.env} (or --data-root, root=) at {spec.archive} or the "
                f"extracted {spec.folder}/ folder")
        dest = data_root(root) / spec.archive
        source = _download(url, dest, md5 or spec.md5, timeout=timeout, progress=progress)
        meta["url"] = url
    entries = _read_folder(spec, source) if source.is_dir() else _read_archive(spec, source)

    x_train, y_train = _join(spec, [entries[m] for m in spec.train], source)
    x_test, y_test = _join(spec, [entries[m] for m in spec.test], source)
    names = entries[spec.meta].get(spec.names_key)
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names] if names else None
    meta.update(source=str(source), format="folder" if source.is_dir() else "archive", split="official",
                class_names=class_names, normalisation_std_factor=STD_FACTOR)
    return Dataset(name=spec.name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   num_classes=spec.num_classes, mean=spec.mean, std=spec.std, metadata=meta)


def _join(spec: CifarSpec, entries: list[dict], source: Path) -> tuple[np.ndarray, np.ndarray]:
    """Stack batches: data (N, 3072) uint8 -> x (N, 3, 32, 32) float32 in [0, 1]; labels -> int64."""
    data = np.concatenate([e["data"] for e in entries])  # (N, 3072): R plane, G plane, B plane
    y = np.concatenate([np.asarray(e[spec.label_key], dtype=np.int64) for e in entries])
    if y.size and (y.min() < 0 or y.max() >= spec.num_classes):
        raise CorruptArchiveError(f"{source}: labels outside [0, {spec.num_classes}) in {spec.name}")
    x = data.reshape(-1, 3, 32, 32).astype(np.float32)  # (N, 3072) -> (N, c=3, h=32, w=32)
    np.divide(x, np.float32(255.0), out=x)
    return x, y


def _read_folder(spec: CifarSpec, folder: Path) -> dict[str, dict]:
    missing = [m for m in spec.members if not (folder / m).is_file()]
    if missing:
        raise CorruptArchiveError(f"incomplete {spec.name} folder {folder}: missing {', '.join(missing)}")
    out = {}
    for m in spec.members:
        with open(folder / m, "rb") as f:
            out[m] = _check(spec, m, _unpickle(f, f"{folder / m}"), f"{folder / m}")
    return out


def _read_archive(spec: CifarSpec, path: Path) -> dict[str, dict]:
    """Read the wanted members in one pass over the gzip stream (no extraction to disk)."""
    out = {}
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptArchiveError(
            f"{path} is not a readable {spec.name} archive: neither a gzip-compressed nor a plain tar file "
            f"({type(exc).__name__}); delete it and fetch it again") from exc
    try:
        with tar:
            for info in tar:
                p = PurePosixPath(info.name.removeprefix("./"))
                if not info.isfile() or p.name not in spec.members or str(p.parent) not in (spec.folder, "."):
                    continue
                where = f"{path}:{info.name}"
                out[p.name] = _check(spec, p.name, _unpickle(tar.extractfile(info), where), where)
    except CorruptArchiveError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise CorruptArchiveError(
            f"{path} is a damaged {spec.name} archive ({type(exc).__name__}: {exc}); "
            "delete it and fetch it again") from exc
    missing = [m for m in spec.members if m not in out]
    if missing:
        raise CorruptArchiveError(f"{path} is not a complete {spec.name} archive: missing members "
                                  f"{', '.join(spec.folder + '/' + m for m in missing)}")
    return out


def _check(spec: CifarSpec, member: str, entry, where: str) -> dict:
    """Validate one unpickled member; data -> uint8 (N, 3072)."""
    if not isinstance(entry, dict):
        raise CorruptArchiveError(f"{where}: expected a pickled dict, got {type(entry).__name__}")
    if member == spec.meta:
        return entry
    for key in ("data", spec.label_key):
        if key not in entry:
            raise CorruptArchiveError(f"{where}: no {key!r} entry (keys: {sorted(entry)})")
    data = np.asarray(entry["data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise CorruptArchiveError(f"{where}: 'data' must be uint8 (N, {_PIXELS}), got {data.dtype} {data.shape}")
    if len(entry[spec.label_key]) != data.shape[0]:
        raise CorruptArchiveError(f"{where}: {data.shape[0]} images but {len(entry[spec.label_key])} labels")
    return dict(entry, data=data)


def _numpy_globals() -> dict:
    try:  # NumPy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import multiarray, numeric
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}
    for mod in ("numpy.core", "numpy._core"):
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):
            allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _SafeUnpickler(pickle.Unpickler):
    """Rebuilds only NumPy arrays/dtypes (plus builtin containers, strings and numbers)."""

    _allowed: dict | None = None

    def find_class(self, module, name):
        if _SafeUnpickler._allowed is None:
            _SafeUnpickler._allowed = _numpy_globals()
        obj = _SafeUnpickler._allowed.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds only "
                                         "NumPy arrays, lists, strings and numbers")
        return obj


def _unpickle(fileobj, where: str) -> dict:
    """Unpickle one CIFAR member; bytes keys (Python-2 pickles) become str."""
    try:
        obj = _SafeUnpickler(fileobj, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise CorruptArchiveError(f"{where}: cannot read a CIFAR pickle, the file is truncated or corrupt "
                                  f"({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict):
        obj = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    return obj
