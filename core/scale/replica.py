"""One replica of the live service: the unchanged ``avatar serve`` app on this node.

:class:`ReplicaServer` builds the app with :func:`avatar.serve.start_service` and
:func:`avatar.serve.app.build_app` (the same code as the single-machine server:
routes, audio socket, WebRTC peers, outputs, admission, metrics) and runs it on
its own event loop in a thread, so a Ray actor can hold it. WebRTC peers are
made here, so media flows between the client and this node.

:func:`replica_load` is the one place that reads a replica's sessions and
capacity; the placement, the autoscaling and ``/health`` all go through it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..serve.config import ServeConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaLoad:
    sessions: int
    #: sessions the replica admits (the engine's capacity figure)
    capacity: int
    draining: bool
    session_ids: tuple[str, ...]

    @property
    def free(self) -> int:
        return 0 if self.draining else max(0, self.capacity - self.sessions)


def replica_load(api: Any) -> ReplicaLoad:
    """Sessions and capacity of one served app (``app["api"]`` of :func:`avatar.serve.app.build_app`).

    Capacity is the server's admission figure (measured from the backend at start,
    or ``--max-sessions``); switch here when the engine reports another one.
    """
    m = api.manager
    return ReplicaLoad(len(m.sessions), int(m.admission.capacity.sessions), bool(m.admission.draining),
                       tuple(sorted(m.sessions)))


class AppThread:
    """An aiohttp app served on ``host:port`` (0: any free port) by its own event loop in a thread."""

    def __init__(self, app: Any, host: str, port: int, *, name: str = "avatar-http") -> None:
        self.app = app
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        self._runner: Any = None
        try:
            self.port = self.call(self._start(host, port), 120.0)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def call(self, coro: Any, timeout: float | None = None) -> Any:
        """Run a coroutine on the app's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self, host: str, port: int) -> int:
        from aiohttp import web

        from ..serve import _access_log_class

        self._runner = web.AppRunner(self.app, access_log_class=_access_log_class(), handle_signals=False,
                                     shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        return int(self._runner.addresses[0][1])

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self._runner is not None

    def stop(self) -> None:
        """The app's cleanup (sessions end, the engine closes), then the loop stops."""
        if self._runner is not None:
            try:
                self.call(self._runner.cleanup(), 60.0)
            except Exception as exc:  # the loop is stopped whatever happened
                log.warning("stopping the HTTP server: %s", exc)
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10.0)


class ReplicaServer:
    """The ``avatar serve`` app on ``config.host:config.port`` (0: any free port), in a thread."""

    def __init__(self, config: ServeConfig) -> None:
        from ..serve import require_extra, start_service
        from ..serve.app import build_app, check_config

        require_extra()
        check_config(config)
        service, capacity = start_service(config)
        try:
            app = build_app(config, service, capacity)
        except BaseException:
            service.close()
            raise
        self.api = app["api"]
        self.http = AppThread(app, config.host, config.port, name="avatar-replica-http")
        self.url = self.http.url

    @property
    def alive(self) -> bool:
        return self.http.alive

    def load(self) -> ReplicaLoad:
        return replica_load(self.api)

    def drain(self, deadline_s: float, reason: str) -> int:
        """Take no new session; wait up to ``deadline_s`` for the open ones to end, then end them.

        Returns how many sessions were ended at the deadline.
        """
        self.api.manager.admission.drain("this replica is draining (being removed)")
        end = time.monotonic() + deadline_s
        while self.load().sessions and time.monotonic() < end:
            time.sleep(0.2)
        left = list(self.api.manager.sessions.values())
        if left:
            async def end_all() -> None:
                await asyncio.gather(*(self.api.manager.end(s, reason) for s in left))

            self.http.call(end_all(), 30.0)
        return len(left)

    def stop(self) -> None:
        self.http.stop()
