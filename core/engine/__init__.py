"""The engine: audio + avatar → frames → sinks, offline or live.

* :mod:`.stages` — the stage logic (features, compositing, the audio clock) and the report types;
* :mod:`.scheduler` — shared inference: earliest-deadline-first batches across sessions;
* :mod:`.pacing` — the real-time clock, lag statistics and the thinning rule;
* :mod:`.intake` — pushed audio to the feature source's rate (soxr);
* :mod:`.session` — one stream's state: utterances, idle, interrupt;
* :mod:`.events` — session events and their async iterator;
* :mod:`.service` — :class:`AvatarService`: shared backends and live sessions;
* :mod:`.offline` — :class:`Renderer`: an offline render is one unpaced session.
"""

from .events import EventStream, SessionEvent
from .offline import Renderer, RenderInterrupted, RenderOptions
from .pacing import Clock
from .scheduler import InferenceScheduler, SchedulerStats
from .service import AvatarService, ServiceOptions
from .session import Session, SessionClosed, SessionOptions, SessionStats
from .stages import STAGES, RenderReport, StageTimes, _AudioClock

__all__ = [
    "STAGES",
    "AvatarService",
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
    "_AudioClock",
]
