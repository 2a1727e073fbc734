"""The HTTP API of ``avatar serve`` (aiohttp): routes, tokens, limits, errors.

Every route is documented in docs/serve.md. Errors are JSON
``{"error": {"code": ..., "message": ...}}`` with the HTTP status that says
what kind: 400 bad input, 401 missing or wrong token, 404 unknown session,
413 too large, 503 at capacity. Nothing the server writes (responses, logs,
metrics) contains a token or an RTMP stream key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import AvatarError, ConfigError
from .admission import Admission, Capacity, Refused
from .config import ServeConfig, parse_ice_server
from .live import LiveService
from .metrics import ServerMetrics
from .sessions import ServerSession, SessionManager

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 1024


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def build_app(config: ServeConfig, service: LiveService, capacity: Capacity) -> Any:
    """The aiohttp application (the service is started; the app owns it from here)."""
    from aiohttp import web

    metrics = ServerMetrics()
    metrics.capacity.set(capacity.sessions)
    manager = SessionManager(service, Admission(capacity), metrics, config.limits, config.stats_interval_s)
    ice = [parse_ice_server(s) for s in config.ice_servers]
    api = _Api(config, service, manager, metrics, ice)
    app = web.Application(client_max_size=config.limits.max_body_bytes, middlewares=[_middleware()])
    app["api"] = api
    r = app.router
    r.add_get("/", api.page)
    r.add_get("/health", api.health)
    r.add_get("/metrics", api.metrics_text)
    r.add_post("/v1/sessions", api.create)
    r.add_get("/v1/sessions", api.list)
    r.add_get("/v1/sessions/{id}", api.get)
    r.add_delete("/v1/sessions/{id}", api.delete)
    r.add_post("/v1/sessions/{id}/webrtc", api.webrtc)
    r.add_get("/v1/sessions/{id}/audio", api.audio)
    r.add_post("/v1/sessions/{id}/speak", api.speak)

    async def on_startup(app: Any) -> None:
        await manager.start()

    async def on_cleanup(app: Any) -> None:
        await manager.stop()
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def _middleware() -> Any:
    from aiohttp import web

    @web.middleware
    async def errors(request: Any, handler: Any) -> Any:
        try:
            return await handler(request)
        except HttpError as exc:
            return _error(exc.status, exc.code, exc.message)
        except Refused as exc:
            request.app["api"].metrics.sessions_refused.labels("capacity").inc()
            return _error(503, "at_capacity", exc.reason, headers={"Retry-After": "5"})
        except web.HTTPRequestEntityTooLarge as exc:
            return _error(413, "too_large", f"the request body is larger than the limit ({exc.max_size} bytes)")
        except AvatarError as exc:
            return _error(400, type(exc).__name__, str(exc))

    return errors


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Any:
    from aiohttp import web

    return web.json_response({"error": {"code": code, "message": message}}, status=status, headers=headers)


class _Api:
    def __init__(self, config: ServeConfig, service: LiveService, manager: SessionManager,
                 metrics: ServerMetrics, ice: list[dict[str, str]]) -> None:
        self.config = config
        self.service = service
        self.manager = manager
        self.metrics = metrics
        self.ice = ice
        self.started = time.time()

    # -- auth ---------------------------------------------------------------------

    def _server_auth(self, request: Any) -> None:
        if self.config.token is None:
            return
        if not _token_matches(_bearer(request), self.config.token):
            raise HttpError(401, "unauthorized", "this server needs its bearer token: Authorization: Bearer TOKEN")

    def _session(self, request: Any) -> ServerSession:
        s = self.manager.get(request.match_info["id"])
        given = _bearer(request) or request.query.get("token")
        if s is None:
            # the same answer for a wrong id and a wrong token would hide typos; ids are not secrets
            raise HttpError(404, "no_session", f"no session {request.match_info['id']!r} (ended or never opened)")
        if not _token_matches(given, s.token):
            raise HttpError(401, "unauthorized", "this route needs the session's token (from POST /v1/sessions): "
                            "Authorization: Bearer TOKEN, or ?token=TOKEN on the audio socket")
        s.touch()
        return s

    # -- routes ---------------------------------------------------------------------

    async def page(self, request: Any) -> Any:
        from importlib.resources import files

        from aiohttp import web

        html = files("avatar.serve").joinpath("page.html").read_text(encoding="utf-8")
        return web.Response(text=html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def health(self, request: Any) -> Any:
        from aiohttp import web

        adm = self.manager.admission
        return web.json_response({
            "status": "ok",
            "sessions": len(self.manager.sessions),
            "capacity": adm.capacity.to_dict(),
            "engine": self.service.engine_health(adm.capacity.fps),
            "avatars": [{"name": a, "fps": float(self.service.fps(a))} for a in self.service.avatars],
            "backend": self.service.backend_name,
            "auth": self.config.token is not None,
            "uptime_s": round(time.time() - self.started, 1),
        })

    async def metrics_text(self, request: Any) -> Any:
        from aiohttp import web

        self._server_auth(request)
        body, ctype = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def create(self, request: Any) -> Any:
        from aiohttp import web

        self._server_auth(request)
        body = await _json_body(request)
        avatar = body.get("avatar") or (self.service.avatars[0] if len(self.service.avatars) == 1 else None)
        if not isinstance(avatar, str) or avatar not in self.service.avatars:
            raise HttpError(400, "unknown_avatar", f"unknown avatar {avatar!r}; this server has "
                            f"{', '.join(self.service.avatars)}")
        features = body.get("features")
        if features is not None and not isinstance(features, str):
            raise HttpError(400, "bad_request", "features must be a feature source name (a string)")
        sinks, webrtc, shown = self._outputs(body.get("outputs", [{"type": "webrtc"}]))
        s = await self.manager.open(avatar, sinks, features=features, idle=body.get("idle"), webrtc=webrtc,
                                    outputs=shown)
        return web.json_response({"id": s.id, "token": s.token, "avatar": avatar, "fps": float(s.live.fps),
                                  "outputs": shown, "ice_servers": [{"urls": d["urls"]} for d in self.ice]},
                                 status=201)

    def _outputs(self, outputs: Any) -> tuple[list[Any], Any, list[dict[str, Any]]]:
        from ..plugins import get_plugin_manager

        if not isinstance(outputs, list) or len(outputs) > 4:
            raise HttpError(400, "bad_request", "outputs must be a list of at most 4 objects")
        pm = get_plugin_manager()
        sinks: list[Any] = []
        shown: list[dict[str, Any]] = []
        webrtc = None
        for o in outputs:
            kind = o.get("type") if isinstance(o, dict) else None
            if kind == "webrtc":
                if webrtc is not None:
                    raise HttpError(400, "bad_request", "one webrtc output per session")
                webrtc = pm.sink("webrtc")
                sinks.append(webrtc)
                shown.append({"type": "webrtc"})
            elif kind == "rtmp":
                url = o.get("url")
                if not isinstance(url, str):
                    raise HttpError(400, "bad_request", 'an rtmp output needs "url": "rtmp://host/app/KEY"')
                sink = pm.sink("rtmp", url=url)
                sinks.append(sink)
                # the sink's own redacted form: the stream key never leaves the server
                shown.append({"type": "rtmp", "url": sink.safe_url})
            elif kind == "file":
                path = self._file_path(o.get("path"))
                sinks.append(pm.sink("file", path=str(path)))
                shown.append({"type": "file", "path": str(path.name)})
            else:
                raise HttpError(400, "bad_request", f"unknown output type {kind!r}; use webrtc, rtmp or file")
        return sinks, webrtc, shown

    def _file_path(self, name: Any) -> Path:
        root = self.config.output_dir
        if root is None:
            raise HttpError(400, "file_output_disabled", "file outputs are off; start the server with --output-dir DIR")
        if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
            raise HttpError(400, "bad_request", "a file output's path is a plain file name inside the server's "
                            "--output-dir (no folders)")
        return Path(root) / name

    async def list(self, request: Any) -> Any:
        from aiohttp import web

        self._server_auth(request)
        return web.json_response({"sessions": [s.status() for s in self.manager.sessions.values()]})

    async def get(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response(self._session(request).status())

    async def delete(self, request: Any) -> Any:
        from aiohttp import web

        s = self._session(request)
        return web.json_response(await self.manager.end(s, "deleted by the client"))

    async def audio(self, request: Any) -> Any:
        from .ws import audio_socket

        s = self._session(request)
        return await audio_socket(request, s, self.config.limits)

    async def speak(self, request: Any) -> Any:
        from aiohttp import web

        from ..audio import load_audio
        from .ws import check_pace

        s = self._session(request)
        data = await request.read()
        if not data:
            raise HttpError(400, "bad_request", "send the audio file as the request body")

        def decode() -> Any:
            with tempfile.NamedTemporaryFile(suffix=".audio") as f:
                f.write(data)
                f.flush()
                return load_audio(f.name, 16000)

        pcm = await asyncio.get_running_loop().run_in_executor(None, decode)
        seconds = len(pcm) / 16000
        errors: list[str] = []
        if not check_pace(s, seconds, self.config.limits, errors.append):
            raise HttpError(413, "too_long", errors[0])
        s.live.push(pcm, 16000)
        s.live.flush()
        return web.json_response({"duration_s": round(seconds, 3)})

    async def webrtc(self, request: Any) -> Any:
        from aiohttp import web

        s = self._session(request)
        if s.webrtc is None:
            raise HttpError(409, "no_webrtc_output", 'this session has no webrtc output; open it with outputs '
                            '[{"type": "webrtc"}]')
        body = await _json_body(request)
        if body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
            raise HttpError(400, "bad_request", 'send the browser\'s offer: {"type": "offer", "sdp": "v=0..."}')
        answer = await _answer(s, body["sdp"], self.ice)
        return web.json_response(answer)


async def _answer(s: ServerSession, sdp: str, ice: list[dict[str, str]]) -> dict[str, str]:
    """Make a peer connection with the session's two tracks and answer the offer."""
    from aiortc import (
        RTCConfiguration,
        RTCIceServer,
        RTCPeerConnection,
        RTCSessionDescription,
    )

    pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**d) for d in ice]) if ice else None)
    key = object()
    s.peers.add(pc)

    @pc.on("connectionstatechange")
    async def on_state() -> None:
        state = pc.connectionState
        if state == "connected":
            s.attach(key)
        elif state in ("failed", "closed", "disconnected"):
            s.detach(key)
            if state != "disconnected":
                s.peers.discard(pc)
                await pc.close()

    try:
        video, audio = s.webrtc.attach(asyncio.get_running_loop())
        pc.addTrack(video)
        pc.addTrack(audio)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        await pc.setLocalDescription(await pc.createAnswer())
    except (ValueError, RuntimeError, AttributeError) as exc:
        s.peers.discard(pc)
        await pc.close()
        raise HttpError(400, "bad_offer", f"the SDP offer was not accepted: {exc}") from None
    return {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp}


async def _json_body(request: Any) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_JSON_BYTES:
        raise HttpError(413, "too_large", f"JSON bodies are at most {MAX_JSON_BYTES} bytes")
    raw = await request.content.read(MAX_JSON_BYTES + 1)
    if len(raw) > MAX_JSON_BYTES:
        raise HttpError(413, "too_large", f"JSON bodies are at most {MAX_JSON_BYTES} bytes")
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise HttpError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "malformed_json", "the body must be a JSON object")
    return body


def _bearer(request: Any) -> str | None:
    h = request.headers.get("Authorization", "")
    return h[7:].strip() if h[:7].lower() == "bearer " else None


def _token_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def check_config(config: ServeConfig) -> None:
    if config.batch < 1:
        raise ConfigError("--batch must be at least 1")
    if config.max_sessions is not None and config.max_sessions < 1:
        raise ConfigError("--max-sessions must be at least 1")
