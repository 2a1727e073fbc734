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

from .admission import Admission, Refused
from .config import Limits
from .live import LiveService, LiveSession
from .metrics import MeterSink, ServerMetrics

log = logging.getLogger(__name__)


class Outbox:
    """One socket's events waiting to be sent, bounded.

    At most ``limit`` events wait; a newer ``stats`` event replaces an unsent one
    (stats are snapshots: the oldest is dropped). An event beyond the limit
    marks the box ``overflowed``: its sender closes the socket (a client that
    does not read loses its socket, never the server's memory).
    """

    def __init__(self, limit: int) -> None:
        self._events: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=limit)
        self._stats: dict[str, Any] | None = None
        self._wake = asyncio.Event()
        self.overflowed = False

    def put(self, event: dict[str, Any]) -> bool:
        """Queue ``event`` (call on the loop); False when the box overflowed."""
        if self.overflowed:
            return False
        if event.get("type") == "stats":
            self._stats = event
        else:
            try:
                self._events.put_nowait(event)
            except asyncio.QueueFull:
                self.overflowed = True
        self._wake.set()
        return not self.overflowed

    def waiting(self) -> int:
        return self._events.qsize() + (self._stats is not None)

    async def get(self) -> dict[str, Any] | None:
        """The next event to send; ``None`` once the box overflowed."""
        while True:
            if self.overflowed:
                return None
            if not self._events.empty():
                return self._events.get_nowait()
            if self._stats is not None:
                ev, self._stats = self._stats, None
                return ev
            self._wake.clear()
            await self._wake.wait()


@dataclass(eq=False)
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
    subscribers: set[Outbox] = field(default_factory=set)
    peers: set[Any] = field(default_factory=set)
    #: audio sockets open now
    sockets: int = 0
    #: a /speak upload is being read
    uploading: bool = False
    #: seconds of pushed audio not yet shown (a leaky bucket draining at real time), and when it was last drained
    queued_s: float = 0.0
    drained_at: float = field(default_factory=time.monotonic)
    skipped_seen: int = 0
    cpu_seen: dict[tuple[str, str], float] = field(default_factory=dict)
    frames_seen: dict[str, int] = field(default_factory=dict)
    ended: str | None = None
    #: forgets the session in the engine's event callback (set by the manager)
    unhold: Any = field(default=None, repr=False)

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
        for box in list(self.subscribers):
            box.put(event)

    def room_s(self, max_ahead_s: float) -> float:
        """Seconds of audio the session takes now: ``max_ahead_s`` less what waits to be shown.

        Queued audio is shown at real time, so the bucket drains by the time
        passed; it never goes below zero, so idle time is no credit.
        """
        now = time.monotonic()
        self.queued_s = max(0.0, self.queued_s - (now - self.drained_at))
        self.drained_at = now
        return max_ahead_s - self.queued_s

    def take_audio(self, seconds: float, max_ahead_s: float) -> str | None:
        """Count ``seconds`` of pushed audio; the error message (and nothing counted) when it is too much."""
        room = self.room_s(max_ahead_s)
        if seconds > room:
            return (f"audio arrives too fast: {self.queued_s + seconds:.1f} s would wait to be shown "
                    f"(limit {max_ahead_s:g} s); audio dropped")
        self.queued_s += seconds
        return None

    def interrupted(self) -> None:
        """Queued audio was dropped (barge-in): nothing waits any more."""
        self.queued_s, self.drained_at = 0.0, time.monotonic()

    def release(self) -> None:
        """Drop what the session refers to (it ended), so nothing keeps it alive but its last handlers."""
        self.subscribers.clear()
        self.peers.clear()
        self.clients.clear()
        self.unhold = None

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
        #: the audio sockets' handler tasks (shutdown waits for them to send ``ended``)
        self.socket_tasks: set[asyncio.Task[Any]] = set()
        #: set once a shutdown began: no session is admitted any more
        self.closing = False
        self._ending: set[asyncio.Future[Any]] = set()
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._watch(), name="avatar-serve-watchdog")

    async def stop(self) -> None:
        """Stop the watchdog and end what is left (after :meth:`shutdown`, nothing is)."""
        self.closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.gather(*(self.end(s, "shutdown") for s in list(self.sessions.values())))

    async def shutdown(self, timeout: float) -> None:
        """Stop admitting, end every session (``ended`` with reason ``shutdown`` on each socket, WebRTC peers
        closed, file outputs finished) and wait for the sockets to close, at most ``timeout`` seconds."""
        self.closing = True
        ends = [asyncio.ensure_future(self.end(s, "shutdown")) for s in list(self.sessions.values())]
        pending = {*ends, *self._ending, *self.socket_tasks}
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            if late:
                log.warning("shutdown: %d session(s) or socket(s) did not finish within %g s", len(late), timeout)

    def get(self, sid: str) -> ServerSession | None:
        return self.sessions.get(sid)

    async def open(self, avatar: str, sinks: list[Any], *, features: str | None, idle: Any,
                   webrtc: Any, outputs: list[dict[str, Any]]) -> ServerSession:
        """Admit and open a session (raises :class:`~.admission.Refused` at capacity)."""
        if self.closing:
            raise Refused("the server is shutting down")
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
        if self.closing:  # the shutdown began while the session opened
            await loop.run_in_executor(None, live.close)
            self.admission.release()
            raise Refused("the server is shutting down")
        s = ServerSession(id=secrets.token_hex(8), token=secrets.token_urlsafe(24), avatar=avatar, live=live,
                          meter=meter, webrtc=webrtc, outputs=outputs)
        holder["s"] = s
        s.unhold = holder.clear  # the engine's event callback stops referring to the session when it ends
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
            self._spawn_end(s, ev.get("reason") or "the session ended")
            return
        s.publish(ev)

    async def end(self, s: ServerSession, reason: str) -> dict[str, Any]:
        """End a session once: close its peers and engine session, release its slot."""
        if s.ended:
            return {"id": s.id, "state": "ended", "reason": s.ended}
        s.ended = reason
        final = s.status()
        self.sessions.pop(s.id, None)
        # counted as it leaves the list, so /metrics never lags the session list while its engine closes
        self.metrics.sessions.set(len(self.sessions))
        self.metrics.sessions_ended.labels(_reason_label(reason)).inc()
        s.publish({"type": "ended", "reason": reason})
        for pc in list(s.peers):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), 5.0)
            with contextlib.suppress(Exception):
                pc.remove_all_listeners()
        try:
            await asyncio.get_running_loop().run_in_executor(None, s.live.close)
        except Exception as exc:  # the slot is released whatever happened
            log.warning("closing session %s: %s", s.id, exc)
        if s.unhold is not None:
            s.unhold()
        s.release()
        self.admission.release()
        log.info("session %s ended: %s", s.id, reason)
        final["state"] = "ended"
        final["reason"] = reason
        return final

    def _spawn_end(self, s: ServerSession, reason: str) -> None:
        task = asyncio.ensure_future(self.end(s, reason))
        self._ending.add(task)  # kept until done (the loop holds tasks weakly); shutdown waits for it
        task.add_done_callback(self._ending.discard)

    async def _watch(self) -> None:
        next_stats = time.monotonic()
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            stats = now >= next_stats
            if stats:
                next_stats = now + self.stats_interval_s
            self._tick(now, stats)  # a function of its own: no session stays referenced from this loop's frame

    def _tick(self, now: float, stats: bool) -> None:
        lim = self.limits
        for s in list(self.sessions.values()):
            reason = None
            if now - s.created > lim.max_session_s:
                reason = f"the session lifetime limit ({lim.max_session_s:g} s) was reached"
            elif not s.clients and s.ever_attached and now - s.last_client > lim.client_timeout_s:
                reason = f"the client went away (nothing attached for {lim.client_timeout_s:g} s)"
            elif not s.ever_attached and now - s.last_client > lim.attach_timeout_s:
                reason = f"no client attached within {lim.attach_timeout_s:g} s"
            if reason:
                self._spawn_end(s, reason)
        self._collect()
        if stats:
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
                        ("deleted", "deleted"), ("ended by the operator", "operator"),
                        ("shutdown", "shutdown")):
        if word in reason:
            return label
    return "error"

