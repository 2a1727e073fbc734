"""``avatar serve``: live avatar sessions over HTTP, WebSocket, WebRTC and RTMP.

A thin asyncio layer over the live-session Python API (see docs/serve.md):
:mod:`.live` is the one module that talks to the engine; :mod:`.app` holds the
routes, :mod:`.ws` the audio socket, :mod:`.sessions` lifetimes and events,
:mod:`.admission` the capacity, :mod:`.metrics` Prometheus. Needs the
``[serve]`` extra (aiohttp, aiortc, prometheus_client), imported lazily.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from ..errors import MissingDependency
from .admission import Capacity
from .config import AvatarSpec, Limits, ServeConfig, resolve_token

__all__ = ["AvatarSpec", "Limits", "ServeConfig", "require_extra", "resolve_token", "serve", "start_service"]

log = logging.getLogger(__name__)


def require_extra() -> None:
    """One clear error when the ``[serve]`` extra is missing."""
    import importlib.util

    for module, package in (("aiohttp", "aiohttp"), ("aiortc", "aiortc"), ("prometheus_client", "prometheus-client")):
        if importlib.util.find_spec(module) is None:
            raise MissingDependency(package, "serve", feature="avatar serve")


def start_service(config: ServeConfig) -> tuple[Any, Capacity]:
    """Load avatars and models once, warm the backend, and decide the capacity."""
    from .live import LiveService

    service = LiveService(config.avatars, backend=config.backend, batch=config.batch, threads=config.threads)
    service.start()
    try:
        if config.max_sessions is not None:
            capacity = Capacity(config.max_sessions, "configured", service.throughput_fps,
                                float(service.fps(service.avatars[0])))
        else:
            fps = max(float(service.fps(a)) for a in service.avatars)
            capacity = service.capacity(fps)  # end to end: backend bound and each session's CPU work
    except BaseException:
        service.close()
        raise
    return service, capacity


def serve(config: ServeConfig, *, ready: Any = None) -> None:
    """Run the server until SIGINT/SIGTERM; ``ready(url)`` is called once it listens."""
    require_extra()
    from aiohttp import web

    from .app import build_app, check_config

    check_config(config)
    service, capacity = start_service(config)
    app = build_app(config, service, capacity)
    url = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}/"

    async def announce(app: Any) -> None:
        msg = (f"avatar serve: listening on {url} (avatars: {', '.join(service.avatars)}; backend "
               f"{service.backend_name}; capacity {capacity.sessions} session(s), {capacity.source})")
        click.echo(msg, err=True)  # the one line an operator waits for, whatever the log level
        if ready is not None:
            ready(url)

    app.on_startup.append(announce)
    web.run_app(app, host=config.host, port=config.port, print=None, access_log_class=_access_log_class(),
                handle_signals=True, shutdown_timeout=10.0)


def _access_log_class() -> Any:
    from aiohttp.abc import AbstractAccessLogger

    class AccessLog(AbstractAccessLogger):
        """Method, path (never the query: it may carry a session token), status, time."""

        def log(self, request: Any, response: Any, time: float) -> None:
            self.logger.info('%s %s %s %.3fs', request.method, request.path, response.status, time)

    return AccessLog

