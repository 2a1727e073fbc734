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

from ..contract import ModelContract, check_feature_match, read_contract
from ..errors import ConfigError
from ..framestore import DEFAULT_MEMORY_BUDGET_MB
from ..interfaces import Backend, BackendOptions, FeatureSource
from .pacing import REALTIME, Clock
from .scheduler import InferenceScheduler
from .session import Session, SessionOptions
from .threads import ThreadBudget

log = logging.getLogger(__name__)


@dataclass
class ServiceOptions:
    """How the shared inference runs."""

    backend: str = "auto"
    backend_options: BackendOptions | None = None
    #: the most frames one backend call takes (the backend's best batch)
    batch_size: int = 8
    #: how long a partial batch waits for more frames (never past the earliest deadline)
    max_wait_s: float = 0.002
    #: False: one backend per session (no cross-session batching; for comparison)
    batching: bool = True
    #: run each batch size once at load so the first utterance does not pay for it
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
            if self.options.threads != "auto":
                raise ConfigError(f"threads must be 'auto', a ThreadBudget or None, not {self.options.threads!r}")
            gpu = self.options.backend in ("onnx-cuda", "tensorrt")
            self.options = replace(self.options, threads=ThreadBudget.plan(gpu=gpu))
        if isinstance(self.options.threads, ThreadBudget):
            self.options.threads.apply_process_wide()
        self._lock = threading.RLock()
        self._shared: dict[tuple[Any, ...], _Shared] = {}
        self._packages: dict[str, Any] = {}
        self._sources: dict[tuple[Any, ...], FeatureSource] = {}
        self._sessions: list[Session] = []
        self._count = 0
        self._closed = False

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
        from ..render import make_sinks

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
        try:
            session = Session(package, source, shared.scheduler, make_sinks(sinks), opts, name=sid,
                              on_close=lambda s, k=shared: self._release(s, k))
            session.open()
        except BaseException:
            self._release(None, shared)
            raise
        with self._lock:
            self._sessions.append(session)
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
                "backends": {f"{k[0]}@{v.name}#{i}": v.scheduler.stats.to_dict() for i, (k, v) in enumerate(self._shared.items())},
            }

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
        from ..render import make_feature_source, package_padding

        opts = dict(options or {})
        if isinstance(self.options.threads, ThreadBudget) and isinstance(features, str):
            opts = self.options.threads.feature_options(features, opts)
        if not opts.get("padding"):
            padding = package_padding(package, feature_type)
            if padding:
                opts["padding"] = padding
        if features == "ave" and not opts.get("encoder"):
            enc = getattr(package, "audio_encoder_path", None)
            if enc is None:
                raise ConfigError("the ave feature source needs an audio-encoder model: feature_options={'encoder': ...}")
            opts["encoder"] = str(enc)
        key = (features, tuple(sorted((k, repr(v)) for k, v in opts.items())))
        with self._lock:
            if key not in self._sources:
                self._sources[key] = make_feature_source(features, opts)
            return self._sources[key]

    def _backend(self, model: Path, sid: str) -> _Shared:
        from ..render import open_backend

        o = self.options
        bopts = o.backend_options or BackendOptions(max_batch=o.batch_size)
        if isinstance(o.threads, ThreadBudget):
            bopts = o.threads.backend_options(o.backend, bopts)
        key: tuple[Any, ...] = (str(model.resolve()), o.backend, repr(bopts))
        if not o.batching:
            key = (*key, sid)  # one backend per session
        if key in self._shared:
            return self._shared[key]
        contract = read_contract(model)
        backend, used = open_backend(o.backend, model, bopts)
        try:
            # a fixed-batch model (upstream exports: 1) runs at its batch; partial batches are padded
            batch = contract.fixed_batch or o.batch_size
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
            shared.users -= 1
            if not self.options.batching and shared.users <= 0:
                for k, v in list(self._shared.items()):
                    if v is shared:
                        del self._shared[k]
                self._drop(shared)

    @staticmethod
    def _drop(shared: _Shared) -> None:
        shared.scheduler.close()
        shared.backend.close()


__all__ = ["AvatarService", "ServiceOptions", "Session", "SessionOptions"]

