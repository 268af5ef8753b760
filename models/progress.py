"""Progress lines for long loops: count, rate and ETA, logged at most every few seconds.

Uses the standard ``logging`` module (logger ``prefloop``) so that models/ stays free of
Prefect; the flow forwards this logger to Prefect's run logs.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("prefloop")


class Progress:
    def __init__(self, label: str, total: int, unit: str = "items", every_s: float = 5.0):
        self.label, self.total, self.unit, self.every_s = label, total, unit, every_s
        self.done = 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1, **extra: float) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every_s or self.done >= self.total:
            self.last = now
            log.info(self.line(now, extra))

    def line(self, now: float, extra: dict | None = None) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done / max(self.total, 1)
        tail = "".join(f" {k}={v:.4g}" for k, v in (extra or {}).items())
        return (f"{self.label}: {self.done}/{self.total} ({pct:.0f}%) "
                f"{rate:.1f} {self.unit}/s ETA {eta:.0f}s{tail}")
