"""A dependency-free progress bar on stderr for long benchmark runs."""
from __future__ import annotations

import shutil
import sys
import time


class Progress:
    """``[#####-----] 12/40 01:23 label`` redrawn in place on a terminal.

    When stderr is not a terminal (CI, a remote run whose output is captured) one plain line is
    written per step instead, so a log still shows where a long run got to.
    """

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total = max(1, int(total))
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._width = 0

    def _elapsed(self) -> str:
        s = int(time.perf_counter() - self.start)
        return f"{s // 60:02d}:{s % 60:02d}"

    def _draw(self, label: str):
        if not self.enabled:
            return
        if self.tty:
            cols = shutil.get_terminal_size((100, 20)).columns
            filled = int(20 * self.done / self.total)
            line = f"[{'#' * filled}{'-' * (20 - filled)}] {self.done}/{self.total} {self._elapsed()} {label}"
            line = line[: cols - 1]
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(f"[{self.done}/{self.total} {self._elapsed()}] {label}\n")
        self.stream.flush()

    def show(self, label: str):
        """Say what is running now without counting a step (terminal only: logs stay short)."""
        if self.tty:
            self._draw(label)

    def step(self, label: str, n: int = 1):
        self.done = min(self.total, self.done + n)
        self._draw(label)

    def close(self):
        if self.enabled and self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
