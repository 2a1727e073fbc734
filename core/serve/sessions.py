"""The server's sessions: registry, admission, lifetimes, vanished clients, events.

A :class:`ServerSession` wraps one :class:`~avatar.serve.live.LiveSession`
with what only the server needs: its id and token, the clients attached to it
(audio sockets, WebRTC peers), the event subscribers (each socket has a
queue), and the meter that measures what its outputs see.

The :class:`SessionManager`'s watchdog ends a session when its lifetime is up,
when its last client has been gone for ``client_timeout_s`` (a vanished
browser), or when it never got a client within ``attach_timeout_s``.
Blocking engine calls (open, close) run in worker threads, never on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .admission import Admission
from .config import Limits
from .live import LiveService, LiveSession
from .metrics import MeterSink, ServerMetrics

log = logging.getLogger(__name__)


@dataclass
class ServerSession:
    id: str
    token: str
    avatar: str
    live: LiveSession
    meter: MeterSink
    #: the session's webrtc sink, if it asked for one
    webrtc: Any = None
    #: outputs as the client gave them, with secrets redacted (for GET)
    outputs: list[dict[str, Any]] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    #: sockets and peers attached now (opaque keys)
    clients: set[object] = field(default_factory=set)
    ever_attached: bool = False
    last_client: float = field(default_factory=time.monotonic)
    subscribers: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)
    peers: set[Any] = field(default_factory=set)
    pushed_s: float = 0.0
    first_push: float | None = None
    skipped_seen: int = 0
    cpu_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    frames_seen: dict[str, int] = field(default_factory=dict)
    ended: str | None = None

    def attach(self, key: object) -> None:
        self.clients.add(key)
        self.ever_attached = True
        self.last_client = time.monotonic()

    def detach(self, key: object) -> None:
        self.clients.discard(key)
        self.last_client = time.monotonic()

    def touch(self) -> None:
        self.last_client = time.monotonic()

    def publish(self, event: dict[str, Any]) -> None:
        """Send an event to every subscriber (call on the loop)."""
        for q in list(self.subscribers):
            if q.qsize() < 256:  # a subscriber that stopped reading loses events, not memory
                q.put_nowait(event)

    def status(self) -> dict[str, Any]:
        st = self.live.stats()
        m = self.meter.summary()
        out: dict[str, Any] = {
            "id": self.id,
            "avatar": self.avatar,
            "state": self.ended and "ended" or st.get("state", "live"),
            "fps": m["fps"],
            "target_fps": float(self.live.fps),
            "frames": m["frames"],
            "speech_frames": st.get("speech_frames", 0),
            "lag_s": max(m["lag_s"], st.get("lag_s", 0.0)),
            "skipped": st.get("skipped", 0),
            "lag_p50_s": st.get("lag_p50_s", 0.0),
            "lag_p95_s": st.get("lag_p95_s", 0.0),
            "lag_p99_s": st.get("lag_p99_s", 0.0),
            "latency_s": st.get("latency_s", []),
            "position_s": st.get("position_s", 0.0),
            "clients": len(self.clients),
            "age_s": round(time.monotonic() - self.created, 2),
            "outputs": self.outputs,
        }
        if self.webrtc is not None:
            out["webrtc"] = self.webrtc.stats()
        return out


class SessionManager:
    """Open, find and end sessions; the watchdog and the periodic stats."""

    def __init__(self, service: LiveService, admission: Admission, metrics: ServerMetrics, limits: Limits,
                 stats_interval_s: float = 1.0) -> None:
        self.service = service
        self.admission = admission
        self.metrics = metrics
        self.limits = limits
        self.stats_interval_s = stats_interval_s
        self.sessions: dict[str, ServerSession] = {}
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._watch(), name="avatar-serve-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await asyncio.gather(*(self.end(s, "server shutting down") for s in list(self.sessions.values())))

    def get(self, sid: str) -> ServerSession | None:
        return self.sessions.get(sid)

    async def open(self, avatar: str, sinks: list[Any], *, features: str | None, idle: Any,
                   webrtc: Any, outputs: list[dict[str, Any]]) -> ServerSession:
        """Admit and open a session (raises :class:`~.admission.Refused` at capacity)."""
        self.admission.admit()
        loop = asyncio.get_running_loop()
        meter = MeterSink(self.metrics)
        holder: dict[str, ServerSession] = {}

        def on_event(ev: dict[str, Any]) -> None:  # engine thread → loop
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._on_event, holder, ev)

        try:
            live = await loop.run_in_executor(None, lambda: self.service.open_session(
                avatar, [meter, *sinks], features=features, idle=idle, on_event=on_event))
        except BaseException:
            self.admission.release()
            raise
        s = ServerSession(id=secrets.token_hex(8), token=secrets.token_urlsafe(24), avatar=avatar, live=live,
                          meter=meter, webrtc=webrtc, outputs=outputs)
        holder["s"] = s
        self.sessions[s.id] = s
        self.metrics.sessions_opened.inc()
        self.metrics.sessions.set(len(self.sessions))
        log.info("session %s opened (avatar %s, outputs %s)", s.id, avatar, [o["type"] for o in outputs])
        return s

    def _on_event(self, holder: dict[str, ServerSession], ev: dict[str, Any]) -> None:
        s = holder.get("s")
        if s is None or s.ended:
            return
        if ev.get("type") == "speech_started" and ev.get("latency_s") is not None:
            self.metrics.latency.observe(float(ev["latency_s"]))
        if ev.get("type") == "ended":
            asyncio.ensure_future(self.end(s, ev.get("reason") or "the session ended"))
            return
        s.publish(ev)

    async def end(self, s: ServerSession, reason: str) -> dict[str, Any]:
        """End a session once: close its peers and engine session, release its slot."""
        if s.ended:
            return {"id": s.id, "state": "ended", "reason": s.ended}
        s.ended = reason
        final = s.status()
        self.sessions.pop(s.id, None)
        s.publish({"type": "ended", "reason": reason})
        for pc in list(s.peers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), 5.0)
        try:
            await asyncio.get_running_loop().run_in_executor(None, s.live.close)
        except Exception as exc:  # the slot is released whatever happened
            log.warning("closing session %s: %s", s.id, exc)
        self.admission.release()
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.sessions_ended.labels(_reason_label(reason)).inc()
        log.info("session %s ended: %s", s.id, reason)
        final["state"] = "ended"
        final["reason"] = reason
        return final

    async def _watch(self) -> None:
        lim = self.limits
        next_stats = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for s in list(self.sessions.values()):
                reason = None
                if now - s.created > lim.max_session_s:
                    reason = f"the session lifetime limit ({lim.max_session_s:g} s) was reached"
                elif not s.clients and s.ever_attached and now - s.last_client > lim.client_timeout_s:
                    reason = f"the client went away (nothing attached for {lim.client_timeout_s:g} s)"
                elif not s.ever_attached and now - s.last_client > lim.attach_timeout_s:
                    reason = f"no client attached within {lim.attach_timeout_s:g} s"
                if reason:
                    asyncio.ensure_future(self.end(s, reason))
            self._collect()
            if now >= next_stats:
                next_stats = now + self.stats_interval_s
                for s in list(self.sessions.values()):
                    if s.subscribers:
                        s.publish({"type": "stats", **_stats_event(s.status())})

    def _collect(self) -> None:
        """Move engine counters into the metrics (batch sizes, inference time, skips, fps)."""
        for n, seconds in self.service.batch_records():
            self.metrics.batch.observe(n)
            self.metrics.inference.observe(seconds)
        fps = []
        for s in self.sessions.values():
            st = s.live.stats()
            skipped = int(st.get("skipped", 0))
            if skipped > s.skipped_seen:
                self.metrics.skipped.inc(skipped - s.skipped_seen)
                s.skipped_seen = skipped
            _collect_cpu(self.metrics, s, st)
            fps.append(s.meter.fps())
        self.metrics.delivered_fps.set(sum(fps) / len(fps) if fps else 0.0)


def _collect_cpu(metrics: Any, s: Any, st: dict[str, Any]) -> None:
    """Per-stage CPU and frames by kind since the last collection, into the counters."""
    for kind, row in st.get("cpu_s", {}).items():
        for stage, seconds in row.items():
            old = s.cpu_seen.get((kind, stage), 0.0)
            if seconds > old:
                metrics.stage_cpu.labels(stage, kind).inc(seconds - old)
                s.cpu_seen[(kind, stage)] = seconds
    speech = int(st.get("speech_frames", 0))
    for kind, n in (("speech", speech), ("idle", int(st.get("frames", 0)) - speech)):
        if n > s.frames_seen.get(kind, 0):
            metrics.frames_kind.labels(kind).inc(n - s.frames_seen.get(kind, 0))
            s.frames_seen[kind] = n


def _stats_event(st: dict[str, Any]) -> dict[str, Any]:
    keys = ("state", "fps", "target_fps", "frames", "lag_s", "skipped", "position_s")
    return {k: st[k] for k in keys if k in st}


def _reason_label(reason: str) -> str:
    """A fixed word for the metrics label (never the free text: it could carry a URL)."""
    for word, label in (("lifetime", "lifetime"), ("went away", "client_gone"), ("no client", "never_attached"),
                        ("deleted", "deleted"), ("shutting", "shutdown")):
        if word in reason:
            return label
    return "error"

