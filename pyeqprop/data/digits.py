"""The UCI optical digits that ship inside scikit-learn (the default data set).

Source: ``sklearn/datasets/data/digits.csv.gz`` of the *installed* scikit-learn, read directly
(scikit-learn is not imported and nothing is fetched). 1797 rows of 65 integers: 64 pixel values
in 0..16 (an 8×8 image, row-major) and the class label 0..9 in the last column.

Result: x float32 (n, 1, 8, 8) = pixel / 16, in [0, 1]; y int64. Split: stratified and seeded
(:func:`pyeqprop.data.datasets.stratified_split`); the default test fraction 0.2 gives
1437 training and 360 test images.
"""
from __future__ import annotations

import numpy as np

from .datasets import DEFAULT_TEST_FRACTION, Dataset, stratified_dataset, packaged_file

__all__ = ["load_digits", "DIGITS_FILE", "INSTALL_HINT"]

DIGITS_FILE = "datasets/data/digits.csv.gz"  # relative to the sklearn package folder
INSTALL_HINT = 'pip install "pyeqprop[data]"  (or: pip install scikit-learn)'


def load_digits(*, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> Dataset:
    """Load the 8×8 digits with a stratified split seeded by ``seed``."""
    path = packaged_file("sklearn", DIGITS_FILE, install=INSTALL_HINT)
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)  # (1797, 65)
    if table.ndim != 2 or table.shape[1] != 65:
        raise ValueError(f"{path}: expected rows of 64 pixels and a label, got shape {table.shape}")
    x = (table[:, :64] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)  # (n, 64) -> (n, 1, 8, 8)
    y = table[:, 64].astype(np.int64)
    return stratified_dataset("digits", x, y, num_classes=10, seed=seed, test_fraction=test_fraction,
                               metadata={"source": str(path), "class_names": [str(k) for k in range(10)]})
