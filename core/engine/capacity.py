"""How many real-time sessions a service holds: the end-to-end cost, not the backend's alone.

A session needs ``fps`` frames per second. Two things limit how many fit:

* **the backend**: the cost model's bound ``max_B B / t(B)`` frames per second
  (measured when the scheduler warms, refined while it runs), at most
  :data:`BACKEND_UTIL` of it (a scheduler needs slack to meet deadlines);
* **the CPU**: each frame costs the session's own work — features, compositing,
  the sinks' encoding — plus the backend's CPU time when it runs on the CPU
  (measured as process CPU time per frame while warming). The cores, at most
  :data:`CPU_UTIL` busy, divided by that per-frame cost and ``fps``.

The session cost is probed when the service starts (a second of audio through
the feature source, a few frames composited) and learned from the sessions'
own stage times while it runs. A running service also stops admitting while a
session lags (p95 > :data:`LAG_LIMIT_S`) or skips (> :data:`SKIP_LIMIT` of its
frames): an admitted session must be a real-time session.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

BACKEND_UTIL = 0.9
CPU_UTIL = 0.8
LAG_LIMIT_S = 0.2
SKIP_LIMIT = 0.05


@dataclass(frozen=True)
class EngineCapacity:
    """Real-time sessions the service holds, and how that was decided."""

    sessions: int
    #: the figure that limits it: ``backend``, ``cpu`` or ``lag`` (running sessions lag or skip)
    limit: str
    #: one sentence: how the figure was decided
    basis: str
    backend_fps: float
    backend_cpu_ms_per_frame: float
    session_cpu_ms_per_frame: float
    cores: int
    fps: float
    #: ``probed`` (at start) or ``learned`` (from running sessions)
    session_cost: str = "probed"

    def to_dict(self) -> dict[str, Any]:
        return {"sessions": self.sessions, "limit": self.limit, "basis": self.basis,
                "backend_fps": round(self.backend_fps, 1),
                "backend_cpu_ms_per_frame": round(self.backend_cpu_ms_per_frame, 3),
                "session_cpu_ms_per_frame": round(self.session_cpu_ms_per_frame, 3),
                "session_cost": self.session_cost, "cores": self.cores, "fps": self.fps}


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def decide(backend_fps: float, backend_cpu_s: float, session_cpu_s: float, fps: float, *, n_cores: int | None = None,
           session_cost: str = "probed", lagging: int | None = None) -> EngineCapacity:
    """The capacity from the measured costs (per frame, seconds); ``lagging``: sessions running while one lags."""
    n_cores = n_cores or cores()
    by_backend = backend_fps * BACKEND_UTIL / fps if fps > 0 and backend_fps > 0 else math.inf
    per_frame = backend_cpu_s + session_cpu_s
    by_cpu = n_cores * CPU_UTIL / (per_frame * fps) if per_frame > 0 and fps > 0 else math.inf
    limit = "backend" if by_backend <= by_cpu else "cpu"
    n = min(by_backend, by_cpu)
    sessions = max(1, int(math.floor(n))) if math.isfinite(n) else 1
    basis = (f"backend bound {backend_fps:.0f} frames/s x {BACKEND_UTIL:g} holds {by_backend:.1f} session(s) at "
             f"{fps:g} fps; CPU: {n_cores} core(s) x {CPU_UTIL:g} / ({1000 * backend_cpu_s:.1f} ms backend + "
             f"{1000 * session_cpu_s:.1f} ms session work per frame, {session_cost}) holds {by_cpu:.1f}")
    if lagging is not None and lagging < sessions:
        sessions, limit = max(1, lagging), "lag"
        basis += f"; a running session lags or skips, so no more than the {lagging} running are admitted"
    return EngineCapacity(sessions, limit, basis, backend_fps, 1000 * backend_cpu_s, 1000 * session_cpu_s,
                          n_cores, fps, session_cost)


def probe_session_cost(package: Any, source: Any, frames: int = 8) -> float:
    """CPU seconds per frame of one session's own work: features for a second of audio, compositing ``frames``."""
    from .stages import StageTimes, composite_faces

    rng = np.random.default_rng(0)
    pcm = (0.1 * rng.standard_normal(source.sample_rate)).astype(np.float32)
    t = time.process_time()
    source.rows(pcm)
    feat = (time.process_time() - t) / float(source.fps)
    n = min(frames, int(package.frame_count))
    faces = np.full((n, 3, 320, 320), 0.5, np.float32)
    t = time.process_time()
    composite_faces(package, list(range(n)), faces, StageTimes())
    comp = (time.process_time() - t) / max(1, n)
    return feat + comp
