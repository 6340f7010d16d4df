"""Terminal progress: a step counter on a TTY, one line per epoch; silent with ``quiet``."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.live = sys.stderr.isatty() and not quiet
        self._last = 0.0

    def step(self, label: str, done: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if not self.live or (now - self._last < 0.2 and done < total):
            return
        self._last = now
        sys.stderr.write(f"\r{label} {done}/{total} loss {loss:.4f}   ")
        sys.stderr.flush()

    def line(self, text: str) -> None:
        if self.quiet:
            return
        if self.live:
            sys.stderr.write("\r\033[K")
        sys.stderr.write(text + "\n")
        sys.stderr.flush()
