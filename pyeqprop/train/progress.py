"""The progress bar of training epochs and of the teacher's (tqdm, drawn on stderr when it is a terminal)."""
from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["ProgressBar", "PROGRESS_MODES", "BAR_WIDTH"]

PROGRESS_MODES = ("auto", "bar", "none")  # see ProgressBar
BAR_WIDTH = 24  # characters of the bar itself

_FORMAT = "{desc} [{bar:%d}] {n_fmt}/{total_fmt}{postfix} [{elapsed}<{remaining}, {rate_fmt}]"


class ProgressBar:
    """One line per epoch: batches done, running loss and accuracy, last settling residual, elapsed time,
    the time left (ETA) and the rate; a :class:`tqdm.tqdm` underneath.

    ``mode``: "bar" always draws, "none" never, "auto" draws when the stream is a TTY, so output that is
    piped or captured (and parsed) never holds a bar. The stream defaults to ``sys.stderr``; the
    line is cleared at :meth:`close`.
    """

    def __init__(self, total: int, *, desc: str = "", mode: str = "auto", stream=None, width: int = BAR_WIDTH,
                 unit: str = "batch"):
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
        self.stream = stream or sys.stderr
        self.total = max(int(total), 1)
        isatty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = mode == "bar" or (mode == "auto" and isatty)
        self._bar = tqdm(total=self.total, desc=desc, file=self.stream, disable=not self.enabled, leave=False,
                         ascii=".#", bar_format=_FORMAT % int(width), unit=unit, mininterval=0.1,
                         dynamic_ncols=False)

    def update(self, done: int, *, loss: float | None = None, acc: float | None = None,
               residual: float | None = None, force: bool = False) -> None:
        """Move to ``done`` of ``total`` and show the metrics given; drawn at most every 0.1 s, and always
        with ``force`` or at the last step."""
        if not self.enabled:
            return
        parts = []
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        if acc is not None:
            parts.append(f"acc {100 * acc:5.1f}%")
        if residual is not None:
            parts.append(f"res {residual:.1e}")
        self._bar.set_postfix_str(" ".join(parts), refresh=False)
        self._bar.update(int(done) - self._bar.n)
        if force or done >= self.total:
            self._bar.refresh()

    def close(self) -> None:
        """Clear the line (the epoch's log line follows)."""
        self._bar.close()
