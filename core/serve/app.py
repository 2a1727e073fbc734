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
import re
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

#: a file output's name: ASCII letters, digits and a few marks, short enough for the hidden partial
#: file name the sink writes beside it (``.NAME.….partial.mp4``) on every file system
MAX_FILE_NAME = 128
_FILE_NAME_PUNCT = "._+-"
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,%d}" % (MAX_FILE_NAME - 1))


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
    _quiet_bad_requests()
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

    async def on_shutdown(app: Any) -> None:  # the sockets are still open: each gets its ``ended``
        await manager.shutdown(config.limits.shutdown_timeout_s)

    async def on_cleanup(app: Any) -> None:
        await manager.stop()
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
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
        except web.HTTPRequestEntityTooLarge:
            limit = request.app["api"].config.limits.max_body_bytes
            return _error(413, "too_large", f"the request body is larger than the limit ({limit} bytes)")
        except AvatarError as exc:
            return _error(400, type(exc).__name__, str(exc))
        except web.RequestPayloadError as exc:  # a body that breaks off or does not decompress (Content-Encoding)
            return _error(400, "bad_body", f"the request body could not be read: {_one_line(exc)}")
        except web.HTTPException as exc:  # aiohttp's own answers (no such route, no WebSocket upgrade ...): JSON too
            if exc.status < 400:
                raise
            allow = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), _one_line(exc.text or exc.reason), allow)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a bug: one line in the log (the traceback at debug level), a JSON 500
            log.error("%s %s failed: %s: %s", request.method, request.path, type(exc).__name__, exc)
            log.debug("traceback", exc_info=True)
            return _error(500, "internal", "the server failed on this request; see its log")

    return errors


def _one_line(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 200 else text[:197] + "..."


class _BadRequestLine(logging.Filter):
    """aiohttp logs a request its HTTP parser refuses (a header over its size limit, a broken chunk or
    compressed body, ...) with a traceback at error level; that is the client's fault: one line at info level."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp import web
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            # the parser's message without the bytes it quotes (they could be a header's value)
            why = re.split(r":? (?:b'|b\"|bytearray\()", _one_line(exc))[0]
            record.msg, record.args = "refused a malformed request: %s", (why,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def _quiet_bad_requests() -> None:
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, _BadRequestLine) for f in server_log.filters):
        server_log.addFilter(_BadRequestLine())


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

    def _session(self, request: Any, *, query_token: bool = False, operator: bool = False) -> ServerSession:
        """The session of the route, if the request has its token (``?token=`` only where ``query_token``:
        the audio socket; the server's token too where ``operator``)."""
        s = self.manager.get(request.match_info["id"])
        given = _bearer(request)
        if given is None and query_token:
            given = request.query.get("token")
        if s is None:
            # the same answer for a wrong id and a wrong token would hide typos; ids are not secrets
            raise HttpError(404, "no_session", f"no session {request.match_info['id'][:64]!r} (ended or never opened)")
        ok = _token_matches(given, s.token) or (
            operator and self.config.token is not None and _token_matches(given, self.config.token))
        if not ok:
            where = ", or ?token=TOKEN on this socket" if query_token else ""
            raise HttpError(401, "unauthorized", "this route needs the session's token (from POST /v1/sessions): "
                            f"Authorization: Bearer TOKEN{where}")
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
            "status": "draining" if adm.draining else "ok",
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
        sched = self.service.scheduler_health()
        if sched:
            self.metrics.scheduler_restarts.set(sum(x["restarts"] for x in sched["schedulers"])
                                                + sched["replaced_schedulers"])
            self.metrics.schedulers_dead.set(sum(not x["alive"] for x in sched["schedulers"]))
        body, ctype = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": ctype})

    async def create(self, request: Any) -> Any:
        from aiohttp import web

        self._server_auth(request)
        body = await _json_body(request, self.config.limits.max_json_bytes)
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
                crf = o.get("crf", 20)
                if isinstance(crf, bool) or not isinstance(crf, (int, float)) or not 0 <= crf <= 51:
                    raise HttpError(400, "bad_request", "a file output's crf is a number from 0 (lossless) to 51 "
                                    f"(smallest), not {crf!r:.40}")
                sinks.append(pm.sink("file", path=str(path), crf=crf))
                shown.append({"type": "file", "path": str(path.name), **({"crf": crf} if "crf" in o else {})})
            else:
                raise HttpError(400, "bad_request", f"unknown output type {kind!r}; use webrtc, rtmp or file")
        return sinks, webrtc, shown

    def _file_path(self, name: Any) -> Path:
        root = self.config.output_dir
        if root is None:
            raise HttpError(400, "file_output_disabled", "file outputs are off; start the server with --output-dir DIR")
        if not isinstance(name, str) or not _FILE_NAME.fullmatch(name):
            raise HttpError(400, "bad_request", "a file output's path is a plain file name inside the server's "
                            f"--output-dir (no folders): letters, digits and {_FILE_NAME_PUNCT} only, not starting "
                            f"with one of those, at most {MAX_FILE_NAME} characters")
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

        s = self._session(request, operator=True)
        operator = self.config.token is not None and _token_matches(_bearer(request), self.config.token)
        reason = "ended by the operator" if operator else "deleted by the client"
        return web.json_response(await self.manager.end(s, reason))

    async def audio(self, request: Any) -> Any:
        from .ws import audio_socket

        s = self._session(request, query_token=True)
        lim = self.config.limits
        if s.sockets >= lim.max_sockets_per_session:
            raise HttpError(429, "too_many_sockets", f"this session has {s.sockets} audio sockets open, the most "
                            f"it may (--max-sockets-per-session {lim.max_sockets_per_session}); close one first")
        s.sockets += 1  # counted before the handshake's first await; audio_socket uncounts it
        return await audio_socket(request, s, lim, self.manager.socket_tasks)

    async def speak(self, request: Any) -> Any:
        from aiohttp import web

        s = self._session(request)
        lim = self.config.limits
        if s.uploading:
            raise HttpError(409, "busy", "this session is already taking a /speak upload; send one at a time")
        s.uploading = True
        try:
            with tempfile.NamedTemporaryFile(suffix=".audio") as f:
                await _body_to_file(request, f, lim.max_body_bytes)
                room = s.room_s(lim.max_ahead_s)
                pcm = await asyncio.get_running_loop().run_in_executor(None, _decode_at_most, f.name, room)
        finally:
            s.uploading = False
        if pcm is None:
            raise HttpError(413, "too_long", f"the audio is longer than the session takes now ({max(0.0, room):.1f} s: "
                            f"at most {lim.max_ahead_s:g} s may wait to be shown)")
        seconds = len(pcm) / SPEAK_RATE
        too_much = s.take_audio(seconds, lim.max_ahead_s)
        if too_much:
            raise HttpError(413, "too_long", too_much)
        s.live.push(pcm, SPEAK_RATE)
        s.live.flush()
        return web.json_response({"duration_s": round(seconds, 3)})

    async def webrtc(self, request: Any) -> Any:
        from aiohttp import web

        s = self._session(request)
        if s.webrtc is None:
            raise HttpError(409, "no_webrtc_output", 'this session has no webrtc output; open it with outputs '
                            '[{"type": "webrtc"}]')
        body = await _json_body(request, self.config.limits.max_json_bytes)
        if body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
            raise HttpError(400, "bad_request", 'send the browser\'s offer: {"type": "offer", "sdp": "v=0..."}')
        limit = self.config.limits.max_peers_per_session
        if len(s.peers) >= limit:
            raise HttpError(429, "too_many_peers", f"this session has {len(s.peers)} WebRTC peers, the most it may "
                            f"(--max-peers-per-session {limit}); close one first")
        from .webrtc import answer

        return web.json_response(await answer(s, body["sdp"], self.ice))


#: the rate /speak decodes to
SPEAK_RATE = 16000


async def _body_to_file(request: Any, f: Any, limit: int) -> None:
    """Stream the request body into ``f`` (however it arrives: chunked or not), refusing more than ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise HttpError(413, "too_large", f"the request body is larger than the limit ({limit} bytes)")
    size = 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise HttpError(413, "too_large", f"the request body is larger than the limit ({limit} bytes)")
        f.write(chunk)
    if not size:
        raise HttpError(400, "bad_request", "send the audio file as the request body")
    f.flush()


def _decode_at_most(path: str, seconds: float) -> Any:
    """Decode (streaming, mono at :data:`SPEAK_RATE`) at most ``seconds`` of the file; None when it is longer."""
    import numpy as np

    from ..audio import iter_audio_chunks

    limit = int(seconds * SPEAK_RATE)
    parts, total = [], 0
    chunks = iter_audio_chunks(path, SPEAK_RATE // 4, SPEAK_RATE)
    try:
        for part in chunks:
            total += len(part)
            if total > limit:
                return None  # stop decoding: the rest is never held
            parts.append(part)
    finally:
        chunks.close()
    return np.concatenate(parts)


async def _json_body(request: Any, limit: int) -> dict[str, Any]:
    """The body as a JSON object: read whole however it arrives (aiohttp's reader, with ``limit`` as its size
    limit, chunked bodies included)."""
    from aiohttp import web

    try:
        raw = await request.clone(client_max_size=limit).read()
    except web.HTTPRequestEntityTooLarge:
        raise HttpError(413, "too_large", f"JSON bodies are at most {limit} bytes") from None
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:
        raise HttpError(400, "malformed_json", "the body is nested too deeply") from None
    except ValueError as exc:
        raise HttpError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise HttpError(400, "malformed_json", "the body must be a JSON object")
    return body


def _bearer(request: Any) -> str | None:
    h = request.headers.get("Authorization", "")
    return h[7:].strip() if h[:7].lower() == "bearer " else None


def _token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison; a header that is not valid UTF-8 (or not a string) matches nothing."""
    if not isinstance(given, str):
        return False
    try:
        raw = given.encode()
    except UnicodeError:
        return False
    return hmac.compare_digest(raw, expected.encode())


def check_config(config: ServeConfig) -> None:
    if config.batch < 1:
        raise ConfigError("--batch must be at least 1")
    if config.max_sessions is not None and config.max_sessions < 1:
        raise ConfigError("--max-sessions must be at least 1")
