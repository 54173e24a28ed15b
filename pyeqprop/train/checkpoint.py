"""Checkpoints: atomic ``.npz`` files holding parameters, optimizer state, epoch, RNG state and config.

Format (version 2), the entries of one uncompressed ``.npz``, readable with
``numpy.load(path, allow_pickle=False)``:

``__pyeqprop_format__``   JSON string {"format": "pyeqprop.checkpoint", "version": 1}; a file
                          without it is not one of ours.
``param/<name>``          each parameter as a host NumPy array, e.g. ``param/conv1.weight``.
``array/<i>``             arrays found inside the optimizer state, RNG state, progress or ``extra``.
``meta``                  JSON string: parameter order, epoch, optimizer state, RNG state,
                          progress, extra; arrays inside them appear as {"__array__": "array/<i>"}.
``config``                JSON string of the run configuration.

``progress`` is the training loop's own record (position, running sums of the epoch, metrics
history, best validation score; :mod:`pyeqprop.train.loop`). Version 1 files kept it inside
``extra``; :func:`load_checkpoint` reads it from there.

JSON turns tuples into lists and NumPy scalars into Python numbers. The RNG state is
``numpy.random.Generator.bit_generator.state`` (a dict of Python ints for PCG64).

Writes are atomic: the file is written to a temporary ``.<name>.<random>.tmp`` in the same
directory, flushed and fsynced, then renamed over ``path`` with ``os.replace`` (atomic on
POSIX and Windows within one file system), and the directory is fsynced. A crash at any
point leaves either the previous checkpoint or the new one at ``path``, never a mixture;
an exception during the write removes the temporary file (a killed process can leave it
behind; it never has the checkpoint's name).
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np

from ..backend import to_numpy

__all__ = ["CheckpointError", "Checkpoint", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint",
           "check_compatible", "save_teacher", "load_teacher"]

FORMAT_NAME = "pyeqprop.checkpoint"
FORMAT_VERSION = 2
_PROGRESS_KEYS = ("position", "accum", "history", "best_test_acc")  # in version 1 files, inside extra
_MARKER = "__pyeqprop_format__"
_PARAM = "param/"
_ARRAY = "array/"


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message names the path or key."""


@dataclass
class Checkpoint:
    """A loaded checkpoint; every array is a host NumPy array."""

    path: str
    params: dict
    optimizer_state: dict | None = None
    epoch: int = 0
    rng_state: dict | None = None
    config: dict | None = None
    extra: dict | None = None
    version: int = FORMAT_VERSION
    progress: dict | None = None
    param_order: list = field(default_factory=list)


# ---------------------------------------------------------------------- JSON trees with arrays
def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or hasattr(v, "__array_namespace__")


def _encode(tree, arrays: dict, where: str):
    """Replace arrays in a JSON-like tree by references into ``arrays`` (host NumPy)."""
    if _is_array(tree):
        key = f"{_ARRAY}{len(arrays)}"
        arrays[key] = np.asarray(to_numpy(tree))
        return {"__array__": key}
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if not isinstance(k, str):
                raise TypeError(f"checkpoint {where}: dict keys must be strings, got {k!r}")
            out[k] = _encode(v, arrays, f"{where}[{k!r}]")
        return out
    if isinstance(tree, (list, tuple)):
        return [_encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(tree)]
    if isinstance(tree, np.generic):
        return tree.item()
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    raise TypeError(f"checkpoint {where}: cannot store a value of type {type(tree).__name__} "
                    "(allowed: arrays, dicts with string keys, lists, numbers, strings, None)")


def _decode(tree, arrays: dict, path: str):
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            key = tree["__array__"]
            if key not in arrays:
                raise CheckpointError(f"checkpoint {path} is corrupt: entry {key!r} is referenced but missing")
            return arrays[key]
        return {k: _decode(v, arrays, path) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_decode(v, arrays, path) for v in tree]
    return tree


def _json(tree, where: str) -> str:
    try:
        return json.dumps(tree, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint {where} is not JSON-serialisable: {exc}") from exc


# ---------------------------------------------------------------------- atomic write
def _fsync_dir(directory: str) -> None:
    """fsync a directory so that a rename in it is durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_savez(path: str, entries: dict) -> None:
    """Write ``entries`` as an uncompressed .npz at ``path`` atomically (see the module docstring)."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CheckpointError(f"cannot write checkpoint {path}: directory {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **entries)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


def save_checkpoint(path, *, params: dict, optimizer_state: dict | None = None, epoch: int = 0,
                    rng_state: dict | None = None, config: dict | None = None, extra: dict | None = None,
                    progress: dict | None = None) -> str:
    """Write a checkpoint atomically and return its path.

    Parameters
    ----------
    path : str or PathLike
        The file name is used as given (no ``.npz`` is appended).
    params : dict[str, array]
        Parameters in any backend; stored as host NumPy arrays in their dtype.
    optimizer_state : dict or None
        e.g. :meth:`pyeqprop.train.optim.SGD.state_dict`; nested dicts of arrays and numbers.
    epoch : int
        The number of completed epochs.
    rng_state : dict or None
        ``numpy.random.Generator.bit_generator.state``.
    config : dict or None
        The run configuration; must be JSON-serialisable.
    extra : dict or None
        Anything else (arrays allowed, as in ``optimizer_state``).
    progress : dict or None
        The training loop's position, running sums, metrics history and best score.

    Raises ``TypeError`` naming the entry when something cannot be stored, before any file
    is touched.
    """
    path = os.fspath(path)
    if not isinstance(params, dict) or not params:
        raise ValueError("params must be a non-empty dict name -> array")
    entries: dict = {_MARKER: np.asarray(json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION}))}
    for name, value in params.items():
        if not isinstance(name, str) or not name or "/" in name:
            raise ValueError(f"parameter names must be non-empty strings without '/', got {name!r}")
        entries[_PARAM + name] = np.asarray(to_numpy(value))
    arrays: dict = {}
    meta = {
        "param_order": list(params),
        "epoch": int(epoch),
        "optimizer_state": _encode(optimizer_state, arrays, "optimizer_state"),
        "rng_state": _encode(rng_state, arrays, "rng_state"),
        "extra": _encode(extra, arrays, "extra"),
        "progress": _encode(progress, arrays, "progress"),
    }
    entries["meta"] = np.asarray(_json(meta, "meta"))
    entries["config"] = np.asarray(_json(config, "config"))
    entries.update(arrays)
    _atomic_savez(path, entries)
    return path


# ---------------------------------------------------------------------- load
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError, OSError, UnicodeDecodeError)


def _check_magic(path) -> None:
    """A file that is neither a zip (.npz) nor a .npy is not a checkpoint at all: say so, before NumPy
    guesses it is pickled data. An empty or one-byte file is left to the read (truncated)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return  # reported by the read below
    if len(head) >= 2 and not head.startswith((b"PK", b"\x93NUMPY")):
        raise CheckpointError(f"{path} is not a pyeqprop checkpoint: it is not an .npz archive (it begins with "
                              f"{head!r})")


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Raises
    ------
    CheckpointError
        naming ``path`` when the file is missing, truncated or corrupt, is not an ``.npz``,
        lacks the ``__pyeqprop_format__`` marker (a foreign ``.npz``), or was written by a
        newer format version.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a directory, not a file")
    _check_magic(path)
    try:
        obj = np.load(path, allow_pickle=False)
        if not isinstance(obj, np.lib.npyio.NpzFile):
            raise CheckpointError(f"{path} is a single .npy array, not a pyeqprop checkpoint (.npz)")
        with obj as z:
            if _MARKER not in z.files:
                raise CheckpointError(f"{path} is not a pyeqprop checkpoint: it has no {_MARKER!r} entry "
                                      f"(entries: {sorted(z.files)[:8]})")
            data = {k: z[k] for k in z.files}  # read every member now, so corruption shows here
    except CheckpointError:
        raise
    except PermissionError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    except _READ_ERRORS as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read "
                              f"({type(exc).__name__}: {exc})") from exc
    try:
        marker = json.loads(str(data[_MARKER][()]))
        version = int(marker["version"])
        if marker.get("format") != FORMAT_NAME:
            raise ValueError(f"format {marker.get('format')!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path} has an unreadable format marker ({exc})") from exc
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, newer than this pyeqprop "
                              f"reads ({FORMAT_VERSION}); upgrade pyeqprop")
    try:
        meta = json.loads(str(data["meta"][()]))
        config = json.loads(str(data["config"][()]))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt: missing or unreadable 'meta'/'config' ({exc})") from exc
    arrays = {k: v for k, v in data.items() if k.startswith(_ARRAY)}
    found = {k[len(_PARAM):]: v for k, v in data.items() if k.startswith(_PARAM)}
    order = list(meta.get("param_order", list(found)))
    missing = [k for k in order if k not in found]
    if missing:
        raise CheckpointError(f"checkpoint {path} is corrupt: parameter {missing[0]!r} is listed but missing")
    params = {k: found[k] for k in order}
    extra = _decode(meta.get("extra"), arrays, path)
    progress = _decode(meta.get("progress"), arrays, path)
    if version == 1 and isinstance(extra, dict) and "position" in extra:  # the loop's record rode in extra
        progress = {k: extra[k] for k in _PROGRESS_KEYS if k in extra}
        extra = {k: v for k, v in extra.items() if k not in _PROGRESS_KEYS} or None
    return Checkpoint(
        path=path,
        params=params,
        optimizer_state=_decode(meta.get("optimizer_state"), arrays, path),
        epoch=int(meta.get("epoch", 0)),
        rng_state=_decode(meta.get("rng_state"), arrays, path),
        config=config,
        extra=extra,
        version=version,
        param_order=order,
        progress=progress,
    )


def check_compatible(params_host: dict, model_params: dict) -> None:
    """Raise :class:`CheckpointError` unless the checkpoint's parameters fit the model's.

    Checks, in the model's parameter order, that every name is present with the same
    shape, then that the checkpoint has no other names. The message names the first
    mismatching key and both shapes ("checkpoint from another architecture").
    """
    for k, p in model_params.items():
        if k not in params_host:
            raise CheckpointError(f"checkpoint from another architecture: parameter {k!r} of the model "
                                  f"(shape {tuple(p.shape)}) is missing from the checkpoint "
                                  f"(it has {list(params_host)})")
        cs, ms = tuple(np.shape(params_host[k])), tuple(p.shape)
        if cs != ms:
            raise CheckpointError(f"checkpoint from another architecture: parameter {k!r} has shape {cs} "
                                  f"in the checkpoint but {ms} in the model")
    for k in params_host:
        if k not in model_params:
            raise CheckpointError(f"checkpoint from another architecture: it has parameter {k!r} "
                                  f"(shape {tuple(np.shape(params_host[k]))}) which the model lacks")


def _restore(model_params: dict, params_host: dict) -> None:
    """Copy host arrays into ``model_params`` in place, in each parameter's namespace, dtype and device."""
    from ..backend import device_of, namespace_of

    for k, p in model_params.items():
        xp = namespace_of(p)
        model_params[k] = xp.asarray(np.array(params_host[k], copy=True), dtype=p.dtype, device=device_of(p))


# ---------------------------------------------------------------------- teacher
def save_teacher(path, teacher, config: dict | None = None) -> str:
    """Save a :class:`~pyeqprop.model.teacher.Teacher` with its constructor arguments and ``config``."""
    return save_checkpoint(path, params=teacher.params, config=config,
                           extra={"kind": "teacher", "teacher": teacher.spec()})


def load_teacher(path, *, xp=None, dtype: str | None = None):
    """Rebuild a Teacher from :func:`save_teacher` output on namespace ``xp``.

    ``dtype`` None keeps the stored dtype. Raises :class:`CheckpointError` when the file is
    not a saved teacher or its parameters do not fit the stored architecture.
    """
    from ..model.teacher import Teacher

    ckpt = load_checkpoint(path)
    extra = ckpt.extra or {}
    if extra.get("kind") != "teacher" or not isinstance(extra.get("teacher"), dict):
        raise CheckpointError(f"checkpoint {ckpt.path} holds no teacher (save it with save_teacher)")
    spec = dict(extra["teacher"])
    if dtype is not None:
        spec["dtype"] = dtype
    try:
        teacher = Teacher(spec.pop("arch"), tuple(spec.pop("input_shape")), xp=xp, **spec)
    except (TypeError, KeyError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {ckpt.path} has an unusable teacher description {extra['teacher']}: "
                              f"{exc}") from exc
    check_compatible(ckpt.params, teacher.params)
    _restore(teacher.params, ckpt.params)
    return teacher
