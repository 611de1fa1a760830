"""A dependency-free progress bar for long toy jobs (stderr; one line per 10% when not a terminal)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """``with Progress(total, "collapse") as bar: ... bar.update(1, H=1.2, R=0.5)``.

    On a terminal the line is redrawn at most every ``interval`` seconds with steps done, rate, ETA
    and the latest metrics; on a pipe or in CI (``isatty()`` false) a full line is printed at every 10%
    so logs stay short. ``enabled=False`` prints nothing.
    """

    def __init__(self, total: int, desc: str = "", *, stream: TextIO | None = None, enabled: bool = True,
                 interval: float = 0.2):
        self.total, self.desc, self.n = max(int(total), 1), desc, 0
        self.stream = sys.stderr if stream is None else stream
        self.enabled, self.interval = enabled, interval
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = self._last = time.perf_counter()
        self._next_tenth = 1
        self.metrics: dict[str, float] = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _line(self) -> str:
        el = time.perf_counter() - self.t0
        rate = self.n / el if el > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        frac = self.n / self.total
        bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
        mets = " ".join(f"{k}={v:.4g}" for k, v in self.metrics.items())
        return (f"{self.desc} [{bar}] {self.n}/{self.total} {rate:.1f} it/s "
                f"elapsed {el:.1f}s eta {eta:.1f}s {mets}").rstrip()

    def update(self, n: int = 1, **metrics: float) -> None:
        self.n = min(self.n + n, self.total)
        self.metrics.update({k: float(v) for k, v in metrics.items()})
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.tty:
            if now - self._last >= self.interval or self.n == self.total:
                self.stream.write("\r" + self._line() + "\033[K")
                self.stream.flush()
                self._last = now
        elif self.n * 10 >= self._next_tenth * self.total:
            while self.n * 10 >= self._next_tenth * self.total:
                self._next_tenth += 1
            self.stream.write(self._line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
