"""Real-time pacing: the clock a session runs on, lag statistics, and the thinning rule.

A paced session delivers output frame ``k`` at ``origin + k / fps`` on its
clock. When generation cannot keep up, frames are skipped *before* inference,
spread evenly (a steady lower frame rate rather than bursts of motion and
freezes): :class:`Thinning` keeps a fraction of the frames, lowered when the
scheduler has to drop a frame that would miss its due time and raised again
while frames arrive in time (additive increase, multiplicative decrease).
"""

from __future__ import annotations

import threading
import time
from array import array
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Clock:
    """A monotonic clock and its sleep; ``scaled(k)`` runs ``k`` times faster (simulations, tests)."""

    now: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    #: clock seconds per real second
    speed: float = 1.0

    @classmethod
    def scaled(cls, speed: float) -> "Clock":
        """A clock on which ``speed`` seconds pass per real second (sleeps are shortened alike)."""
        if speed <= 0:
            raise ValueError("speed must be positive")
        base = time.monotonic()
        return cls(now=lambda: base + (time.monotonic() - base) * speed, sleep=lambda s: time.sleep(max(0.0, s) / speed),
                   speed=speed)


REALTIME = Clock()


def wait_until(clock: Clock, due: float, stop: threading.Event, step: float = 0.005) -> bool:
    """Sleep until ``due`` on ``clock``; False if ``stop`` was set first."""
    while not stop.is_set():
        left = due - clock.now()
        if left <= 0:
            return True
        clock.sleep(min(step, left))
    return False


class RateWindow:
    """Events per second over about the last ``interval_s`` (fixed memory: ``buckets`` counters, not timestamps).

    The window is whole buckets, so it spans between ``(buckets - 1) / buckets``
    of the interval and all of it. Not thread-safe: call it under the owner's lock.
    """

    def __init__(self, interval_s: float = 1.0, buckets: int = 10) -> None:
        self.interval_s = float(interval_s)
        self._width = self.interval_s / buckets
        self._counts = [0] * buckets
        self._slot: int | None = None  # the absolute bucket index of the newest counter

    def _advance(self, now: float) -> int:
        b = int(now // self._width)
        if self._slot is None:
            self._slot = b
        n = len(self._counts)
        for k in range(1, min(b - self._slot, n) + 1):
            self._counts[(self._slot + k) % n] = 0
        self._slot = max(self._slot, b)
        return self._slot % n

    def add(self, now: float) -> None:
        self._counts[self._advance(now)] += 1

    def rate(self, now: float) -> float:
        self._advance(now)
        return sum(self._counts) / self.interval_s


class Percentiles:
    """Values kept for percentiles (bounded memory and time: about the newest ``cap`` are kept)."""

    def __init__(self, cap: int = 10_000) -> None:
        self._v = array("d")
        self.cap = cap
        self.count = 0
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self.count += 1
            if len(self._v) >= self.cap:
                del self._v[: self.cap // 2]
            self._v.append(value)

    def percentiles(self, *qs: float) -> list[float]:
        with self._lock:
            s = sorted(self._v)
        if not s:
            return [0.0 for _ in qs]
        return [s[min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))] for q in qs]

    def percentile(self, q: float) -> float:
        return self.percentiles(q)[0]

    def summary(self, prefix: str) -> dict[str, float]:
        qs = (50, 95, 99)
        return {f"{prefix}_p{q}": v for q, v in zip(qs, self.percentiles(*qs))}


class Thinning:
    """Which frames go to inference when the session cannot keep up.

    ``keep`` is the fraction of frames rendered (1.0: all). Frame ``j`` is kept
    when the running sum of ``keep`` crosses a whole number, which spreads the
    kept frames evenly. The first frame of an utterance is always kept. A miss
    (a frame the scheduler had to drop, or one that came back too late) lowers
    ``keep`` by ``decrease``, at most once per ``cooldown_s`` (one backlog is
    one miss); each frame shown in time raises it by ``increase``.
    """

    def __init__(self, clock: Clock = REALTIME, floor: float = 0.05, increase: float = 0.02,
                 decrease: float = 0.85, cooldown_s: float = 0.25) -> None:
        self.clock = clock
        self.keep = 1.0
        self.floor = floor
        self.increase = increase
        self.decrease = decrease
        self.cooldown_s = cooldown_s
        self._acc = 0.0
        self._last_miss = float("-inf")
        self._held = 0.0  # (hold_at_least)
        self._lock = threading.Lock()

    def take(self, j: int) -> bool:
        with self._lock:
            if j == 0:
                self._acc = 0.0
                return True
            self._acc += self.keep
            if self._acc >= 1.0 - 1e-9:
                self._acc -= 1.0
                return True
            return False

    def hold_at_least(self, share: float) -> None:
        """Never thin below ``share`` of the frames (a session's fair share of an overloaded backend).

        A session whose frames came back late in a burst would otherwise sink to
        ``floor`` and, gaining back ``increase`` per frame shown, stay there while
        the sessions that were luckier take its share: starved for the rest of
        the utterance.
        """
        with self._lock:
            self._held = min(1.0, max(0.0, float(share)))
            self.keep = max(self.keep, self._held)

    def missed(self) -> None:
        """A frame was dropped at the scheduler or came back too late: render fewer."""
        now = self.clock.now()
        with self._lock:
            if now - self._last_miss < self.cooldown_s:
                return
            self._last_miss = now
            self.keep = max(self.floor, self._held, self.keep * self.decrease)

    def in_time(self) -> None:
        """A rendered frame was shown in time: try a little more."""
        with self._lock:
            self.keep = min(1.0, self.keep + self.increase)
