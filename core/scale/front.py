"""The front door of ``avatar serve --ray``: one address for the whole cluster.

It keeps the single-machine API (docs/serve.md): ``POST /v1/sessions`` places a
new session on the replica with the most free capacity (as each replica reports
it through the registry, plus the sessions placed since its last report) and
forwards the request there; every later request of the session (``GET``,
``DELETE``, ``/speak``, ``/webrtc``) is forwarded to that replica, and its audio
socket is relayed both ways. The WebRTC answer comes from the replica, with the
replica node's ICE candidates, so media flows between the client and that node
directly; the front door carries only JSON and the PCM audio.

A replica that dies (its actor or node is gone) ends its sessions: each open
audio socket gets ``{"type": "ended", "reason": "...died..."}`` and closes, and a
later request on the session answers 404 with that reason. New sessions go to
the survivors. ``/health`` and ``/metrics`` show every replica's sessions and capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ..serve.app import HttpError, _bearer, _error, _json_body, _middleware, _quiet_bad_requests, _token_matches
from ..serve.config import ServeConfig
from .options import ScaleOptions

log = logging.getLogger(__name__)

#: the front door remembers this many ended sessions (for the reason on a later request)
ENDED_KEPT = 1000


@dataclass
class Replica:
    id: str
    url: str = ""
    node_ip: str = ""
    sessions: int = 0
    capacity: int = 0
    draining: bool = False
    session_ids: tuple[str, ...] = ()
    age_s: float = 0.0
    handle: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    dead: str | None = None

    def free(self, routed: int) -> int:
        if self.draining or self.dead:
            return 0
        return max(0, self.capacity - max(self.sessions, routed))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "node": self.node_ip, "sessions": self.sessions, "capacity": self.capacity,
                "state": "dead" if self.dead else "draining" if self.draining else "ok"}


@dataclass
class Route:
    sid: str
    replica: str
    created: float = field(default_factory=time.monotonic)
    #: open audio sockets relayed for this session: client socket → whether "ended" was sent
    sockets: dict[Any, bool] = field(default_factory=dict)


class FrontMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        r = self.registry = CollectorRegistry()
        self.sessions = Gauge("avatar_sessions", "Live sessions open on all replicas", registry=r)
        self.capacity = Gauge("avatar_capacity_sessions", "Sessions all live replicas admit", registry=r)
        self.replicas = Gauge("avatar_replicas", "Live replicas", registry=r)
        self.replica_sessions = Gauge("avatar_replica_sessions", "Sessions open on a replica", ["replica"], registry=r)
        self.replica_capacity = Gauge("avatar_replica_capacity_sessions", "Sessions a replica admits", ["replica"],
                                      registry=r)
        self.opened = Counter("avatar_sessions_opened", "Sessions placed", registry=r)
        self.refused = Counter("avatar_sessions_refused", "Sessions refused", ["reason"], registry=r)
        self.ended = Counter("avatar_sessions_ended_by_front", "Sessions the front door ended", ["reason"], registry=r)


class FrontDoor:
    def __init__(self, config: ServeConfig, scale: ScaleOptions, registry: Any) -> None:
        self.config = config
        self.scale = scale
        self.registry = registry
        self.replicas: dict[str, Replica] = {}
        self.routes: dict[str, Route] = {}
        self.ended: OrderedDict[str, str] = OrderedDict()
        self.metrics = FrontMetrics()
        self.started = time.time()
        self.client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._checking: dict[str, asyncio.Task[bool]] = {}
        self.poll_s = min(0.5, scale.beat_s)

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, app: Any = None) -> None:
        import aiohttp

        self.client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5.0))
        await self.refresh()
        self._task = asyncio.create_task(self._monitor(), name="avatar-front-monitor")

    async def stop(self, app: Any = None) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for t in self._checking.values():
            t.cancel()
        for rt in list(self.routes.values()):
            await self._end_route(rt, "the server is shutting down")
        if self.client is not None:
            await self.client.close()

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.refresh()
            except Exception as exc:  # the registry restarts; keep the last view meanwhile
                log.warning("front door: reading the registry failed: %s", exc)

    async def refresh(self) -> None:
        """Read every replica's report; check silent ones for death; end a dead one's sessions."""
        snap = await _ray(self.registry.snapshot.remote(), 10.0)
        seen = set()
        for info in snap:
            rid = info["id"]
            seen.add(rid)
            r = self.replicas.get(rid)
            if r is None:
                r = self.replicas[rid] = Replica(rid)
                log.info("replica %s joined (%s)", rid, info.get("url"))
            if r.dead:
                continue
            r.url, r.node_ip, r.handle, r.info = info["url"], info.get("node_ip", ""), info.get("handle"), info
            r.sessions, r.capacity = int(info["sessions"]), int(info["capacity"])
            r.draining, r.age_s = bool(info.get("draining")), float(info["age_s"])
            r.session_ids = tuple(info.get("session_ids", ()))
            if r.age_s > self.scale.dead_after_s:
                self.check(rid)
            else:
                self._reconcile(r, r.age_s)
        for rid, r in list(self.replicas.items()):
            if rid not in seen and not r.dead:
                # it left the registry: drained and stopped, or the registry lost it (check)
                if any(rt.replica == rid for rt in self.routes.values()):
                    self.check(rid)
                else:
                    self._drop(rid)
        self._gauges()

    def _reconcile(self, r: Replica, age_s: float) -> None:
        """Forget routes of sessions that ended on the replica (placed before its last report); adopt
        sessions the front door does not know (it restarted while they went on)."""
        live = set(r.session_ids)
        for sid in live:
            if sid not in self.routes and sid not in self.ended:
                self.routes[sid] = Route(sid, r.id)
        for rt in list(self.routes.values()):
            if rt.replica == r.id and rt.sid not in live and time.monotonic() - rt.created > age_s + 1.0:
                self._forget(rt, "ended on its replica")

    def check(self, rid: str) -> "asyncio.Task[bool]":
        """Find out (once at a time) whether a replica's actor is dead; if so, end its sessions."""
        t = self._checking.get(rid)
        if t is None or t.done():
            t = self._checking[rid] = asyncio.create_task(self._check(rid))
        return t

    async def _check(self, rid: str) -> bool:
        from ray.exceptions import RayActorError

        r = self.replicas.get(rid)
        if r is None or r.dead:
            return r is not None
        deadline = time.monotonic() + 15.0
        why = None
        while time.monotonic() < deadline:
            try:
                await _ray(r.handle.__ray_ready__.remote(), 2.0)
                return False  # alive (busy or unreachable over HTTP: not our call to end it)
            except RayActorError as exc:
                why = "node" if "node" in str(exc).lower() and "died" in str(exc).lower() else "actor"
                break
            except asyncio.TimeoutError:
                continue
        else:
            why = "unresponsive"
        await self._replica_died(r, why)
        return True

    async def _replica_died(self, r: Replica, why: str) -> None:
        what = {"node": "its node was lost", "actor": "its process died",
                "unresponsive": "it stopped answering"}.get(why, why)
        r.dead = f"the replica serving this session ({r.id} on {r.node_ip or 'an unknown node'}) died: {what}"
        log.warning("replica %s died (%s); ending its sessions", r.id, what)
        with contextlib.suppress(Exception):
            self.registry.forget.remote(r.id)
        for rt in [rt for rt in self.routes.values() if rt.replica == r.id]:
            self.metrics.ended.labels("replica_died").inc()
            await self._end_route(rt, r.dead)
        self._drop(r.id)

    def _drop(self, rid: str) -> None:
        self.replicas.pop(rid, None)
        for g in (self.metrics.replica_sessions, self.metrics.replica_capacity):
            with contextlib.suppress(KeyError):
                g.remove(rid)
        self._gauges()

    def _gauges(self) -> None:
        live = [r for r in self.replicas.values() if not r.dead]
        self.metrics.replicas.set(len(live))
        self.metrics.sessions.set(sum(r.sessions for r in live))
        self.metrics.capacity.set(sum(r.capacity for r in live if not r.draining))
        for r in live:
            self.metrics.replica_sessions.labels(r.id).set(r.sessions)
            self.metrics.replica_capacity.labels(r.id).set(r.capacity)

    def _forget(self, rt: Route, reason: str) -> None:
        self.routes.pop(rt.sid, None)
        self.ended[rt.sid] = reason
        while len(self.ended) > ENDED_KEPT:
            self.ended.popitem(last=False)

    async def _end_route(self, rt: Route, reason: str) -> None:
        self._forget(rt, reason)
        for ws, sent in list(rt.sockets.items()):
            if not sent:
                rt.sockets[ws] = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.send_json({"type": "ended", "reason": reason}), 5.0)
                    await ws.close(code=1000, message=b"session ended")

    # -- placement -------------------------------------------------------------------

    def _routed(self, rid: str) -> int:
        return sum(1 for rt in self.routes.values() if rt.replica == rid)

    def candidates(self) -> list[Replica]:
        """Replicas with a free slot, the most free first (then the fewest sessions)."""
        scored = [(r.free(self._routed(r.id)), r) for r in self.replicas.values()]
        return [r for f, r in sorted(scored, key=lambda fr: (-fr[0], fr[1].sessions, fr[1].id)) if f > 0]

    def _server_auth(self, request: Any) -> None:
        if self.config.token is not None and not _token_matches(_bearer(request), self.config.token):
            raise HttpError(401, "unauthorized", "this server needs its bearer token: Authorization: Bearer TOKEN")

    def _route(self, request: Any) -> tuple[Route, Replica]:
        sid = request.match_info["id"]
        rt = self.routes.get(sid)
        if rt is None:
            if sid in self.ended:
                raise HttpError(404, "no_session", f"no session {sid!r}: it ended ({self.ended[sid]})")
            raise HttpError(404, "no_session", f"no session {sid!r} (ended or never opened)")
        r = self.replicas.get(rt.replica)
        if r is None or r.dead:
            raise HttpError(404, "no_session", f"no session {sid!r}: it ended ({r.dead if r else 'its replica is gone'})")
        return rt, r

    # -- routes ------------------------------------------------------------------------

    async def page(self, request: Any) -> Any:
        from importlib.resources import files

        from aiohttp import web

        html = files("avatar.serve").joinpath("page.html").read_text(encoding="utf-8")
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def health(self, request: Any) -> Any:
        from aiohttp import web

        live = [r for r in self.replicas.values() if not r.dead]
        first = live[0].info if live else {}
        return web.json_response({
            "status": "ok" if any(not r.draining for r in live) else "no_replica",
            "sessions": sum(r.sessions for r in live),
            "capacity": {"sessions": sum(r.capacity for r in live if not r.draining), "source": "replicas"},
            "replicas": [r.to_dict() for r in sorted(live, key=lambda r: r.id)],
            "avatars": first.get("avatars", []),
            "backend": first.get("backend", ""),
            "auth": self.config.token is not None,
            "uptime_s": round(time.time() - self.started, 1),
        })

    async def metrics_text(self, request: Any) -> Any:
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        self._server_auth(request)
        self._gauges()
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def create(self, request: Any) -> Any:
        from aiohttp import web

        self._server_auth(request)
        fields = await _json_body(request, self.config.limits.max_json_bytes)
        names = sorted({a["name"] for r in self.replicas.values() if not r.dead for a in r.info.get("avatars", [])})
        if names and fields.get("avatar") is not None and fields.get("avatar") not in names:
            # checked here too, so a bad request is a 400 even when every replica is full
            raise HttpError(400, "unknown_avatar", f"unknown avatar {fields.get('avatar')!r}; this server has "
                            f"{', '.join(names)}")
        body = json.dumps(fields).encode()
        for r in self.candidates():
            status, payload, headers = await self._send(r, "POST", "/v1/sessions", body, internal=True)
            if status == 201:
                data = json.loads(payload)
                self.routes[data["id"]] = Route(data["id"], r.id)
                self.metrics.opened.inc()
                log.info("session %s placed on replica %s (%s)", data["id"], r.id, r.node_ip)
                return web.json_response({**data, "replica": r.id}, status=201)
            if status in (502, 503):
                continue  # full, draining or gone since its last report: the next one
            return web.Response(body=payload, status=status, headers=headers)
        self.metrics.refused.labels("capacity").inc()
        live = [r for r in self.replicas.values() if not r.dead]
        if not live:
            raise _Refused("no replica is running yet (they load and warm their models first); try again shortly")
        cap = sum(r.capacity for r in live if not r.draining)
        raise _Refused(f"every replica is at capacity ({sum(r.sessions for r in live)} of {cap} sessions on "
                       f"{len(live)} replica(s)); try again when a session ends or a replica is added")

    async def list(self, request: Any) -> Any:
        from aiohttp import web

        self._server_auth(request)
        out: list[dict[str, Any]] = []
        for r in [r for r in self.replicas.values() if not r.dead]:
            status, payload, _ = await self._send(r, "GET", "/v1/sessions", None, internal=True)
            if status == 200:
                out.extend({**s, "replica": r.id} for s in json.loads(payload)["sessions"])
        return web.json_response({"sessions": out})

    async def forward(self, request: Any) -> Any:
        """GET/DELETE /v1/sessions/{id}, POST …/speak and …/webrtc: to the session's replica."""
        from aiohttp import web

        rt, r = self._route(request)
        body = await request.read() if request.body_exists else None
        status, payload, headers = await self._send(r, request.method, request.path, body, request=request)
        if status == 502:
            if await self.check(r.id):
                raise HttpError(404, "no_session", f"no session {rt.sid!r}: it ended ({r.dead})")
        if request.method == "DELETE" and status == 200:
            self._forget(rt, "deleted by the client")
        elif status == 404:
            self._forget(rt, "ended on its replica")
        return web.Response(body=payload, status=status, headers=headers)

    async def _send(self, r: Replica, method: str, path: str, body: bytes | None, *, internal: bool = False,
                    request: Any = None) -> tuple[int, bytes, dict[str, str]]:
        import aiohttp

        headers: dict[str, str] = {}
        if internal:
            headers["Authorization"] = f"Bearer {self.scale.internal_token}"
            headers["Content-Type"] = "application/json"
        elif request is not None:
            for h in ("Authorization", "Content-Type"):
                if h in request.headers:
                    headers[h] = request.headers[h]
        params = dict(request.query) if request is not None else None
        try:
            async with self.client.request(method, r.url + path, data=body, headers=headers, params=params,
                                           timeout=aiohttp.ClientTimeout(total=120.0, connect=5.0)) as resp:
                payload = await resp.read()
                out = {"Content-Type": resp.headers.get("Content-Type", "application/json")}
                if "Retry-After" in resp.headers:
                    out["Retry-After"] = resp.headers["Retry-After"]
                return resp.status, payload, out
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self.check(r.id)
            msg = json.dumps({"error": {"code": "replica_unreachable",
                                        "message": f"the replica {r.id} did not answer: {type(exc).__name__}"}})
            return 502, msg.encode(), {"Content-Type": "application/json"}

    async def audio(self, request: Any) -> Any:
        """Relay the session's audio socket to its replica (PCM in, events out), both ways."""
        import aiohttp
        from aiohttp import WSMsgType, web

        rt, r = self._route(request)
        lim = self.config.limits
        url = r.url.replace("http", "ws", 1) + request.path
        try:
            up = await self.client.ws_connect(url, params=dict(request.query), headers=_auth_header(request),
                                              max_msg_size=lim.max_message_bytes, heartbeat=lim.heartbeat_s)
        except aiohttp.WSServerHandshakeError as exc:
            code = {401: "unauthorized", 404: "no_session"}.get(exc.status, "bad_request")
            if exc.status == 404:
                self._forget(rt, "ended on its replica")
            return _error(exc.status, code, f"the session's replica refused the socket ({exc.status})")
        except (aiohttp.ClientError, asyncio.TimeoutError):
            if await self.check(r.id):
                raise HttpError(404, "no_session", f"no session {rt.sid!r}: it ended ({r.dead})") from None
            raise HttpError(502, "replica_unreachable", f"the replica {r.id} did not answer") from None
        ws = web.WebSocketResponse(heartbeat=lim.heartbeat_s, max_msg_size=lim.max_message_bytes)
        await ws.prepare(request)
        rt.sockets[ws] = False

        async def downstream() -> None:  # replica → client
            async for msg in up:
                if msg.type == WSMsgType.TEXT:
                    await ws.send_str(msg.data)
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        if json.loads(msg.data).get("type") == "ended":
                            rt.sockets[ws] = True
                elif msg.type == WSMsgType.BINARY:
                    await ws.send_bytes(msg.data)
            if not rt.sockets.get(ws, True):
                # the replica side closed without saying why: find out (died?) and tell the client
                dead = await self.check(r.id)
                if not rt.sockets.get(ws, True):
                    rt.sockets[ws] = True
                    reason = r.dead if dead and r.dead else "the connection to the session's replica was lost"
                    await ws.send_json({"type": "ended", "reason": reason})
            await ws.close(code=1000, message=b"session ended")

        down = asyncio.create_task(downstream())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await up.send_str(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await up.send_bytes(msg.data)
        except (ConnectionError, RuntimeError):
            pass  # the replica side closed under us: downstream() tells the client
        finally:
            if not down.done():
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(asyncio.shield(down), 0.5 if ws.closed else 20.0)
            down.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await down
            rt.sockets.pop(ws, None)
            await up.close()
            await ws.close()
        return ws


class _Refused(HttpError):
    def __init__(self, message: str) -> None:
        super().__init__(503, "at_capacity", message)


def _auth_header(request: Any) -> dict[str, str]:
    h = request.headers.get("Authorization")
    return {"Authorization": h} if h else {}


async def _ray(ref: Any, timeout: float) -> Any:
    return await asyncio.wait_for(asyncio.wrap_future(ref.future()), timeout)


def build_front_app(config: ServeConfig, scale: ScaleOptions, registry: Any) -> Any:
    """The front door's aiohttp app (same routes as ``avatar serve``)."""
    from aiohttp import web

    front = FrontDoor(config, scale, registry)
    _quiet_bad_requests()
    app = web.Application(client_max_size=config.limits.max_body_bytes, middlewares=[_middleware()])
    r = app.router
    r.add_get("/", front.page)
    r.add_get("/health", front.health)
    r.add_get("/metrics", front.metrics_text)
    r.add_post("/v1/sessions", front.create)
    r.add_get("/v1/sessions", front.list)
    r.add_get("/v1/sessions/{id}", front.forward)
    r.add_delete("/v1/sessions/{id}", front.forward)
    r.add_post("/v1/sessions/{id}/webrtc", front.forward)
    r.add_post("/v1/sessions/{id}/speak", front.forward)
    r.add_get("/v1/sessions/{id}/audio", front.audio)
    app.on_startup.append(front.start)
    app.on_cleanup.append(front.stop)
    return app
