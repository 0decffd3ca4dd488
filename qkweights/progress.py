"""A small progress line on stderr, shown only on a terminal (count, rate, ETA)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``Progress(total, "profile")``; call ``update(n_done)``; ``close()`` ends the line.

    Silent when stderr is not a TTY or ``enabled`` is False, so logs and CI stay clean.
    """

    def __init__(self, total: int, label: str, *, unit: str = "it", enabled: bool | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = (self.stream.isatty() if enabled is None else enabled) and total > 0
        self.total, self.label, self.unit = total, label, unit
        self.start = time.monotonic()
        self.done = 0

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        self.total = total or self.total
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("nan")
        eta_text = f"{eta:.0f}s" if eta == eta else "?"
        self.stream.write(f"\r{self.label}: {done}/{self.total} {self.unit} ({rate:.1f} {self.unit}/s, ETA {eta_text})  ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()
