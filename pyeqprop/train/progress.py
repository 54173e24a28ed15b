"""A dependency-free progress bar for training epochs (drawn on stderr when it is a terminal)."""
from __future__ import annotations

import sys
import time

__all__ = ["ProgressBar", "PROGRESS_MODES"]

PROGRESS_MODES = ("auto", "bar", "none")  # see ProgressBar


class ProgressBar:
    """One line per epoch: batches done, running loss and accuracy, last settling residual.

    ``mode``: "bar" always draws, "none" never, "auto" draws when the stream is a TTY.
    """

    def __init__(self, total: int, *, desc: str = "", mode: str = "auto", stream=None, width: int = 24):
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
        self.stream = stream or sys.stderr
        self.total = max(int(total), 1)
        self.desc = desc
        self.width = width
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = mode == "bar" or (mode == "auto" and isatty)
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, done: int, *, loss: float, acc: float, residual: float, force: bool = False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and done < self.total and now - self._last_draw < 0.1:
            return
        self._last_draw = now
        frac = min(done / self.total, 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        rate = done / max(now - self.start, 1e-9)
        self.stream.write(f"\r{self.desc} [{bar}] {done}/{self.total} loss {loss:.4f} acc {100 * acc:5.1f}% "
                          f"res {residual:.1e} {rate:.1f} batch/s")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
