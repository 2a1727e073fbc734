"""The Ray Serve deployment of the live replicas (imports Ray: load it only through :mod:`.deploy`).

One replica per GPU (``num_gpus`` = ``gpus_per_replica``) or, for CPU backends,
one per node (``max_replicas_per_node=1``). Each replica holds a
:class:`~.replica.ReplicaServer` (one ``AvatarService``: sessions, scheduler,
WebRTC peers, outputs), reports to the registry every ``beat_s``, gives Serve's
autoscaler its session count, and drains when Serve removes it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

import ray
from ray import serve

from ..serve.config import ServeConfig
from .options import ScaleOptions
from .registry import registry_handle
from .replica import ReplicaServer

log = logging.getLogger(__name__)


@serve.deployment(name="avatar-replica", health_check_period_s=2.0, health_check_timeout_s=30.0)
class AvatarReplica:
    def __init__(self, config: ServeConfig, scale: ScaleOptions) -> None:
        host = scale.replica_host or ray.util.get_node_ip_address()
        self.scale = scale
        self.server = ReplicaServer(dataclasses.replace(config, host=host, port=scale.replica_port,
                                                        token=scale.internal_token))
        self.id = serve.get_replica_context().replica_id.unique_id
        ctx = ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self._handle = ctx.current_actor
        self._registry = registry_handle(scale.registry_name)
        self._mode = "drain"
        self._stop = threading.Event()
        self._beat_once()
        self._beater = threading.Thread(target=self._beat, name="avatar-replica-beat", daemon=True)
        self._beater.start()
        log.info("replica %s serving on %s (node %s)", self.id, self.server.url, self.node_ip)

    def info(self) -> dict[str, Any]:
        load = self.server.load()
        api = self.server.api
        return {"url": self.server.url, "node_id": self.node_id, "node_ip": self.node_ip,
                "sessions": load.sessions, "capacity": load.capacity, "draining": load.draining,
                "session_ids": list(load.session_ids), "backend": api.service.backend_name,
                "avatars": [{"name": a, "fps": float(api.service.fps(a))} for a in api.service.avatars]}

    def _beat_once(self) -> None:
        self._mode = ray.get(self._registry.beat.remote(self.id, self.info(), self._handle), timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(self.scale.beat_s):
            try:
                self._beat_once()
            except Exception as exc:  # the registry restarts; the next beat re-registers
                log.warning("replica %s: registry beat failed: %s", self.id, exc)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        load = self.server.load()
        return {"sessions": float(load.sessions), "capacity": float(load.capacity)}

    def check_health(self) -> None:
        if not self.server.alive:
            raise RuntimeError("the replica's HTTP server stopped")

    async def __call__(self, *args: Any) -> dict[str, Any]:
        return self.info()

    def _shutdown(self) -> None:
        if self._stop.is_set():
            return
        try:  # the front door may have said "shutdown" since the last beat
            self._mode = ray.get(self._registry.mode.remote(), timeout=5)
        except Exception as exc:
            log.warning("replica %s: could not read the registry's mode: %s", self.id, exc)
        shutdown = self._mode == "shutdown"
        deadline = 0.0 if shutdown else self.scale.drain_timeout_s
        reason = ("the server is shutting down" if shutdown else
                  f"this replica was removed (scaled down) and its sessions did not end within the "
                  f"{self.scale.drain_timeout_s:g} s drain deadline")
        self.server.drain(deadline, reason)  # beats go on while draining: the front door sees it
        self._stop.set()
        try:
            self._registry.forget.remote(self.id)
        except Exception as exc:
            log.warning("replica %s: could not leave the registry: %s", self.id, exc)
        self.server.stop()

    async def __del__(self) -> None:
        import asyncio

        await asyncio.get_running_loop().run_in_executor(None, self._shutdown)
