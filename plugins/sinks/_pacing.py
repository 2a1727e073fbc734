"""Real-time pacing on the audio clock, lag statistics and reconnect backoff.

A live sink has one clock: frame ``f`` is due at ``start + f.pts`` on the
monotonic wall clock, where ``start`` is fixed by the first frame. Frames that
arrive early wait (backpressure for the engine); frames that arrive late have
a *lag* ``now - (start + pts)``. Under the ``stall`` policy the clock slips by
the lag (``start`` moves forward), so the stream pauses instead of skipping.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable


class Pacer:
    """When each pts is due on the wall clock, and how late a frame is."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.start: float | None = None
        #: where the clock started before any slip, to measure drift
        self.origin: float | None = None
        self.slipped_s = 0.0

    def anchor(self, pts: Fraction | float) -> None:
        """Fix the clock so that ``pts`` is due now (called with the first frame)."""
        if self.start is None:
            self.start = self.clock() - float(pts)
            self.origin = self.start

    def due(self, pts: Fraction | float) -> float:
        if self.start is None:
            raise RuntimeError("Pacer.anchor() must be called before due()")
        return self.start + float(pts)

    def lag(self, pts: Fraction | float, now: float | None = None) -> float:
        """Seconds this pts is late (negative: early)."""
        return (self.clock() if now is None else now) - self.due(pts)

    def slip(self, seconds: float) -> None:
        """Let the clock slip (the ``stall`` policy): later pts become due later."""
        if self.start is not None and seconds > 0:
            self.start += seconds
            self.slipped_s += seconds

    def drift(self, pts: Fraction | float, now: float | None = None) -> float:
        """Wall time vs the unslipped clock: how far the stream has fallen behind."""
        if self.origin is None:
            return 0.0
        return (self.clock() if now is None else now) - (self.origin + float(pts))


class LagStats:
    """Signed lags in seconds; p50/p95/max without numpy (bounded memory)."""

    def __init__(self, cap: int = 1_000_000) -> None:
        self._v = array("d")
        self.cap = cap
        self.count = 0
        self.max = float("-inf")
        self.last = 0.0

    def add(self, lag: float) -> None:
        self.count += 1
        self.last = lag
        self.max = max(self.max, lag)
        if len(self._v) < self.cap:
            self._v.append(lag)

    def percentile(self, q: float) -> float:
        if not self._v:
            return 0.0
        s = sorted(self._v)
        k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
        return s[k]

    def summary(self) -> dict[str, float]:
        return {
            "lag_p50_s": self.percentile(50),
            "lag_p95_s": self.percentile(95),
            "lag_max_s": self.max if self.count else 0.0,
            "lag_samples": float(self.count),
        }


@dataclass
class Backoff:
    """Exponential backoff: ``base * 2**attempt``, capped; ``attempts`` bounded."""

    base_s: float = 0.5
    cap_s: float = 8.0
    max_attempts: int = 5
    attempt: int = 0

    def exhausted(self) -> bool:
        return self.attempt >= self.max_attempts

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.base_s * (2 ** self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0

