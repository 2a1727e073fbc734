"""A session's state types: its options, its stats snapshot, and one utterance in flight."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from fractions import Fraction


import numpy as np

from ..errors import AvatarError, ConfigError
from .pacing import REALTIME, Clock
from .stages import _AudioClock

IDLE_MODES = ("avatar", "model", "none")


class SessionClosed(AvatarError):
    """The session has ended (closed, or failed); it takes no more audio."""


@dataclass
class SessionOptions:
    """How a session paces and idles (the service's defaults suit a live stream)."""

    #: while not speaking: the avatar's own frames, frames through the model with silence, or none (offline)
    idle: str = "avatar"
    #: deliver on a real-time clock (False: as fast as frames are made)
    paced: bool = True
    #: walk position of the first output frame (1: upstream SyncTalk_2D's start)
    walk_start: int = 0
    #: stop after this many speech frames (offline renders)
    frame_limit: int | None = None
    #: the last frame of an utterance also takes the audio after it (offline: nothing is lost)
    remainder: bool = False
    clock: Clock = REALTIME
    stats_interval_s: float = 1.0
    #: how long after its first window an utterance's first frame is shown; None: the scheduler's
    #: figure (a batch already running + its own batch + the wait to fill it, at the current load)
    start_budget_s: float | None = None
    #: frames in flight between the features and the sinks; None: one batch time plus a second of frames
    lookahead_frames: int | None = None
    #: audio held ahead of the features before an offline feeder waits (live pushes never wait)
    hold_s: float = 2.0
    #: how long a paced tick may wait past its due time for a frame still in the model
    grace_s: float = 0.01
    #: frames of look-ahead that idle frames through the model are submitted ahead of their tick
    idle_lead: int = 4
    #: model output to pixels: ``nearest`` or ``truncate`` (the specification's), see vision.output_to_uint8
    output_rounding: str = "nearest"

    def __post_init__(self) -> None:
        if self.output_rounding not in ("nearest", "truncate"):  # vision.ROUNDINGS, without importing OpenCV here
            raise ConfigError(f"output_rounding must be nearest or truncate, not {self.output_rounding!r}")
        if self.idle not in IDLE_MODES:
            raise ConfigError(f"idle must be one of {', '.join(IDLE_MODES)}, not {self.idle!r}")
        if self.walk_start < 0:
            raise ConfigError(f"walk_start must be >= 0, got {self.walk_start}")
        if self.lookahead_frames is not None and self.lookahead_frames < 1:
            raise ConfigError(f"lookahead_frames must be >= 1, got {self.lookahead_frames}")
        if self.start_budget_s is not None and self.start_budget_s < 0:
            raise ConfigError(f"start_budget_s must be >= 0, got {self.start_budget_s}")


@dataclass
class SessionStats:
    """A snapshot: what ``GET /v1/sessions/{id}`` shows."""

    state: str  # idle | speaking | failed | closed
    frames: int  # output frames delivered
    speech_frames: int  # frames rendered through the model and shown
    fps: float  # rendered frames shown per second over the last stats interval
    skipped: int  # frames skipped before inference
    late: int  # frames rendered but too late to show (their audio went out with the last image)
    underruns: int  # ticks when an utterance had no audio yet (the input was slower than real time)
    position_s: float  # seconds of the current utterance shown
    lag_p50_s: float = 0.0
    lag_p95_s: float = 0.0
    lag_p99_s: float = 0.0
    latency_s: list[float] = field(default_factory=list)
    #: frames between the features and the sinks now, and the session's budget for them
    in_flight: int = 0
    lookahead_frames: int = 0


class _Utterance:
    """One utterance: its audio (kept until each frame took its share), frames ready, its walk binding."""

    def __init__(self, gen: int, rate: int, fps: Fraction, pushed_at: float) -> None:
        self.gen = gen
        self.audio = _AudioClock(rate, fps)
        self.pushed_at = pushed_at
        self.flushed = False
        self.feat_pos = 0  # samples the feature stage has read
        self.total: int | None = None  # frames, once the features have ended
        self.emitted = 0  # windows the feature stage has produced
        self.p0: int | None = None  # walk position of frame 0
        self.t0_plan: float | None = None  # clock time frame 0 is planned to be shown (its start budget)
        self.t0: float | None = None  # clock time frame 0 was shown (moves on with underruns)
        self.first_submit: float | None = None
        self.started = False
        self.next_j = 0
        self.ready: dict[int, tuple[np.ndarray, np.ndarray | None, tuple[int, int, int, int], int]] = {}
        self.skipped: set[int] = set()
        self.cut = False  # the frame limit ended it (its audio remainder is not rendered)
        self.ready0_at: float | None = None  # when frame 0 became ready
        self.window0_pushed: float | None = None  # when the audio that completed frame 0's window was pushed

    @property
    def in_flight(self) -> int:
        """Frames made by the features and not yet shown."""
        return self.emitted - self.next_j


def wake(cv: threading.Condition) -> None:
    with cv:
        cv.notify_all()


__all__ = ["IDLE_MODES", "SessionClosed", "SessionOptions", "SessionStats"]
