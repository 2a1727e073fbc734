"""``avatar serve``: live avatar sessions over HTTP, WebSocket, WebRTC and RTMP.

A thin asyncio layer over the live-session Python API (see docs/serve.md):
:mod:`.live` is the one module that talks to the engine; :mod:`.app` holds the
routes, :mod:`.ws` the audio socket, :mod:`.sessions` lifetimes and events,
:mod:`.admission` the capacity, :mod:`.metrics` Prometheus. Needs the
``[serve]`` extra (aiohttp, aiortc, prometheus_client), imported lazily.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import click

from ..errors import AvatarError, MissingDependency
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


def serve(config: ServeConfig, *, ready: Any = None) -> int:
    """Run the server until SIGINT/SIGTERM; ``ready(url)`` is called once it listens.

    Returns the signal that stopped it. On that signal the server stops
    admitting, ends every session (``ended`` with reason ``shutdown`` on each
    socket, WebRTC peers closed, file outputs finished) within
    ``limits.shutdown_timeout_s`` and closes. A port that cannot be bound is an
    :class:`~avatar.errors.AvatarError` (one line), raised before anything is announced.
    """
    import asyncio

    require_extra()
    from .app import build_app, check_config

    check_config(config)
    service, capacity = start_service(config)
    try:
        app = build_app(config, service, capacity)
    except BaseException:
        service.close()
        raise
    return asyncio.run(_run(app, config, service, capacity, ready))


async def _run(app: Any, config: ServeConfig, service: Any, capacity: Capacity, ready: Any) -> int:
    import asyncio
    import signal

    from aiohttp import web

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals: list[int] = []

    def on_signal(signum: int) -> None:
        if not signals:
            log.info("avatar serve: %s: shutting down", signal.Signals(signum).name)
        signals.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    # the sessions' own shutdown is bounded by limits.shutdown_timeout_s; then aiohttp cuts what is left
    runner = web.AppRunner(app, handle_signals=False, access_log_class=_access_log_class(), shutdown_timeout=5.0)
    try:
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as exc:
            why = os.strerror(exc.errno) if exc.errno else str(exc)
            raise AvatarError(f"cannot listen on {config.host}:{config.port}: {why}") from None
        url = f"http://{'[' + config.host + ']' if ':' in config.host else config.host}:{config.port}/"
        click.echo(f"avatar serve: listening on {url} (avatars: {', '.join(service.avatars)}; backend "
                   f"{service.backend_name}; capacity {capacity.sessions} session(s), {capacity.source})", err=True)
        if ready is not None:
            ready(url)
        await stop.wait()
    finally:
        await runner.cleanup()  # on_shutdown ends the sessions while their sockets are open, on_cleanup closes the service
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return signals[0]


def _access_log_class() -> Any:
    from aiohttp.abc import AbstractAccessLogger

    class AccessLog(AbstractAccessLogger):
        """Method, path (never the query: it may carry a session token), status, time."""

        def log(self, request: Any, response: Any, time: float) -> None:
            self.logger.info('%s %s %s %.3fs', request.method, request.path, response.status, time)

    return AccessLog

