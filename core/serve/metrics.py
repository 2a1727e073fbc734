"""Prometheus metrics of ``avatar serve`` (names and units per prometheus_client's conventions).

Each server has its own registry, so two servers in one process (tests) do not
share counters. Nothing here carries a URL, a token or a stream key: labels are
fixed words only.
"""

from __future__ import annotations

import time
from typing import Any

from ..interfaces import Sink, SinkReport, StreamInfo, VideoFrame

LAG_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.12, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
INFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ServerMetrics:
    """The server's counters, gauges and histograms."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("avatar_sessions", "Live sessions now open", registry=r)
        self.capacity = Gauge("avatar_capacity_sessions", "Real-time sessions the server admits", registry=r)
        self.sessions_opened = Counter("avatar_sessions_opened", "Sessions opened", registry=r)
        self.sessions_refused = Counter("avatar_sessions_refused", "Sessions refused", ["reason"], registry=r)
        self.sessions_ended = Counter("avatar_sessions_ended", "Sessions ended", ["reason"], registry=r)
        self.delivered_fps = Gauge("avatar_delivered_fps", "Frames per second delivered, mean over open sessions", registry=r)
        self.frames = Counter("avatar_frames_delivered", "Frames delivered to the outputs", registry=r)
        self.skipped = Counter("avatar_frames_skipped", "Frames skipped before inference to keep real time", registry=r)
        self.lag = Histogram("avatar_frame_lag_seconds", "How late each frame reached the outputs", buckets=LAG_BUCKETS, registry=r)
        self.batch = Histogram("avatar_batch_size", "Frames per backend call", buckets=BATCH_BUCKETS, registry=r)
        self.inference = Histogram("avatar_inference_seconds", "Time of one backend call", buckets=INFER_BUCKETS, registry=r)
        # CPU ms per delivered frame by stage: rate(avatar_stage_cpu_seconds_total) / rate(avatar_frames_kind_total)
        self.stage_cpu = Counter("avatar_stage_cpu_seconds", "CPU time of the sessions' stages (thread CPU time)",
                                 ["stage", "kind"], registry=r)
        self.frames_kind = Counter("avatar_frames_kind", "Frames delivered, speech (through the model) or idle",
                                   ["kind"], registry=r)
        # a dead scheduler thread is replaced (avatar.engine.scheduler); these make that visible to alerts
        self.scheduler_restarts = Gauge("avatar_scheduler_restarts", "Times a shared inference scheduler thread died and "
                                        "was replaced (threads and whole schedulers), since the server started",
                                        registry=r)
        self.schedulers_dead = Gauge("avatar_schedulers_dead", "Shared inference schedulers whose thread is not running",
                                     registry=r)
        self.latency = Histogram("avatar_speech_latency_seconds", "Push of an utterance's audio to its first frame",
                                 buckets=LAG_BUCKETS, registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MeterSink(Sink):
    """Measures what a session's outputs see: frames delivered, their fps and lag.

    The server adds one to every session. Lag is the arrival of each frame
    behind its due time on the session's own clock (first frame + pts), so a
    session that falls behind shows it even if the engine hides it.
    """

    name = "meter"

    def __init__(self, metrics: ServerMetrics | None = None) -> None:
        super().__init__()
        self.metrics = metrics
        self.frames = 0
        self.last_index = -1
        self.last_lag = 0.0
        self._t0: float | None = None
        self._pts0 = 0.0
        self._recent: list[float] = []  # arrival times of the last second's frames

    def open(self, info: StreamInfo) -> None:
        self.info = info

    def write(self, frame: VideoFrame) -> None:
        now = time.monotonic()
        pts = float(frame.pts)
        if self._t0 is None:
            self._t0, self._pts0 = now, pts
        lag = max(0.0, now - (self._t0 + pts - self._pts0))
        self.frames += 1
        self.last_index = frame.index
        self.last_lag = lag
        self._recent.append(now)
        if len(self._recent) > 256:
            del self._recent[:128]
        if self.metrics is not None:
            self.metrics.frames.inc()
            self.metrics.lag.observe(lag)

    def fps(self, window_s: float = 2.0) -> float:
        """Frames per second over the last ``window_s`` seconds."""
        now = time.monotonic()
        recent = [t for t in self._recent if now - t <= window_s]
        if self._t0 is None:
            return 0.0
        return len(recent) / min(window_s, max(now - self._t0, 1e-3))

    def close(self, aborted: bool = False) -> SinkReport:
        return SinkReport(frames=self.frames, details={"aborted": aborted})

    def summary(self) -> dict[str, Any]:
        return {"frames": self.frames, "fps": round(self.fps(), 2), "lag_s": round(self.last_lag, 4)}
