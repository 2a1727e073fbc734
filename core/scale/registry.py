"""The registry: a small named Ray actor where every replica reports, and the front door reads.

Each replica calls :meth:`Registry.beat` every ``beat_s`` with its URL, node,
sessions and capacity (and its own actor handle, so a silent replica can be
checked for death). The front door reads :meth:`Registry.snapshot`. The
registry's ``mode`` tells a replica being removed whether to drain (the
default) or to end its sessions at once (the front door is shutting down).
"""

from __future__ import annotations

import time
from typing import Any

MODES = ("drain", "shutdown")


class Registry:
    def __init__(self) -> None:
        self._replicas: dict[str, dict[str, Any]] = {}
        self._handles: dict[str, Any] = {}
        self._mode = "drain"

    def beat(self, replica_id: str, info: dict[str, Any], handle: Any = None) -> str:
        self._replicas[replica_id] = {**info, "id": replica_id, "beat": time.monotonic()}
        if handle is not None:
            self._handles[replica_id] = handle
        return self._mode

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)
        self._handles.pop(replica_id, None)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every replica's last report, ``age_s`` since it, and its actor handle."""
        now = time.monotonic()
        return [{**info, "age_s": now - info["beat"], "handle": self._handles.get(rid)}
                for rid, info in self._replicas.items()]

    def set_mode(self, mode: str) -> None:
        if mode in MODES:
            self._mode = mode

    def mode(self) -> str:
        return self._mode


def registry_handle(name: str, *, create: bool = True) -> Any:
    """The registry actor (made on first use; detached, so it outlives the process that made it)."""
    import ray

    from . import NAMESPACE

    if not create:
        return ray.get_actor(name, namespace=NAMESPACE)
    cls = ray.remote(num_cpus=0, max_restarts=-1)(Registry)
    return cls.options(name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True).remote()
