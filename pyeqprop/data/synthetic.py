"""A seeded, learnable synthetic image classification set, for tests and smoke runs.

Model: class k has a prototype P_k ∈ {0, 1}^(c×h×w) (independent fair coin flips); a sample of
class k is clip(P_k + σ·ε, 0, 1) with ε standard normal per pixel, σ = ``noise``. Labels are
balanced (sample i has class i mod K before shuffling). Two prototypes differ in about half of
their d = c·h·w pixels, so nearest-prototype classification is near perfect for σ ≲ 1 and
d ≳ 50; a network that learns anything should beat chance by far.

Everything is drawn from ``numpy.random.default_rng(seed)``: the same arguments give the same
arrays on every platform.
"""
from __future__ import annotations

import numpy as np

from .datasets import DEFAULT_TEST_FRACTION, Dataset, stratified_dataset

__all__ = ["load_synthetic", "make_synthetic"]


def make_synthetic(input_shape=(1, 8, 8), num_classes: int = 4, size: int = 256, *, noise: float = 0.3,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (x float32 (size, c, h, w), y int64 (size,), prototypes float32 (K, c, h, w))."""
    input_shape = tuple(int(d) for d in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (c, h, w) with positive sizes, got {input_shape}")
    if num_classes < 2 or size < num_classes:
        raise ValueError(f"need num_classes >= 2 and size >= num_classes, got {num_classes}, {size}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 2, size=(num_classes, *input_shape)).astype(np.float32)  # (K, c, h, w)
    y = np.arange(size, dtype=np.int64) % num_classes
    y = y[rng.permutation(size)]
    eps = rng.standard_normal((size, *input_shape)).astype(np.float32)  # (size, c, h, w)
    x = np.clip(prototypes[y] + np.float32(noise) * eps, 0.0, 1.0).astype(np.float32)
    return x, y, prototypes


def load_synthetic(*, seed: int = 0, test_fraction: float = DEFAULT_TEST_FRACTION, input_shape=(1, 8, 8),
                   num_classes: int = 4, size: int = 256, noise: float = 0.3) -> Dataset:
    """The synthetic set as a :class:`Dataset` with a stratified split (both seeded by ``seed``)."""
    x, y, _ = make_synthetic(input_shape, num_classes, size, noise=noise, seed=seed)
    meta = {"source": "synthetic", "noise": float(noise), "size": int(size),
            "class_names": [str(k) for k in range(num_classes)]}
    return stratified_dataset("synthetic", x, y, num_classes=num_classes, seed=seed,
                               test_fraction=test_fraction, metadata=meta)
