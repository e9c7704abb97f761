"""Progress for long work: periodic log lines with count, rate and ETA.

    prog = Progress("encode", total=len(docs), unit="docs")
    for d in docs:
        ...
        prog.update(1)
    prog.close()   # logs the final count and mean rate
"""

from __future__ import annotations

import logging
import os
import sys
import time

_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_logger(name: str) -> logging.Logger:
    """A logger writing to stderr, level from ``MTNLG_LOG_LEVEL`` (default INFO)."""
    root = logging.getLogger("mtnlg")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(_FMT, "%H:%M:%S"))
        root.addHandler(h)
        root.setLevel(os.environ.get("MTNLG_LOG_LEVEL", "INFO").upper())
        root.propagate = False
    return logging.getLogger(name if name.startswith("mtnlg") else f"mtnlg.{name}")


def fmt_time(s: float) -> str:
    s = int(max(s, 0))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


class Progress:
    """Logs ``desc: n/total unit (pct) rate unit/s, ETA`` at most every ``every_s`` seconds."""

    def __init__(self, desc: str, total: int | None = None, unit: str = "it", every_s: float = 5.0,
                 logger: logging.Logger | None = None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.log = logger or get_logger("mtnlg.progress")
        self.n = 0
        self.start = self._last = time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self.log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = now or time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        rate = self.n / elapsed
        if self.total:
            eta = (self.total - self.n) / rate if rate > 0 else float("inf")
            pct = 100.0 * self.n / self.total
            eta_s = fmt_time(eta) if eta != float("inf") else "?"
            return (f"{self.desc}: {self.n}/{self.total} {self.unit} ({pct:.1f}%) "
                    f"{rate:,.1f} {self.unit}/s, elapsed {fmt_time(elapsed)}, ETA {eta_s}")
        return f"{self.desc}: {self.n} {self.unit} {rate:,.1f} {self.unit}/s, elapsed {fmt_time(elapsed)}"

    def close(self) -> float:
        """Log the final line; return elapsed seconds."""
        self.log.info(self.line() + " (done)")
        return time.perf_counter() - self.start
