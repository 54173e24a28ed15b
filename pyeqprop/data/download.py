"""Fetching archives over HTTP(S), with an MD5 check and an atomic rename.

:func:`download` streams ``url`` into a temporary file in the destination folder, checks the
byte count against ``Content-Length`` and the MD5 against the expected value, and only then
renames the temporary file to ``dest`` (``os.replace``, atomic on one file system). Whatever
goes wrong, no file is left at ``dest`` and the temporary file is removed, so a later call
never mistakes half an archive for a cached one.

A file already at ``dest`` whose MD5 matches is returned as is, without any request.

Only the standard library is used (``urllib.request``); there are no retries: a failure is
reported with the URL and the reason and the caller decides.
"""
from __future__ import annotations

import hashlib
import http.client
import os
import socket
import tempfile
import urllib.error
import urllib.request
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
    timeout : seconds for connecting and for each read (``urlopen``'s timeout).
    progress : called as ``progress(bytes_so_far, total_or_None)`` after each chunk.

    Behaviour
    ---------
    * ``dest`` exists with the right MD5: returned immediately, nothing is fetched.
    * ``dest`` exists with another MD5: fetched again and replaced only once the new copy
      passes the checks.
    * The body is shorter than ``Content-Length`` (server closed early), the connection
      fails, or the server answers with an HTTP error: :class:`DownloadError`.
    * The MD5 differs: :class:`ChecksumError` naming the URL and both digests.

    In every failure case the temporary file is deleted and ``dest`` is untouched.
    """
    dest = Path(dest)
    expected = md5.strip().lower()
    if dest.is_file() and md5_of(dest) == expected:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)

    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            got_md5, received, total = _stream(url, out, timeout=timeout, progress=progress)
        if total is not None and received != total:
            raise DownloadError(
                f"incomplete download from {url}: received {received} of {total} bytes "
                "(the server closed the connection early); nothing was saved"
            )
        if got_md5 != expected:
            raise ChecksumError(
                f"MD5 mismatch for {url}: expected {expected}, got {got_md5} "
                f"({received} bytes); the file was discarded"
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _stream(url, out, *, timeout, progress) -> tuple[str, int, int | None]:
    """Copy the body of ``url`` into the open file ``out``; return (md5, bytes, Content-Length)."""
    h = hashlib.md5()
    received = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
            while True:
                chunk = resp.read(CHUNK_SIZE)
                if not chunk:
                    break
                out.write(chunk)
                h.update(chunk)
                received += len(chunk)
                if progress is not None:
                    progress(received, total)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise DownloadError(f"download of {url} failed: {exc.reason}") from exc
    except http.client.IncompleteRead as exc:
        raise DownloadError(
            f"incomplete download from {url}: received {received + len(exc.partial)} bytes, "
            f"{exc.expected} more were announced; nothing was saved"
        ) from exc
    except (http.client.HTTPException, socket.timeout, ConnectionError) as exc:
        raise DownloadError(
            f"download of {url} failed after {received} bytes: {type(exc).__name__}: {exc}"
        ) from exc
    return h.hexdigest(), received, total
