"""The live service: shared backends and the sessions that use them.

:class:`AvatarService` loads one backend (and one scheduler thread) per
(model, backend, options) and serves every session that uses that model
through it, batching ready frames across sessions. Avatar packages and
feature sources are opened once per service and shared too. A server (HTTP,
WebSocket, WebRTC) is a thin layer over this object.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from ..compose import make_sinks, model_batch, open_backend
from ..contract import ModelContract, check_feature_match, read_contract
from ..errors import ConfigError
from ..framestore import DEFAULT_MEMORY_BUDGET_MB
from ..interfaces import Backend, BackendOptions, FeatureSource
from .capacity import EngineCapacity, decide, probe_session_cost
from .pacing import REALTIME, Clock
from .scheduler import InferenceScheduler
from .session import Session, SessionOptions
from .threads import ThreadBudget, resolve_budget

log = logging.getLogger(__name__)


@dataclass
class ServiceOptions:
    """How the shared inference runs."""

    backend: str = "auto"
    backend_options: BackendOptions | None = None
    #: the most frames one backend call takes (the backend's best batch)
    batch_size: int = 8
    #: how long a partial batch waits for more frames (never past the latest start of its earliest deadline)
    max_wait_s: float = 0.005
    #: False: one backend per session (no cross-session batching; for comparison)
    batching: bool = True
    #: run each batch size once at load so the first utterance does not pay for it
    #: (and decode what each avatar's frame store keeps)
    warmup: bool = True
    #: size the backend's, the audio encoder's and OpenCV's threads together (see :mod:`.threads`):
    #: ``"auto"`` plans them for this machine (OpenCV's pool is process-wide: one thread from then on),
    #: a :class:`ThreadBudget` as given, None leaves each library its own default
    threads: ThreadBudget | str | None = "auto"
    #: MB of decoded frames each avatar's shared frame store keeps (see docs/avatar-package.md)
    frame_memory_mb: float = DEFAULT_MEMORY_BUDGET_MB
    clock: Clock = field(default=REALTIME, repr=False)


@dataclass
class _Shared:
    backend: Backend
    name: str
    contract: ModelContract
    scheduler: InferenceScheduler
    users: int = 0


class AvatarService:
    """Owns the shared backends; opens live sessions on them.

    >>> with AvatarService(backend="cpu") as service:            # doctest: +SKIP
    ...     s = service.open_session("avatars/anna", sinks=[CallbackSink(show)])
    ...     s.push_audio(tts_chunk, 24000); s.flush()
    """

    def __init__(self, options: ServiceOptions | None = None, **kw: Any) -> None:
        self.options = options or ServiceOptions(**kw)
        if options is not None and kw:
            raise ConfigError("pass either ServiceOptions or keyword options, not both")
        if self.options.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        if isinstance(self.options.threads, str):
            self.options = replace(self.options, threads=resolve_budget(self.options.threads, self.options.backend))
        if isinstance(self.options.threads, ThreadBudget):
            self.options.threads.apply_process_wide()
        self._lock = threading.RLock()
        self._shared: dict[tuple[Any, ...], _Shared] = {}
        self._packages: dict[str, Any] = {}
        self._sources: dict[tuple[Any, ...], FeatureSource] = {}
        self._sessions: list[Session] = []
        self._count = 0
        self._closed = False
        #: scheduler threads found dead and replaced (with their backends) when a session opened
        self.replaced_schedulers = 0
        self._session_cost: tuple[float, str] | None = None  # CPU s per frame of a session's own work, and how
        self._learned: list[float] = [0.0, 0.0]  # session work seconds, frames (from closed sessions)

    # ------------------------------------------------------------------ sessions

    def open_session(
        self,
        avatar: str | Path | Any,
        *,
        sinks: Any,
        features: str | FeatureSource = "ave",
        feature_options: Mapping[str, Any] | None = None,
        model: str | Path | None = None,
        idle: str = "avatar",
        walk_start: int = 0,
        name: str | None = None,
        options: SessionOptions | None = None,
    ) -> Session:
        """Start a session of ``avatar`` (a package directory or an opened package) on ``sinks``.

        Its output starts at once (idle frames until speech is pushed). Sinks are
        given as for :func:`avatar.render.render`.
        """
        if self._closed:
            raise ConfigError("the service is closed")
        package = self._package(avatar)
        model_path = Path(model) if model is not None else getattr(package, "model_path", None)
        if model_path is None:
            raise ConfigError("no model given and the avatar package names none; pass model=MODEL.onnx")
        opts = options or SessionOptions(idle=idle, walk_start=walk_start, clock=self.options.clock)
        with self._lock:
            self._count += 1
            sid = name or f"s{self._count}"
            shared = self._backend(Path(model_path), sid)
        # the package's recorded padding is the default, as in render(): the model was trained with it
        source = self._source(features, feature_options, package, shared.contract.feature_type)
        check_feature_match(shared.contract, source.name, tuple(source.window_shape))
        with self._lock:
            shared.users += 1
        session: Session | None = None
        try:
            if self._session_cost is None:
                self._session_cost = (probe_session_cost(package, source), "probed")
            session = Session(package, source, shared.scheduler, make_sinks(sinks), opts, name=sid,
                              on_close=lambda s, k=shared: self._release(s, k))
            with self._lock:
                self._sessions.append(session)
            session.open()
        except BaseException:
            self._release(session, shared)
            raise
        return session

    @property
    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions)

    def stats(self) -> dict[str, Any]:
        """Per shared backend: calls, frames, mean batch, skipped; and the session count."""
        with self._lock:
            return {
                "sessions": len(self._sessions),
                "backends": {f"{k[0]}@{v.name}#{i}": {**v.scheduler.stats.to_dict(), "lanes": v.scheduler.lanes}
                             for i, (k, v) in enumerate(self._shared.items())},
            }

    def capacity(self, fps: float) -> EngineCapacity:
        """Real-time sessions of ``fps`` this service holds: backend bound and per-frame CPU work, and how.

        See :mod:`avatar.engine.capacity`. Needs a loaded backend (a session was opened).
        """
        with self._lock:
            shared = next(iter(self._shared.values()), None)
            sessions = list(self._sessions)
            learned = list(self._learned)
        if shared is None:
            raise ConfigError("no backend is loaded yet: open a session first")
        sched = shared.scheduler
        cost, how = self._session_cost or (0.0, "not measured")
        work, frames = learned
        for s in sessions:
            work += _session_work(s)
            frames += s.frames
        if frames >= 100:
            cost, how = work / frames, "learned"
        lagging = None
        if any(s.frames >= 50 and (s.lags.percentile(95) > 0.2 or s.skipped > 0.05 * max(1, s.frames))
               for s in sessions if s.options.paced):
            lagging = len(sessions)
        return decide(sched.bound_fps(), sched.cpu_per_frame_s, cost, fps, session_cost=how, lagging=lagging)

    def health(self) -> dict[str, Any]:
        """Per shared backend: whether its scheduler thread runs, and how often it was replaced."""
        with self._lock:
            shared = list(self._shared.values())
        return {"schedulers": [{"backend": v.name, "alive": v.scheduler.alive, "restarts": v.scheduler.stats.restarts}
                               for v in shared],
                "replaced_schedulers": self.replaced_schedulers}

    def close(self) -> None:
        """Close every session, then the backends, sources and packages: no thread is left."""
        self._closed = True
        for s in self.sessions:
            s.close()
        with self._lock:
            for shared in list(self._shared.values()):
                self._drop(shared)
            self._shared.clear()
            for src in self._sources.values():
                try:
                    src.close()
                except Exception as exc:
                    log.warning("closing feature source %s failed: %s", src.name, exc)
            self._sources.clear()
            for pkg in self._packages.values():
                close = getattr(pkg, "close", None)
                if close is not None:
                    close()
            self._packages.clear()

    def __enter__(self) -> "AvatarService":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ shared parts

    def _package(self, avatar: str | Path | Any) -> Any:
        if not isinstance(avatar, (str, Path)):
            return avatar
        from ..package import AvatarPackage

        key = str(Path(avatar).resolve())
        with self._lock:
            if key not in self._packages:
                pkg = AvatarPackage.open(avatar, memory_budget_mb=self.options.frame_memory_mb)
                if self.options.warmup:  # what the store keeps is decoded now, not on every session's first pass
                    pkg.store.preload()
                self._packages[key] = pkg
            return self._packages[key]

    def _source(
        self, features: str | FeatureSource, options: Mapping[str, Any] | None, package: Any, feature_type: str
    ) -> FeatureSource:
        if isinstance(features, FeatureSource):
            return features
        from ..compose import feature_options_for, make_feature_source

        # the package's recorded padding and audio encoder are the defaults, as in render()
        opts = feature_options_for(package, features, options, feature_type)
        if isinstance(self.options.threads, ThreadBudget):
            opts = self.options.threads.feature_options(features, opts)
        key = (features, tuple(sorted((k, repr(v)) for k, v in opts.items())))
        with self._lock:
            if key not in self._sources:
                self._sources[key] = make_feature_source(features, opts)
            return self._sources[key]

    def _backend(self, model: Path, sid: str) -> _Shared:
        o = self.options
        bopts = o.backend_options or BackendOptions(max_batch=o.batch_size)
        if isinstance(o.threads, ThreadBudget):
            bopts = o.threads.backend_options(o.backend, bopts)
        key: tuple[Any, ...] = (str(model.resolve()), o.backend, repr(bopts))
        if not o.batching:
            key = (*key, sid)  # one backend per session
        if key in self._shared:
            shared = self._shared[key]
            if shared.scheduler.alive:
                return shared
            # its scheduler gave up (it failed repeatedly): a fresh backend and scheduler
            log.warning("the shared inference of %s had stopped; replacing it", model.name)
            self.replaced_schedulers += 1
            del self._shared[key]
            self._drop(shared)
        contract = read_contract(model)
        backend, used = open_backend(o.backend, model, bopts)
        try:
            # a fixed-batch model (upstream exports: 1) runs at its batch; partial batches are padded
            batch = model_batch(contract, o.batch_size)
            scheduler = InferenceScheduler(backend, contract, batch_size=batch, max_wait_s=o.max_wait_s,
                                           clock=o.clock, name=f"inference-{used}")
        except BaseException:
            backend.close()
            raise
        if o.warmup:
            try:
                scheduler.warm()
            except BaseException:
                scheduler.close()
                backend.close()
                raise
        shared = self._shared[key] = _Shared(backend, used, contract, scheduler)
        return shared

    def _release(self, session: Session | None, shared: _Shared) -> None:
        with self._lock:
            if session is not None and session in self._sessions:
                self._sessions.remove(session)
                self._learned[0] += _session_work(session)
                self._learned[1] += session.frames
            shared.users -= 1
            if not self.options.batching and shared.users <= 0:
                for k, v in list(self._shared.items()):
                    if v is shared:
                        del self._shared[k]
                self._drop(shared)

    @staticmethod
    def _drop(shared: _Shared) -> None:
        shared.scheduler.close()
        try:
            shared.backend.close()
        except Exception as exc:
            log.warning("closing backend %s failed: %s", shared.name, exc)


def _session_work(s: Session) -> float:
    """CPU seconds a session spent on its own stages (features, avatar frames, visual inputs, compositing, sinks).

    Thread CPU time (see :mod:`.cpu`), speech and idle frames together: what the
    session's own threads burned, not how long they took on a busy machine.
    """
    cpu = s.times.cpu.snapshot()
    return sum(row.get(k, 0.0) for row in cpu.values() for k in ("features", "decode", "visual", "composite", "encode"))


__all__ = ["AvatarService", "ServiceOptions", "Session", "SessionOptions"]

