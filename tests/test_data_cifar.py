"""CIFAR-10/100 loading from tiny archives and folders built in the real format."""
import os
import pickle

import numpy as np
import pytest

from _cifar_fixtures import make_tiny_cifar
from pyeqprop.data import CorruptArchiveError, load_dataset
from pyeqprop.data.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD, find_cifar

# read before the autouse fixture below hides them
REAL = {"cifar10": os.environ.get("CIFAR10_DIR"), "cifar100": os.environ.get("CIFAR100_DIR")}
NAMES = ("cifar10", "cifar100")


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path_factory):
    """No real data folder or mirror leaks into these tests; the default data folder is empty."""
    for var in ("CIFAR10_DIR", "CIFAR100_DIR", "PYEQPROP_CIFAR_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PYEQPROP_DATA", str(tmp_path_factory.mktemp("empty_data_root")))


@pytest.fixture(scope="module", params=NAMES)
def tiny(request):
    return make_tiny_cifar(request.param, seed=NAMES.index(request.param))


def _assert_matches(ds, fx):
    assert ds.name == fx.name
    assert ds.x_train.dtype == np.float32 and ds.x_train.shape == (40, 3, 32, 32)
    assert ds.y_train.dtype == np.int64 and ds.x_test.shape == (12, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train, fx.x_train)
    np.testing.assert_array_equal(ds.y_train, fx.y_train)
    np.testing.assert_array_equal(ds.x_test, fx.x_test)
    np.testing.assert_array_equal(ds.y_test, fx.y_test)
    assert ds.metadata["class_names"] == fx.class_names
    assert ds.metadata["split"] == "official"


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_load_from_parent_folder(tiny, form, tmp_path):
    (tiny.write_folder if form == "folder" else tiny.write_archive)(tmp_path)
    ds = load_dataset(tiny.name, root=tmp_path)
    _assert_matches(ds, tiny)
    assert ds.metadata["format"] == form
    assert ds.input_shape == (3, 32, 32)
    assert ds.num_classes == (10 if tiny.name == "cifar10" else 100)


def test_load_from_the_folder_or_archive_itself(tiny, tmp_path):
    folder = tiny.write_folder(tmp_path / "a")
    archive = tiny.write_archive(tmp_path / "b")
    _assert_matches(load_dataset(tiny.name, root=folder), tiny)
    _assert_matches(load_dataset(tiny.name, root=archive), tiny)


def test_folder_is_preferred_to_archive(tiny, tmp_path):
    tiny.write_folder(tmp_path)
    tiny.write_archive(tmp_path)
    assert find_cifar(tiny.name, tmp_path) == tmp_path / tiny.folder


def test_channel_planes_are_rgb_in_order(tmp_path):
    """One image whose R, G, B planes are constant 10, 20, 30: channel c must hold plane c."""
    fx = make_tiny_cifar("cifar10")
    entry = pickle.loads(fx.members["test_batch"], encoding="bytes")
    entry[b"data"][0] = np.repeat(np.array([10, 20, 30], np.uint8), 1024)
    fx.members["test_batch"] = pickle.dumps(entry, protocol=2)
    fx.write_archive(tmp_path)
    x0 = load_dataset("cifar10", root=tmp_path).x_test[0]
    for c, v in enumerate((10, 20, 30)):
        assert np.all(x0[c] == np.float32(v) / np.float32(255))


def test_str_keys_are_accepted_too(tmp_path):
    fx = make_tiny_cifar("cifar10")
    for m, blob in fx.members.items():
        d = pickle.loads(blob, encoding="bytes")
        fx.members[m] = pickle.dumps({k.decode(): v for k, v in d.items()})  # Python-3 style pickle
    fx.write_folder(tmp_path)
    _assert_matches(load_dataset("cifar10", root=tmp_path), fx)


def test_normalisation_constants():
    assert CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert np.allclose(CIFAR10_STD, [3 * 0.2023, 3 * 0.1994, 3 * 0.2010], rtol=0, atol=1e-12)
    assert CIFAR100_MEAN == (0.5071, 0.4865, 0.4409)
    assert np.allclose(CIFAR100_STD, [3 * 0.2673, 3 * 0.2564, 3 * 0.2762], rtol=0, atol=1e-12)


def test_dataset_carries_the_normalisation(tiny, tmp_path):
    tiny.write_archive(tmp_path)
    ds = load_dataset(tiny.name, root=tmp_path)
    want = (CIFAR10_MEAN, CIFAR10_STD) if tiny.name == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
    assert (ds.mean, ds.std) == want


# ---------------------------------------------------------------- where the data is looked for
def test_env_dir_is_used_without_root(tiny, tmp_path, monkeypatch):
    folder = tiny.write_folder(tmp_path)
    monkeypatch.setenv("CIFAR10_DIR" if tiny.name == "cifar10" else "CIFAR100_DIR", str(folder))
    _assert_matches(load_dataset(tiny.name), tiny)


def test_data_root_env_is_searched(tiny, tmp_path, monkeypatch):
    tiny.write_archive(tmp_path)
    monkeypatch.setenv("PYEQPROP_DATA", str(tmp_path))
    _assert_matches(load_dataset(tiny.name), tiny)


def test_root_argument_wins_over_env(tmp_path, monkeypatch):
    a = make_tiny_cifar("cifar10", seed=1)
    b = make_tiny_cifar("cifar10", seed=2)
    a.write_folder(tmp_path / "a")
    b.write_folder(tmp_path / "b")
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path / "a"))
    _assert_matches(load_dataset("cifar10", root=tmp_path / "b"), b)
    _assert_matches(load_dataset("cifar10"), a)


def test_not_found_explains_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("cifar10", root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "download=True" in msg and "CIFAR10_DIR" in msg
    assert "cifar-10-python.tar.gz" in msg


# ---------------------------------------------------------------- broken data
def test_archive_missing_member(tiny, tmp_path):
    gone = tiny.name == "cifar10" and "data_batch_3" or "test"
    path = tiny.write_archive(tmp_path, skip=(gone,))
    with pytest.raises(CorruptArchiveError) as err:
        load_dataset(tiny.name, root=tmp_path)
    assert str(path) in str(err.value) and gone in str(err.value)


def test_folder_missing_file(tiny, tmp_path):
    gone = tiny.name == "cifar10" and "batches.meta" or "meta"
    folder = tiny.write_folder(tmp_path, skip=(gone,))
    with pytest.raises(CorruptArchiveError) as err:
        load_dataset(tiny.name, root=tmp_path)
    assert str(folder) in str(err.value) and gone in str(err.value)


@pytest.mark.parametrize("damage", ["random", "truncated"])
def test_corrupt_archive_names_the_file(damage, tmp_path):
    fx = make_tiny_cifar("cifar10")
    blob = fx.archive_bytes()
    bad = np.random.default_rng(0).bytes(4096) if damage == "random" else blob[: len(blob) // 2]
    path = tmp_path / fx.archive
    path.write_bytes(bad)
    with pytest.raises(CorruptArchiveError) as err:
        load_dataset("cifar10", root=tmp_path)
    assert str(path) in str(err.value)


def test_wrong_data_shape_is_reported(tmp_path):
    fx = make_tiny_cifar("cifar10")
    entry = pickle.loads(fx.members["data_batch_2"], encoding="bytes")
    entry[b"data"] = entry[b"data"][:, :1000]
    fx.members["data_batch_2"] = pickle.dumps(entry, protocol=2)
    fx.write_folder(tmp_path)
    with pytest.raises(CorruptArchiveError, match=r"data_batch_2.*uint8 \(N, 3072\)"):
        load_dataset("cifar10", root=tmp_path)


def test_pickles_cannot_run_code(tmp_path):
    fx = make_tiny_cifar("cifar10")
    fx.members["batches.meta"] = pickle.dumps({b"label_names": os.getcwd}, protocol=2)  # a global function
    fx.write_folder(tmp_path)
    with pytest.raises(CorruptArchiveError, match="refusing to load"):
        load_dataset("cifar10", root=tmp_path)


# ---------------------------------------------------------------- the real files, when present
@pytest.mark.parametrize("name", NAMES)
def test_real_cifar(name, monkeypatch):
    where = REAL[name]
    if not where:
        pytest.skip(f"set {name.upper()}_DIR to the real {name} archive or folder to run this check")
    monkeypatch.setenv(f"{name.upper()}_DIR", where)
    ds = load_dataset(name)
    k = 10 if name == "cifar10" else 100
    assert (ds.n_train, ds.n_test, ds.num_classes) == (50000, 10000, k)
    assert np.bincount(ds.y_train, minlength=k).tolist() == [50000 // k] * k
    assert np.bincount(ds.y_test, minlength=k).tolist() == [10000 // k] * k
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    # the published channel means pin the R, G, B plane order
    mean = ds.x_train.mean(axis=(0, 2, 3), dtype=np.float64)
    want = CIFAR10_MEAN if name == "cifar10" else CIFAR100_MEAN
    np.testing.assert_allclose(mean, want, atol=6e-4)
    if name == "cifar100":  # the CIFAR-100 std is the train set's per-pixel std (× 3)
        std = ds.x_train.std(axis=(0, 2, 3), dtype=np.float64)
        np.testing.assert_allclose(3 * std, CIFAR100_STD, atol=2e-3)
    if name == "cifar10":
        assert ds.metadata["class_names"][:3] == ["airplane", "automobile", "bird"]
