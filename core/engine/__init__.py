"""The engine: audio + avatar → frames → sinks, offline or live.

* :mod:`.stages` — the stage logic (features, compositing, the audio clock) and the report types;
* :mod:`.scheduler` — shared inference: deadline-aware batches across sessions, failure isolation;
* :mod:`.pacing` — the real-time clock, lag statistics and the thinning rule;
* :mod:`.intake` — pushed audio to the feature source's rate (soxr);
* :mod:`.utterance` — a session's options, stats and utterance state;
* :mod:`.session` — one stream: input, look-ahead budget, features and compositing threads, lifecycle, events;
* :mod:`.output` — a session's output ticks and the avatar walk (idle, speech, start budget);
* :mod:`.events` — session events and their async iterator;
* :mod:`.capacity` — how many real-time sessions fit (backend bound and per-frame CPU work);
* :mod:`.service` — :class:`AvatarService`: shared backends and live sessions;
* :mod:`.offline` — :class:`Renderer`: an offline render is one unpaced session.

Backends, feature sources and sinks are built by :mod:`avatar.compose`, the
one composition root below both :func:`avatar.render.render` and the service.
"""

from .events import EventStream, SessionEvent
from .offline import Renderer, RenderInterrupted, RenderOptions
from .pacing import Clock
from .capacity import EngineCapacity
from .scheduler import InferenceScheduler, SchedulerStats, WorkItem
from .service import AvatarService, ServiceOptions
from .session import Session, SessionClosed, SessionOptions, SessionStats
from .stages import STAGES, RenderReport, StageTimes, _AudioClock

__all__ = [
    "STAGES",
    "AvatarService",
    "EngineCapacity",
    "Clock",
    "EventStream",
    "InferenceScheduler",
    "RenderInterrupted",
    "RenderOptions",
    "RenderReport",
    "Renderer",
    "SchedulerStats",
    "ServiceOptions",
    "Session",
    "SessionClosed",
    "SessionEvent",
    "SessionOptions",
    "SessionStats",
    "StageTimes",
    "WorkItem",
    "_AudioClock",
]
