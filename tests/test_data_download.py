"""download() and load_dataset(..., download=True) against a real HTTP server on 127.0.0.1."""
import hashlib

import numpy as np
import pytest

from _cifar_fixtures import LoopbackServer, make_tiny_cifar
from pyeqprop.data import ChecksumError, CorruptArchiveError, DownloadError, download, load_dataset
from pyeqprop.data.cifar import CIFAR10_MD5, CIFAR10_URL, CIFAR100_MD5, CIFAR100_URL, cifar_url

BODY = np.random.default_rng(0).bytes(300_000)  # larger than one TCP segment
BODY_MD5 = hashlib.md5(BODY).hexdigest()


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path_factory):
    for var in ("CIFAR10_DIR", "CIFAR100_DIR", "PYEQPROP_CIFAR_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PYEQPROP_DATA", str(tmp_path_factory.mktemp("empty_data_root")))


@pytest.fixture
def server():
    with LoopbackServer() as srv:
        yield srv


def _leftovers(folder, keep=()):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


# ---------------------------------------------------------------- download()
def test_download_verifies_and_caches(server, tmp_path):
    server.files["/f.bin"] = BODY
    seen = []
    dest = download(f"{server.url}/f.bin", tmp_path / "sub" / "f.bin", BODY_MD5.upper(), timeout=5,
                    progress=lambda done, total: seen.append((done, total)))
    assert dest == tmp_path / "sub" / "f.bin" and dest.read_bytes() == BODY
    assert seen[-1] == (len(BODY), len(BODY)) and all(t == len(BODY) for _, t in seen)
    assert server.requests == ["/f.bin"]
    assert _leftovers(dest.parent) == ["f.bin"]  # the temporary file was renamed, nothing else remains
    download(f"{server.url}/f.bin", dest, BODY_MD5, timeout=5)
    assert server.requests == ["/f.bin"]  # cached: the second call made no request


def test_download_replaces_a_stale_file(server, tmp_path):
    server.files["/f.bin"] = BODY
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"old and wrong")
    download(f"{server.url}/f.bin", dest, BODY_MD5, timeout=5)
    assert dest.read_bytes() == BODY and len(server.requests) == 1


def test_checksum_failure(server, tmp_path):
    server.files["/f.bin"] = BODY
    url = f"{server.url}/f.bin"
    with pytest.raises(ChecksumError) as err:
        download(url, tmp_path / "f.bin", "0" * 32, timeout=5)
    msg = str(err.value)
    assert "0" * 32 in msg and BODY_MD5 in msg and url in msg
    assert _leftovers(tmp_path) == []  # no dest, no temporary file


def test_checksum_failure_keeps_an_existing_file_untouched(server, tmp_path):
    server.files["/f.bin"] = BODY
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"previous")
    with pytest.raises(ChecksumError):
        download(f"{server.url}/f.bin", dest, "0" * 32, timeout=5)
    assert dest.read_bytes() == b"previous" and _leftovers(tmp_path) == ["f.bin"]


def test_partial_download(server, tmp_path):
    server.short["/f.bin"] = BODY  # announces 1000 bytes more than it sends, then closes
    url = f"{server.url}/f.bin"
    with pytest.raises(DownloadError) as err:
        download(url, tmp_path / "f.bin", BODY_MD5, timeout=5)
    assert not isinstance(err.value, ChecksumError)
    msg = str(err.value)
    assert "incomplete" in msg and url in msg and str(len(BODY) + 1000) in msg
    assert _leftovers(tmp_path) == []


def test_http_error(server, tmp_path):
    with pytest.raises(DownloadError, match="404"):
        download(f"{server.url}/nothing", tmp_path / "f.bin", BODY_MD5, timeout=5)
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- load_dataset(download=True)
def test_official_addresses():
    assert cifar_url("cifar10") == CIFAR10_URL == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert cifar_url("cifar100") == CIFAR100_URL == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert CIFAR10_MD5 == "c58f30108f718f92721af3b95e74349a"
    assert CIFAR100_MD5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert cifar_url("cifar10", "http://127.0.0.1:1/m/") == "http://127.0.0.1:1/m/cifar-10-python.tar.gz"


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_downloads_once_then_uses_the_cache(name, server, tmp_path):
    fx = make_tiny_cifar(name)
    server.files[f"/mirror/{fx.archive}"] = fx.archive_bytes()
    ds = load_dataset(name, root=tmp_path, download=True, base_url=f"{server.url}/mirror", md5=fx.md5(), timeout=5)
    np.testing.assert_array_equal(ds.x_train, fx.x_train)
    np.testing.assert_array_equal(ds.y_test, fx.y_test)
    assert (tmp_path / fx.archive).is_file() and ds.metadata["url"].endswith(fx.archive)
    again = load_dataset(name, root=tmp_path, download=True, base_url=f"{server.url}/mirror", md5=fx.md5())
    np.testing.assert_array_equal(again.x_test, fx.x_test)
    assert len(server.requests) == 1


def test_mirror_from_environment_and_default_data_root(server, tmp_path, monkeypatch):
    fx = make_tiny_cifar("cifar10")
    server.files[f"/env/{fx.archive}"] = fx.archive_bytes()
    monkeypatch.setenv("PYEQPROP_CIFAR_URL", f"{server.url}/env/")
    monkeypatch.setenv("PYEQPROP_DATA", str(tmp_path))
    ds = load_dataset("cifar10", download=True, md5=fx.md5(), timeout=5)
    np.testing.assert_array_equal(ds.x_train, fx.x_train)
    assert (tmp_path / fx.archive).is_file() and server.requests == [f"/env/{fx.archive}"]


def test_official_md5_is_checked_by_default(server, tmp_path):
    fx = make_tiny_cifar("cifar10")
    server.files[f"/{fx.archive}"] = fx.archive_bytes()
    with pytest.raises(ChecksumError, match=CIFAR10_MD5):
        load_dataset("cifar10", root=tmp_path, download=True, base_url=server.url, timeout=5)
    assert _leftovers(tmp_path) == []


def test_downloaded_corrupt_archive(server, tmp_path):
    junk = np.random.default_rng(1).bytes(5000)
    server.files["/cifar-10-python.tar.gz"] = junk
    with pytest.raises(CorruptArchiveError) as err:
        load_dataset("cifar10", root=tmp_path, download=True, base_url=server.url,
                     md5=hashlib.md5(junk).hexdigest(), timeout=5)
    assert str(tmp_path / "cifar-10-python.tar.gz") in str(err.value)
