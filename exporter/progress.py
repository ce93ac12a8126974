"""Progress of a long export on stderr.

On a terminal: one line redrawn in place per tensor (at most 5 times a second): bytes written
of the total, percent, rate, time left, the tensor. Not a terminal (a log file, CI): nothing
per tensor; the exporter's one line per stage says what happened.
"""
from __future__ import annotations

import sys
import time


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _duration(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    def __init__(self, total: int, what: str = "writing", stream=None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total, self.what = max(1, int(total)), what
        self.done = 0
        self.t0 = self._last = time.perf_counter()
        self._width = 0

    def update(self, nbytes: int, name: str = "") -> None:
        self.done += int(nbytes)
        if not self.tty:
            return
        now = time.perf_counter()
        if now - self._last < 0.2 and self.done < self.total:
            return
        self._last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        line = (f"kvtrace export: {self.what} {_gb(self.done)} / {_gb(self.total)} "
                f"({100 * self.done / self.total:.0f}%), {rate / 1e6:.0f} MB/s, {_duration(left)} left  {name}")
        pad = max(0, self._width - len(line))
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0
