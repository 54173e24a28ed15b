"""Fetching archives over HTTP(S) with pooch: an MD5 check, a cache and an atomic rename.

:func:`download` hands ``url`` to :func:`pooch.retrieve`, which streams it into a temporary
file in the destination folder, checks the MD5 against the expected value, and only then moves
the temporary file to ``dest``. Whatever goes wrong, no file is left at ``dest`` (an older one
stays as it was) and the temporary file is removed, so a later call never mistakes half an
archive for a cached one. A body shorter than its ``Content-Length`` is an error (requests
enforces the length).

A file already at ``dest`` whose MD5 matches is returned as is, without any request (pooch's
cache). There are no retries: a failure is reported with the URL and the reason and the caller
decides. pooch (and requests, which it uses) come with the ``data`` extra.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

__all__ = [
    "DownloadError",
    "ChecksumError",
    "CorruptArchiveError",
    "download",
    "md5_of",
    "CHUNK_SIZE",
]

CHUNK_SIZE = 1 << 20  # bytes read per network call and per hashing step


class DownloadError(OSError):
    """A download failed: HTTP error, connection lost, timeout or fewer bytes than announced."""


class ChecksumError(DownloadError):
    """The downloaded bytes do not have the expected MD5."""


class CorruptArchiveError(ValueError):
    """A data archive or folder on disk is not in the expected format (names the file)."""


def md5_of(path: str | os.PathLike, *, chunk_size: int = CHUNK_SIZE) -> str:
    """Hex MD5 digest of the file at ``path``, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            h.update(chunk)
    return h.hexdigest()


class _Progress:
    """pooch's progress-bar protocol (``total``, ``update``, ``reset``, ``close``) feeding a
    ``progress(bytes_so_far, total_or_None)`` callback; pooch counts whole chunks, so the count is
    clamped to the announced total."""

    def __init__(self, callback):
        self.callback = callback
        self.total = None
        self.done = 0

    def update(self, n):
        self.done += int(n)
        total = self.total or None
        if self.callback is not None:
            self.callback(min(self.done, total) if total else self.done, total)

    def reset(self):
        self.done = 0

    def close(self):
        pass


def download(
    url: str,
    dest: str | os.PathLike,
    md5: str,
    *,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` and verify its MD5; return ``dest`` as a :class:`Path`.

    Parameters
    ----------
    url : the address (``http://`` or ``https://``).
    dest : the final file path; its folder is created when missing.
    md5 : expected hex digest (case-insensitive).
    timeout : seconds for connecting and for each read (requests' timeout).
    progress : called as ``progress(bytes_so_far, total_or_None)`` as chunks arrive.

    Behaviour
    ---------
    * ``dest`` exists with the right MD5: returned immediately, nothing is fetched.
    * ``dest`` exists with another MD5: fetched again and replaced only once the new copy
      passes the checks.
    * The body is shorter than ``Content-Length`` (server closed early), the connection
      fails, or the server answers with an HTTP error: :class:`DownloadError`.
    * The MD5 differs: :class:`ChecksumError` naming the URL and both digests.

    In every failure case the temporary file is deleted and ``dest`` is untouched.
    Needs pooch (``pip install pooch``, in the ``data`` extra): an ``ImportError`` saying so otherwise.
    """
    try:
        import pooch
        import requests
    except ImportError as exc:
        raise ImportError(f"downloading {url} needs pooch: pip install pooch (it is in the 'data' extra: "
                          f"pip install 'pyeqprop[data]')") from exc
    dest = Path(dest)
    expected = md5.strip().lower()
    bar = _Progress(progress)
    fetch = pooch.HTTPDownloader(progressbar=bar, timeout=timeout, chunk_size=CHUNK_SIZE)
    try:
        got = pooch.retrieve(url, known_hash=f"md5:{expected}", fname=dest.name, path=dest.parent,
                             downloader=fetch)
    except ValueError as exc:  # pooch: the hash of the downloaded file differs
        if "hash" not in str(exc):
            raise
        raise ChecksumError(f"MD5 mismatch for {url}: {exc}; the file was discarded") from None
    except requests.exceptions.HTTPError as exc:
        resp = exc.response
        raise DownloadError(f"download of {url} failed: HTTP {resp.status_code} {resp.reason}") from None
    except requests.exceptions.ChunkedEncodingError as exc:  # the body ended before Content-Length
        announced = f"of {bar.total} announced bytes " if bar.total else ""
        raise DownloadError(f"incomplete download from {url}: the server closed the connection before all "
                            f"{announced}arrived ({exc}); nothing was saved") from None
    except requests.exceptions.RequestException as exc:
        raise DownloadError(f"download of {url} failed: {type(exc).__name__}: {exc}") from None
    return Path(got)
