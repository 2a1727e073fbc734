"""The server's ONLY contact with the live-session engine (the Python session API).

Everything else in :mod:`avatar.serve` (routes, tokens, limits, admission,
metrics, the WebSocket protocol, WebRTC tracks, the page) talks to the two
small classes here, :class:`LiveService` and :class:`LiveSession`, so a change
of the engine's API touches this module alone. The server is a thin layer: all
it does through here, Python can do with the session API directly.

Event callbacks arrive on engine threads as plain dicts::

    {"type": "speech_started", "latency_s": 0.08}
    {"type": "speech_ended"}
    {"type": "interrupted", "position_s": 1.24}
    {"type": "ended", "reason": "..."}          # the session ended by itself
"""

from __future__ import annotations

import logging
import threading
import time
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import ConfigError
from ..interfaces import Sink
from .config import AvatarSpec

log = logging.getLogger(__name__)

EventFn = Callable[[dict[str, Any]], None]


class LiveSession:
    """One live session: push audio, flush, interrupt, read stats, close."""

    def __init__(self, session: Any, fps: Fraction) -> None:
        self._s = session
        self.fps = fps

    def push(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Mono PCM (int16 or float32) at ``sample_rate``; returns at once."""
        self._s.push_audio(pcm, sample_rate)

    def flush(self) -> None:
        self._s.flush()

    def interrupt(self) -> float:
        """Barge-in; returns the seconds of the utterance that were shown."""
        return float(_position_s(self._s.interrupt()))

    def stats(self) -> dict[str, Any]:
        """state, fps, lag_s, skipped, position_s (what GET /v1/sessions/{id} shows)."""
        st = self._s.stats() if callable(getattr(self._s, "stats", None)) else getattr(self._s, "stats", {})
        d = st if isinstance(st, dict) else (st.to_dict() if hasattr(st, "to_dict") else vars(st))
        return {
            "state": d.get("state", "live"),
            "frames": int(d.get("frames", d.get("frames_delivered", 0)) or 0),
            "skipped": int(d.get("skipped", d.get("frames_skipped", 0)) or 0),
            "lag_s": float(d.get("lag_s", d.get("lag_p95_s", 0.0)) or 0.0),
            "position_s": float(d.get("position_s", 0.0) or 0.0),
        }

    def close(self) -> None:
        self._s.close()


def _position_s(value: Any) -> float:
    if isinstance(value, (int, float)):
        return float(value)
    for name in ("position_s", "shown_s", "seconds"):
        if hasattr(value, name):
            return float(getattr(value, name))
    return 0.0


class LiveService:
    """Avatars and models loaded once, one shared batched backend, sessions on top."""

    def __init__(
        self,
        avatars: Sequence[AvatarSpec],
        *,
        backend: str = "auto",
        batch: int = 8,
        threads: int | None = None,
    ) -> None:
        if not avatars:
            raise ConfigError("no avatar to serve: give --avatar PATH (or --demo)")
        self.specs = {a.name: a for a in avatars}
        if len(self.specs) != len(avatars):
            raise ConfigError("two avatars have the same name; name them with --avatar NAME=PATH")
        self.backend = backend
        self.batch = batch
        self.threads = threads
        self._service: Any = None
        self._fps: dict[str, Fraction] = {}
        self._lock = threading.Lock()
        self._seen_calls = 0
        self.backend_name = backend
        self.throughput_fps = 0.0

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Load every avatar and model once and warm the backend at its batch sizes."""
        from ..engine import (
            LiveService as EngineService,  # the live-session API (issue 11)
        )
        from ..interfaces import BackendOptions

        self._service = EngineService(
            backend=self.backend,
            backend_options=BackendOptions(max_batch=self.batch, threads=self.threads),
            max_batch=self.batch,
        )
        for spec in self.specs.values():
            self._service.add_avatar(
                spec.name, spec.path, model=spec.model, features=spec.features,
                feature_options=dict(spec.feature_options),
            )
            self._fps[spec.name] = Fraction(self._service.avatar_fps(spec.name))
        self.throughput_fps = float(self._service.warm())
        self.backend_name = str(getattr(self._service, "backend_name", self.backend))

    def close(self) -> None:
        if self._service is not None:
            self._service.close()
            self._service = None

    # -- sessions -------------------------------------------------------------------

    @property
    def avatars(self) -> list[str]:
        return sorted(self.specs)

    def fps(self, avatar: str) -> Fraction:
        return self._fps[avatar]

    def open_session(
        self,
        avatar: str,
        sinks: Sequence[Sink],
        *,
        features: str | None = None,
        idle: Mapping[str, Any] | str | None = None,
        on_event: EventFn | None = None,
    ) -> LiveSession:
        if avatar not in self.specs:
            raise ConfigError(f"unknown avatar {avatar!r}; this server has {', '.join(self.avatars)}")
        emit = on_event or (lambda ev: None)
        s = self._service.open_session(avatar, sinks=list(sinks), features=features, idle=idle)
        for kind in ("speech_started", "speech_ended", "interrupted", "ended"):
            s.on(kind, lambda ev, kind=kind: emit(_event_dict(kind, ev)))
        return LiveSession(s, self._fps[avatar])

    def batch_records(self) -> list[tuple[int, float]]:
        """(batch size, seconds) of each backend call since the last call of this method."""
        with self._lock:
            if self._service is None:
                return []
            calls = list(self._service.backend_calls())
            new = calls[self._seen_calls :]
            self._seen_calls = len(calls)
        return [(int(n), float(s)) for n, s in new]


def _event_dict(kind: str, ev: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"type": kind, "t": time.time()}
    if kind == "speech_started":
        d["latency_s"] = float(getattr(ev, "latency_s", 0.0) or 0.0)
    elif kind == "interrupted":
        d["position_s"] = _position_s(ev)
    elif kind == "ended":
        d["reason"] = str(getattr(ev, "reason", "") or "")
    return d
