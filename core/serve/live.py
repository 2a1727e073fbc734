"""The server's ONLY contact with the live-session engine (:mod:`avatar.engine`).

Everything else in :mod:`avatar.serve` (routes, tokens, limits, admission,
metrics, the WebSocket protocol, WebRTC tracks, the page) talks to the two
small classes here, :class:`LiveService` and :class:`LiveSession`, so a change
of the engine's API touches this module alone. The server is a thin layer: all
it does through here, Python can do with ``AvatarService`` / ``Session``
directly (docs/live.md).

Event callbacks arrive on engine threads as plain dicts::

    {"type": "speech_started", "latency_s": 0.08}
    {"type": "speech_ended", "position_s": 2.4}
    {"type": "ended", "reason": "..."}          # the session failed and ended by itself

(``interrupted`` is answered by the server from :meth:`LiveSession.interrupt`'s
return value, so every interrupt gets exactly one answer.)
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from ..errors import AvatarError, ConfigError
from ..interfaces import BackendOptions, Sink
from .config import AvatarSpec

log = logging.getLogger(__name__)

EventFn = Callable[[dict[str, Any]], None]
IDLE_MODES = ("avatar", "model")


class LiveSession:
    """One live session: push audio, flush, interrupt, read stats, close."""

    def __init__(self, session: Any, fps: Fraction, unsubscribe: Callable[[], Any] | None = None) -> None:
        self._s = session
        self.fps = fps
        self._unsubscribe = unsubscribe
        self._final: dict[str, Any] | None = None

    def push(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Mono PCM (int16 or float32) at ``sample_rate``; never blocks on the model."""
        self._open().push_audio(pcm, sample_rate)

    def flush(self) -> None:
        self._open().flush()

    def interrupt(self) -> float:
        """Barge-in; returns the seconds of the utterance that were shown."""
        return float(self._open().interrupt())

    def _open(self) -> Any:
        if self._s is None:
            raise AvatarError("the session has ended")
        return self._s

    def stats(self) -> dict[str, Any]:
        """state, frames, skipped, lag_s (p95), position_s."""
        if self._s is None:  # closed: the last figures
            return dict(self._final or {"state": "closed"})
        st = self._s.stats()
        return {
            "state": st.state,
            "frames": int(st.frames),
            "speech_frames": int(st.speech_frames),
            "skipped": int(st.skipped),
            "lag_s": float(st.lag_p95_s),
            "lag_p50_s": float(st.lag_p50_s),
            "lag_p95_s": float(st.lag_p95_s),
            "lag_p99_s": float(st.lag_p99_s),
            "latency_s": [round(float(x), 4) for x in st.latency_s[-20:]],  # the last utterances
            "position_s": float(st.position_s),
            # CPU seconds by kind (speech/idle) and stage, for /metrics
            "cpu_s": self._s.times.cpu.snapshot(),
        }

    def close(self) -> None:
        """Close the engine session and let go of it (no callback of ours stays in it, no reference to it here)."""
        if self._s is None:
            return
        try:
            self._s.close()
        finally:
            if self._unsubscribe is not None:
                self._unsubscribe()
            self._final = {**self.stats(), "state": "closed"} if self._s is not None else self._final
            self._s = self._unsubscribe = None


class LiveService:
    """Avatars and models loaded once, one shared batched backend, sessions on top."""

    def __init__(self, avatars: Sequence[AvatarSpec], *, backend: str = "auto", batch: int = 8,
                 threads: int | None = None) -> None:
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
        self._seen: dict[str, tuple[dict[int, int], int, float]] = {}
        self.backend_name = backend
        self.throughput_fps = 0.0

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Load every avatar, feature source and model once; warm and measure the backend."""
        from ..engine.service import AvatarService

        self._service = AvatarService(backend=self.backend, batch_size=self.batch,
                                      backend_options=BackendOptions(max_batch=self.batch, threads=self.threads))
        try:
            # a first session per avatar loads its package, feature source and (shared,
            # warmed) backend; closing it keeps them in the service for later sessions
            for spec in self.specs.values():
                s = self._open(spec, [_NullSink()], None, "avatar")
                self._fps[spec.name] = Fraction(s.fps)
                s.close()
            self.throughput_fps = self._measure()
        except BaseException:
            self.close()
            raise

    def _measure(self) -> float:
        """Frames per second the backend makes at its best batch (timed on its own instance).

        A separate instance keeps the measurement off the shared scheduler; it is
        loaded, timed over a few calls per batch size after one warm call, and closed.
        """
        from ..contract import read_contract
        from ..render import open_backend

        spec = next(iter(self.specs.values()))
        model = spec.model or _package_model(spec.path)
        contract = read_contract(model)
        backend, used = open_backend(self.backend, model, BackendOptions(max_batch=self.batch, threads=self.threads))
        self.backend_name = used
        try:
            vis = next((t for t in backend.inputs if t.name == contract.visual.name), contract.visual)
            vshape = tuple(d if isinstance(d, int) else 320 for d in vis.shape[1:])
            best = 0.0
            sizes = {contract.fixed_batch} if contract.fixed_batch else {1, max(1, self.batch // 2), self.batch}
            for n in sorted(sizes):
                feeds = {contract.visual.name: np.zeros((n, *vshape), np.dtype(vis.dtype)),
                         contract.audio.name: np.zeros((n, *contract.audio_window_shape), np.float32)}
                backend.run(feeds)
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    backend.run(feeds)
                    times.append(time.perf_counter() - t)
                best = max(best, n / statistics.median(times))
            return best
        finally:
            backend.close()

    def capacity(self, fps: float) -> Any:
        """The engine's capacity figure for sessions of ``fps`` (see avatar.engine.capacity), as admission uses it."""
        from .admission import Capacity

        cap = self._service.capacity(fps)
        return Capacity(cap.sessions, "measured", self.throughput_fps, fps, basis=cap.basis)

    def engine_health(self, fps: float) -> dict[str, Any]:
        """For /health: the engine's current capacity figure and whether its scheduler threads run."""
        if self._service is None:
            return {}
        return {"capacity": self._service.capacity(fps).to_dict(), **self._service.health()}

    def scheduler_health(self) -> dict[str, Any]:
        """The engine's scheduler threads: alive, and how often one was replaced (for /metrics)."""
        return {} if self._service is None else self._service.health()

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

    def open_session(self, avatar: str, sinks: Sequence[Sink], *, features: str | None = None,
                     idle: str | None = None, on_event: EventFn | None = None) -> LiveSession:
        """Open a live session (blocking: sinks connect); events go to ``on_event``."""
        spec = self.specs.get(avatar)
        if spec is None:
            raise ConfigError(f"unknown avatar {avatar!r}; this server has {', '.join(self.avatars)}")
        idle = idle or "avatar"
        if idle not in IDLE_MODES:
            raise ConfigError(f"idle must be one of {', '.join(IDLE_MODES)}, not {idle!r}")
        s = self._open(spec, list(sinks), features, idle)
        unsubscribe = s.subscribe(lambda ev: _forward(ev, on_event)) if on_event is not None else None
        return LiveSession(s, self._fps[avatar], unsubscribe)

    def _open(self, spec: AvatarSpec, sinks: list[Sink], features: str | None, idle: str) -> Any:
        name = features or spec.features
        options = dict(spec.feature_options) if name == spec.features else {}
        return self._service.open_session(spec.path, sinks=sinks, features=name, feature_options=options,
                                          model=spec.model, idle=idle)

    def batch_records(self) -> list[tuple[int, float]]:
        """(batch size, seconds) per backend call since the last call of this method.

        The engine keeps a histogram of batch sizes and the total run time per
        shared backend; each call in an interval is given the interval's mean time.
        """
        if self._service is None:
            return []
        out: list[tuple[int, float]] = []
        with self._lock:
            for key, st in self._service.stats()["backends"].items():
                sizes, calls, run_s = dict(st["batch_sizes"]), int(st["calls"]), float(st["run_s"])
                old_sizes, old_calls, old_run = self._seen.get(key, ({}, 0, 0.0))
                self._seen[key] = (sizes, calls, run_s)
                new_calls = calls - old_calls
                if new_calls <= 0:
                    continue
                mean = (run_s - old_run) / new_calls
                for n, count in sizes.items():
                    out.extend([(int(n), mean)] * max(0, count - old_sizes.get(n, 0)))
        return out


class _NullSink(Sink):
    """Takes the warm-up session's frames."""

    name = "null"

    def open(self, info: Any) -> None:
        pass

    def write(self, frame: Any) -> None:
        pass

    def close(self, aborted: bool = False) -> Any:
        from ..interfaces import SinkReport

        return SinkReport()


def _package_model(path: Any) -> Any:
    from ..package import AvatarPackage

    with AvatarPackage.open(path) as pkg:
        if pkg.model_path is None:
            raise ConfigError(f"the avatar package {path} names no model; pass --model MODEL.onnx")
        return pkg.model_path


def _forward(ev: Any, emit: EventFn) -> None:
    if ev.kind == "speech_started":
        emit({"type": "speech_started", "latency_s": round(float(ev.latency_s or 0.0), 4), "t": time.time()})
    elif ev.kind == "speech_ended":
        emit({"type": "speech_ended", "position_s": round(float(ev.position_s or 0.0), 4), "t": time.time()})
    elif ev.kind == "error":
        emit({"type": "ended", "reason": f"the session failed: {ev.error}"})
