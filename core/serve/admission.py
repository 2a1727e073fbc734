"""Admission control: how many real-time sessions the server holds, and refusing the rest.

A session needs ``fps`` frames per second from the shared backend. The backend's
throughput at its best batch (frames per second, measured at start by warming
it) divided by the avatar's fps, less a headroom for compositing, encoding and
the network, is the number of sessions that stay real time together. A session
beyond that is refused with the reason, instead of letting every session
degrade (the failure mode of servers with a fixed limit or none).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

#: share of the measured throughput sessions may use; the rest is for compositing/encoding
HEADROOM = 0.75


@dataclass(frozen=True)
class Capacity:
    sessions: int
    #: "measured" (from the backend) or "configured" (--max-sessions)
    source: str
    throughput_fps: float = 0.0
    fps: float = 25.0
    #: how the engine decided it (backend bound and per-frame CPU work; see avatar.engine.capacity)
    basis: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"sessions": self.sessions, "source": self.source,
                "throughput_fps": round(self.throughput_fps, 1), "fps": self.fps, "basis": self.basis}


def measured_capacity(throughput_fps: float, fps: float, headroom: float = HEADROOM) -> Capacity:
    """Sessions that fit in ``throughput_fps`` at ``fps`` each; at least one.

    One session is always admitted: on a machine slower than real time it still
    runs, skipping frames before inference with its audio intact.
    """
    n = int(math.floor(throughput_fps * headroom / fps)) if fps > 0 else 0
    return Capacity(max(1, n), "measured", throughput_fps, fps)


class Refused(Exception):
    """A session cannot be admitted; ``reason`` says why (the 503 body)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Admission:
    """Counts admitted sessions against the capacity (thread-safe)."""

    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity
        self._n = 0
        self._lock = threading.Lock()
        #: set by :meth:`drain`: no new session is admitted (the server is being removed)
        self.draining: str | None = None

    @property
    def active(self) -> int:
        return self._n

    def drain(self, reason: str = "the server is draining (being removed)") -> None:
        """Admit no new session from now on; open sessions go on."""
        self.draining = reason

    def admit(self) -> None:
        with self._lock:
            if self.draining:
                raise Refused(f"{self.draining}; it takes no new session")
            if self._n >= self.capacity.sessions:
                c = self.capacity
                why = ((c.basis or f"measured backend throughput {c.throughput_fps:.0f} frames/s holds "
                        f"{c.sessions} real-time session(s) at {c.fps:g} fps") if c.source == "measured"
                       else f"--max-sessions is {c.sessions}")
                raise Refused(f"the server is at capacity ({self._n} of {c.sessions} sessions; {why}); "
                              "try again when a session ends")
            self._n += 1

    def release(self) -> None:
        with self._lock:
            self._n = max(0, self._n - 1)
