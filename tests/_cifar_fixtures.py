"""Build tiny CIFAR-10/100 data in the real on-disk format (for the data tests).

Like the originals: each member is a protocol-2 pickle of a dict with ``bytes`` keys
(``b'data'``, ``b'labels'`` …), ``data`` a uint8 (N, 3072) array whose rows are the R, G and B
32×32 planes, labels a list of ints, names lists of ``bytes``. The archive is a real gzip tar
with the members under ``cifar-10-batches-py/`` or ``cifar-100-python/``.

The expected arrays are computed here independently of the loader:
x[n, ch, i, j] = data[n, ch·1024 + i·32 + j] / 255.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
ARCHIVES = {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}


@dataclass
class TinyCifar:
    name: str
    members: dict  # member name -> pickled bytes
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list

    @property
    def folder(self) -> str:
        return FOLDERS[self.name]

    @property
    def archive(self) -> str:
        return ARCHIVES[self.name]

    def write_folder(self, parent: Path, skip=()) -> Path:
        folder = Path(parent) / self.folder
        folder.mkdir(parents=True, exist_ok=True)
        for member, blob in self.members.items():
            if member not in skip:
                (folder / member).write_bytes(blob)
        return folder

    def archive_bytes(self, skip=()) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(self.folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
            for member, blob in self.members.items():
                if member in skip:
                    continue
                info = tarfile.TarInfo(f"{self.folder}/{member}")
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))
        return gzip.compress(buf.getvalue(), mtime=0)  # mtime=0: the same bytes (and md5) every call

    def write_archive(self, parent: Path, skip=()) -> Path:
        path = Path(parent) / self.archive
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.archive_bytes(skip))
        return path

    def md5(self) -> str:
        return hashlib.md5(self.archive_bytes()).hexdigest()


def _images(rng, n):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    x = np.empty((n, 3, 32, 32), dtype=np.float32)
    for ch in range(3):  # explicit plane layout, written independently of the loader
        for i in range(32):
            x[:, ch, i, :] = data[:, ch * 1024 + i * 32: ch * 1024 + (i + 1) * 32] / np.float32(255)
    return data, x


def make_tiny_cifar(name: str, *, n_per_batch: int = 8, n_test: int = 12, seed: int = 0) -> TinyCifar:
    """CIFAR-10: 5 training batches of ``n_per_batch`` images; CIFAR-100: one ``train`` of
    5·``n_per_batch``; both with ``n_test`` test images."""
    rng = np.random.default_rng(seed)
    members, xs, ys = {}, [], []
    if name == "cifar10":
        names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
                 b"truck"]
        for k in range(1, 6):
            data, x = _images(rng, n_per_batch)
            labels = [int(v) for v in rng.integers(0, 10, n_per_batch)]
            members[f"data_batch_{k}"] = pickle.dumps(
                {b"batch_label": f"training batch {k} of 5".encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{k}_{i}.png".encode() for i in range(n_per_batch)]}, protocol=2)
            xs.append(x)
            ys.append(labels)
        data, x_test = _images(rng, n_test)
        y_test = [int(v) for v in rng.integers(0, 10, n_test)]
        members["test_batch"] = pickle.dumps(
            {b"batch_label": b"testing batch 1 of 1", b"labels": y_test, b"data": data,
             b"filenames": [f"test_{i}.png".encode() for i in range(n_test)]}, protocol=2)
        members["batches.meta"] = pickle.dumps(
            {b"num_cases_per_batch": n_per_batch, b"label_names": names, b"num_vis": 3072}, protocol=2)
    elif name == "cifar100":
        names = [f"fine_{k}".encode() for k in range(100)]
        n_train = 5 * n_per_batch
        data, x = _images(rng, n_train)
        fine = [int(v) for v in rng.integers(0, 100, n_train)]
        members["train"] = pickle.dumps(
            {b"filenames": [b"t.png"] * n_train, b"batch_label": b"training batch 1 of 1", b"fine_labels": fine,
             b"coarse_labels": [v // 5 for v in fine], b"data": data}, protocol=2)
        xs.append(x)
        ys.append(fine)
        data, x_test = _images(rng, n_test)
        y_test = [int(v) for v in rng.integers(0, 100, n_test)]
        members["test"] = pickle.dumps(
            {b"filenames": [b"s.png"] * n_test, b"batch_label": b"testing batch 1 of 1", b"fine_labels": y_test,
             b"coarse_labels": [v // 5 for v in y_test], b"data": data}, protocol=2)
        members["meta"] = pickle.dumps(
            {b"fine_label_names": names, b"coarse_label_names": [f"coarse_{k}".encode() for k in range(20)]},
            protocol=2)
    else:
        raise ValueError(name)
    return TinyCifar(name=name, members=members, x_train=np.concatenate(xs),
                     y_train=np.asarray(sum(ys, []), dtype=np.int64), x_test=x_test,
                     y_test=np.asarray(y_test, dtype=np.int64), class_names=[n.decode() for n in names])


class LoopbackServer:
    """A real ``ThreadingHTTPServer`` on 127.0.0.1 (free port) serving bytes from memory.

    ``files[path] = body`` serves body with a correct Content-Length; ``short[path] = body``
    announces 1000 more bytes than it sends and closes the connection. Every GET is appended to
    ``requests``. Use as a context manager.
    """

    def __init__(self):
        import http.server
        import threading

        self.files: dict[str, bytes] = {}
        self.short: dict[str, bytes] = {}
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server API
                owner.requests.append(self.path)
                if self.path in owner.files:
                    body = owner.files[self.path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif self.path in owner.short:
                    body = owner.short[self.path]
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body)
                    self.wfile.flush()
                    self.close_connection = True
                else:
                    self.send_error(404, "not here")

            def log_message(self, *args):  # keep test output quiet
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
